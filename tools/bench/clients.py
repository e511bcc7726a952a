"""The clients measured: adapters to one blocking interface, the raw
floors, and the asyncio clients."""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import queue
import socket
import threading
from typing import Any, Callable, NamedTuple


class SyncClient(NamedTuple):
    """What a blocking workload needs of a client."""
    call: Callable[..., Any]            # (command, arguments=None) -> return
    pull: Callable[[], Any]             # the next event, waiting for it
    drain: Callable[[], list[Any]]      # the queued events, at least one
    close: Callable[[], None]


_RAW_REQUESTS: dict[str, bytes] = {}


def id_request(command: str, arguments: Any, number: int) -> bytes:
    """The bytes of a command with id `number`, as every asyncio client
    sends them."""
    message: dict[str, Any] = {"execute": command, "id": number}
    if arguments:
        message["arguments"] = arguments
    return json.dumps(message).encode() + b"\n"


class RawClient:
    """The floor: a blocking socket, sendall, readline, json.loads."""

    __slots__ = ("events", "sock", "stream")

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.stream = self.sock.makefile("rb")
        self.events: collections.deque[Any] = collections.deque()
        json.loads(self.stream.readline())
        self.call("qmp_capabilities")

    def request(self, command: str, arguments: Any) -> bytes:
        """The bytes of the command, each argument-less one serialised
        once."""
        request = None if arguments else _RAW_REQUESTS.get(command)
        if request is None:
            message: dict[str, Any] = {"execute": command}
            if arguments:
                message["arguments"] = arguments
            request = json.dumps(message).encode() + b"\n"
            if not arguments:
                _RAW_REQUESTS[command] = request
        return request

    def call(self, command: str, arguments: Any = None) -> Any:
        self.sock.sendall(self.request(command, arguments))
        reply = json.loads(self.stream.readline())
        while "event" in reply:
            self.events.append(reply)
            reply = json.loads(self.stream.readline())
        return reply["return"]

    def pull(self) -> Any:
        if self.events:
            return self.events.popleft()
        return json.loads(self.stream.readline())

    def drain(self) -> list[Any]:
        return [self.pull()]

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


class RawIdClient(RawClient):
    """raw, with an id on every command, as every asyncio client sends
    them (QEMU answers those later: see README, Benchmark)."""

    __slots__ = ("next_id",)

    def __init__(self, path: str) -> None:
        self.next_id = 0
        super().__init__(path)

    def request(self, command: str, arguments: Any) -> bytes:
        self.next_id += 1
        return id_request(command, arguments, self.next_id)


