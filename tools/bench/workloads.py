"""The workloads, blocking and asyncio, and the worker that runs one
measurement in a process of its own."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import threading
import time
import traceback
from typing import Any

from bench.clients import (
    ASYNC_CLIENTS,
    SYNC_CLIENTS,
    SyncClient,
)
from bench.common import (
    COMMAND,
    IDLE_SECONDS,
    SCHEMA,
    THREADS,
    TICK_INTERVAL,
    WITHOUT_SPEED,
    check_seq,
    cpu_seconds,
    delays,
    per,
    raise_nofile,
    rss_bytes,
    task_count,
)


def sync_calls(client: SyncClient, count: int, command: str = COMMAND,
               warmup: int = 200) -> dict[str, float]:
    call = client.call

    def run(calls: int) -> None:
        for _ in range(calls):
            call(command)

    run(min(warmup, count))
    wall, cpu = time.perf_counter(), cpu_seconds()
    run(count)
    return per(wall, cpu, count)


def sync_threads(client: SyncClient, count: int,
                 lock: bool) -> dict[str, float]:
    call = client.call
    if lock:
        mutex = threading.Lock()

        def call_locked(command: str) -> Any:
            with mutex:
                return client.call(command)
        call = call_locked
    each = count // THREADS
    barrier = threading.Barrier(THREADS + 1)
    failures: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            for _ in range(each):
                call(COMMAND)
        except BaseException as exc:
            failures.append(exc)

    for _ in range(min(200, count)):
        call(COMMAND)
    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    barrier.wait()
    wall, cpu = time.perf_counter(), cpu_seconds()
    for thread in threads:
        thread.join()
    result = per(wall, cpu, each * THREADS)
    if failures:
        raise failures[0]
    return result


def sync_burst(client: SyncClient, count: int,
               pull: bool) -> dict[str, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    client.call("x-burst", {"count": count})
    got = 0
    if pull:
        pull_event = client.pull
        while got < count:
            got = check_seq((pull_event(),), got)
    else:
        drain = client.drain
        while got < count:
            got = check_seq(drain(), got)
    result = per(wall, cpu, count)
    if got != count:
        raise AssertionError(f"{got} events, expected {count}")
    return result


def sync_latency(client: SyncClient, count: int) -> dict[str, float]:
    pull_event = client.pull
    client.call("x-tick", {"count": count, "interval": TICK_INTERVAL})
    samples = []
    for _ in range(count):
        event = pull_event()
        samples.append(time.monotonic() - event["data"]["t"])
    return delays(samples)


def idle_measure(start_tasks: int, start_threads: int, start_rss: int,
                 count: int) -> dict[str, float]:
    gc.collect()
    return {"tasks": task_count() - start_tasks,
            "pythreads": threading.active_count() - start_threads,
            "kib": (rss_bytes() - start_rss) / count / 1024}


def sync_clients(name: str, path: str, count: int) -> dict[str, float]:
    connect, adapt = SYNC_CLIENTS[name]
    start_tasks, start_threads = task_count(), threading.active_count()
    adapt(connect(path)).close()   # warm-up: imports, lazy set-up
    gc.collect()
    start_rss = rss_bytes()
    wall = time.perf_counter()
    clients = [connect(path) for _ in range(count)]
    connect_time = (time.perf_counter() - wall) / count
    time.sleep(0.2)
    result = idle_measure(start_tasks, start_threads, start_rss, count)
    cpu = cpu_seconds()
    time.sleep(IDLE_SECONDS)
    result["idle_cpu"] = cpu_seconds() - cpu
    result["connect"] = connect_time
    for client in clients:
        adapt(client).close()
    return result


def run_sync(name: str, workload: str, path: str,
             count: int) -> dict[str, float]:
    if workload == "clients500":
        return sync_clients(name, path, count)
    connect, adapt = SYNC_CLIENTS[name]
    client = adapt(connect(path))
    try:
        if workload in ("seq-qemu", "seq-fake"):
            return sync_calls(client, count)
        if workload == "schema":
            return sync_calls(client, count, SCHEMA, warmup=3)
        if workload == "threads8":
            return sync_threads(client, count, lock=name == "raw")
        if workload in ("burst-get", "burst-pull"):
            return sync_burst(client, count, workload == "burst-pull")
        if workload == "latency":
            return sync_latency(client, count)
        raise ValueError(workload)
    finally:
        client.close()


# ------------------------------------------------------- asyncio workloads

async def async_calls(client: Any, count: int, command: str = COMMAND,
                      warmup: int = 200) -> dict[str, float]:
    async def run(calls: int) -> None:
        for _ in range(calls):
            await client.execute(command)

    await run(min(warmup, count))
    wall, cpu = time.perf_counter(), cpu_seconds()
    await run(count)
    return per(wall, cpu, count)


async def async_tasks(client: Any, count: int) -> dict[str, float]:
    """The asyncio counterpart of threads8: 8 tasks share the client."""
    each = count // THREADS

    async def run() -> None:
        for _ in range(each):
            await client.execute(COMMAND)

    for _ in range(min(200, count)):
        await client.execute(COMMAND)
    wall, cpu = time.perf_counter(), cpu_seconds()
    await asyncio.gather(*(run() for _ in range(THREADS)))
    return per(wall, cpu, each * THREADS)


async def async_burst(client: Any, count: int,
                      pull: bool) -> dict[str, float]:
    events = client.events
    wall, cpu = time.perf_counter(), cpu_seconds()
    await client.execute("x-burst", {"count": count})
    got = 0
    while got < count:
        event = await events.get()
        got = check_seq((event,) if pull else (event, *events.clear()), got)
    result = per(wall, cpu, count)
    if got != count:
        raise AssertionError(f"{got} events, expected {count}")
    return result


async def async_latency(client: Any, count: int) -> dict[str, float]:
    events = client.events
    await client.execute("x-tick",
                         {"count": count, "interval": TICK_INTERVAL})
    samples = []
    for _ in range(count):
        event = await events.get()
        samples.append(time.monotonic() - event["data"]["t"])
    return delays(samples)


async def async_clients(name: str, path: str,
                        count: int) -> dict[str, float]:
    new = ASYNC_CLIENTS[name]
    start_tasks, start_threads = task_count(), threading.active_count()
    warm = new()
    await warm.connect(path)
    await warm.disconnect()
    del warm
    gc.collect()
    start_rss = rss_bytes()
    wall = time.perf_counter()
    clients = []
    for _ in range(count):
        client = new()
        await client.connect(path)
        clients.append(client)
    connect_time = (time.perf_counter() - wall) / count
    await asyncio.sleep(0.2)
    result = idle_measure(start_tasks, start_threads, start_rss, count)
    cpu = cpu_seconds()
    await asyncio.sleep(IDLE_SECONDS)
    result["idle_cpu"] = cpu_seconds() - cpu
    result["connect"] = connect_time
    for client in clients:
        await client.disconnect()
    return result


async def run_async(name: str, workload: str, path: str,
                    count: int) -> dict[str, float]:
    if workload == "clients500":
        return await async_clients(name, path, count)
    client = ASYNC_CLIENTS[name]()
    await client.connect(path)
    try:
        if workload in ("seq-qemu", "seq-fake"):
            return await async_calls(client, count)
        if workload == "schema":
            return await async_calls(client, count, SCHEMA, warmup=3)
        if workload == "threads8":
            return await async_tasks(client, count)
        if workload in ("burst-get", "burst-pull"):
            return await async_burst(client, count, workload == "burst-pull")
        if workload == "latency":
            return await async_latency(client, count)
        raise ValueError(workload)
    finally:
        await client.disconnect()


def worker(name: str, workload: str, path: str, count: int) -> int:
    """Run one measurement; print its result (or error) as JSON."""
    raise_nofile()
    if name in WITHOUT_SPEED:
        # As if the speed extra were not installed: importing either
        # now raises ImportError.
        sys.modules["uvloop"] = None  # type: ignore[assignment]
        sys.modules["orjson"] = None  # type: ignore[assignment]
        os.environ.pop("QMP_SYNC_LOOP", None)
    try:
        if name in ASYNC_CLIENTS:
            result = asyncio.run(run_async(name, workload, path, count))
        else:
            result = run_sync(name, workload, path, count)
    except BaseException as exc:
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        print(json.dumps({"error": f"{type(exc).__name__}: {first}"}))
        return 1
    print(json.dumps(result))
    return 0


