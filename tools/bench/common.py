"""Constants and small helpers shared by the benchmark's modules."""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any

COMMAND = "query-status"
SCHEMA = "query-qmp-schema"
THREADS = 8
IDLE_SECONDS = 2.0
TICK_INTERVAL = 0.001

# Clients, in the order they run within a round; raw always runs first.
# raw-id is raw with an id on every command; hop and hop-uvloop are the
# minimal thread hop on each loop (see clients.HopClient): the floors.
# qmp_sync/plain is QMPSyncClient without the speed extra.
CLIENTS = ("raw", "raw-id", "hop", "hop-uvloop", "qemu.qmp.legacy",
           "qemu.qmp", "qmp", "qmp_sync", "qmp_sync/plain",
           "qmp_sync.legacy", "qmp_sync-async")
# Ours with targets.
OURS = ("qmp_sync", "qmp_sync/plain", "qmp_sync.legacy")
# The hop on the loop each of ours runs on.
HOP_OF = {"qmp_sync": "hop-uvloop", "qmp_sync.legacy": "hop-uvloop",
          "qmp_sync/plain": "hop"}
# Clients that cannot be shared by threads at all (threads8 is n/a).
NOT_THREAD_SAFE = ("qemu.qmp.legacy", "qmp", "hop", "hop-uvloop")
# The floors run only where they are a floor.
FLOORS = ("raw-id", "hop", "hop-uvloop")
FLOOR_WORKLOADS = ("seq-qemu", "seq-fake", "schema", "burst-get",
                   "burst-pull", "latency")
# Workers of these clients run without the speed extra.
WITHOUT_SPEED = ("qmp_sync/plain", "hop")


# --------------------------------------------------------------- helpers

def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_nofile() -> None:
    """Raise the soft limit on open files to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def task_count() -> int:
    """Threads of this process, including those Python does not know."""
    return len(os.listdir("/proc/self/task"))


def check_seq(events: Any, expected: int) -> int:
    """Check that `events` carry seq expected, expected+1, ...; next."""
    for event in events:
        seq = event["data"]["seq"]
        if seq != expected:
            raise AssertionError(f"event seq {seq}, expected {expected}")
        expected += 1
    return expected


def per(start_wall: float, start_cpu: float, count: int) -> dict[str, float]:
    return {"wall": (time.perf_counter() - start_wall) / count,
            "cpu": (cpu_seconds() - start_cpu) / count}


def delays(samples: list[float]) -> dict[str, float]:
    samples.sort()
    return {"median": statistics.median(samples),
            "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))]}