class _HopProtocol(asyncio.Protocol):
    """The loop thread's end of `HopClient`: reads lines, hands replies
    to the waiting caller and events to a queue."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.reply: Any = None
        self.replied = threading.Lock()
        self.replied.acquire()
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        for line in lines:
            message = json.loads(line)
            if "event" in message:
                self.events.put(message)
            elif "QMP" not in message:
                self.reply = message
                self.replied.release()


class HopClient:
    """
    The minimal thread hop, the floor of any design with a loop thread:
    the caller thread makes one call_soon_threadsafe, the loop writes,
    the loop reads (json.loads, as raw), a lock wakes the caller. Ids
    on every command, as ours. One caller at a time.
    """

    def __init__(self, path: str, uvloop: bool) -> None:
        if uvloop:
            import uvloop as uv
            self.loop: asyncio.AbstractEventLoop = uv.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever,
                                       daemon=True)
        self.thread.start()
        self.protocol = _HopProtocol()
        asyncio.run_coroutine_threadsafe(self.loop.create_unix_connection(
            lambda: self.protocol, path), self.loop).result()
        self.next_id = 0
        self.call("qmp_capabilities")

    def call(self, command: str, arguments: Any = None) -> Any:
        self.next_id += 1
        request = id_request(command, arguments, self.next_id)
        transport = self.protocol.transport
        assert transport is not None
        self.loop.call_soon_threadsafe(transport.write, request)
        self.protocol.replied.acquire()
        return self.protocol.reply["return"]

    def pull(self) -> Any:
        return self.protocol.events.get()

    def drain(self) -> list[Any]:
        events = [self.protocol.events.get()]
        while not self.protocol.events.empty():
            events.append(self.protocol.events.get_nowait())
        return events

    def close(self) -> None:
        transport = self.protocol.transport
        assert transport is not None
        self.loop.call_soon_threadsafe(transport.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def adapt_floor(client: RawClient | HopClient) -> SyncClient:
    """raw, raw-id and the hops have the blocking interface already."""
    return SyncClient(client.call, client.pull, client.drain, client.close)


def connect_qemu_legacy(path: str) -> Any:
    from qemu.qmp.legacy import (  # type: ignore[import-not-found]
        QEMUMonitorProtocol,
    )
    client = QEMUMonitorProtocol(path)
    client.connect()
    return client


def connect_qmp_sync_legacy(path: str) -> Any:
    from qmp_sync.legacy import QEMUMonitorProtocol
    client = QEMUMonitorProtocol(path)
    client.connect()
    return client


def adapt_legacy(client: Any) -> SyncClient:
    """The QEMUMonitorProtocol of qemu.qmp.legacy and of ours."""
    def call(command: str, arguments: Any = None) -> Any:
        return client.cmd(command, **(arguments or {}))
    return SyncClient(call, functools.partial(client.pull_event, wait=True),
                      functools.partial(client.get_events, wait=True),
                      client.close)


def connect_qmp(path: str) -> Any:
    from qmp import QEMUMonitorProtocol  # type: ignore[import-not-found]
    client = QEMUMonitorProtocol(path)
    client.connect()
    return client


def adapt_qmp(client: Any) -> SyncClient:
    """qmp 1.1.0: get_events returns its own list and does not clear it."""
    def call(command: str, arguments: Any = None) -> Any:
        return client.command(command, **(arguments or {}))

    def drain() -> list[Any]:
        events = list(client.get_events(wait=True))
        client.clear_events()
        return events
    return SyncClient(call, functools.partial(client.pull_event, wait=True),
                      drain, client.close)


def connect_qmp_sync(path: str) -> Any:
    from qmp_sync import QMPSyncClient
    client = QMPSyncClient()
    client.connect(path)
    return client


def adapt_qmp_sync(client: Any) -> SyncClient:
    return SyncClient(client.execute,
                      functools.partial(client.pull_event, wait=True),
                      functools.partial(client.get_events, wait=True),
                      client.close)


SYNC_CLIENTS: dict[str, tuple[Callable[[str], Any],
                              Callable[[Any], SyncClient]]] = {
    "raw": (RawClient, adapt_floor),
    "raw-id": (RawIdClient, adapt_floor),
    "hop": (functools.partial(HopClient, uvloop=False), adapt_floor),
    "hop-uvloop": (functools.partial(HopClient, uvloop=True), adapt_floor),
    "qmp_sync/plain": (connect_qmp_sync, adapt_qmp_sync),
    "qemu.qmp.legacy": (connect_qemu_legacy, adapt_legacy),
    "qmp": (connect_qmp, adapt_qmp),
    "qmp_sync": (connect_qmp_sync, adapt_qmp_sync),
    "qmp_sync.legacy": (connect_qmp_sync_legacy, adapt_legacy),
}


def new_qemu_qmp() -> Any:
    from qemu.qmp import QMPClient  # type: ignore[import-not-found]
    return QMPClient()


def new_qmp_sync_async() -> Any:
    from qmp_sync import QMPClient
    return QMPClient()


ASYNC_CLIENTS: dict[str, Callable[[], Any]] = {
    "qemu.qmp": new_qemu_qmp,
    "qmp_sync-async": new_qmp_sync_async,
}


