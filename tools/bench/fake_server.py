"""The fake server of the fake-server workloads: the project's one fake
QMP server (``qmp_sync.fake_server.FakeQMPServer``) in a process of its
own, with the events of the bursts serialised in advance so that the
server is not what is measured (its fixed replies are serialised once
by the server itself)."""

from __future__ import annotations

import threading
import time
from typing import Any

from bench.common import raise_nofile
from qmp_sync.fake_server import FakeConnection, FakeQMPServer, make_greeting

STATUS = {"status": "running", "singlestep": False, "running": True}
BURST_EVENT = (b'{"event": "X", "data": {"seq": %d}, "timestamp": '
               b'{"seconds": %d, "microseconds": %d}}\r\n')
TICK_EVENT = (b'{"event": "TICK", "data": {"t": %a}, "timestamp": '
              b'{"seconds": %d, "microseconds": %d}}\r\n')


def build_burst(count: int) -> bytes:
    seconds, micro = divmod(int(time.time() * 1e6), 1_000_000)
    return b"".join([BURST_EVENT % (seq, seconds, micro)
                     for seq in range(count)])


class Bursts:
    """The bursts of events, each built once (any serving thread)."""

    def __init__(self, counts: list[int]) -> None:
        self._lock = threading.Lock()
        self._built = {count: build_burst(count) for count in counts}

    def send(self, connection: FakeConnection,
             arguments: dict[str, Any]) -> None:
        """After the reply to x-burst: its events, in one write."""
        count = int(arguments["count"])
        with self._lock:
            burst = self._built.get(count)
            if burst is None:
                burst = self._built[count] = build_burst(count)
        connection.send(burst)


def tick(connection: FakeConnection, arguments: dict[str, Any]) -> None:
    """After the reply to x-tick: `count` TICK events, `interval`
    seconds apart, each carrying the monotonic time it was sent at."""
    count, interval = int(arguments["count"]), float(arguments["interval"])
    start = time.monotonic()
    for i in range(1, count + 1):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        seconds, micro = divmod(int(time.time() * 1e6), 1_000_000)
        connection.send(TICK_EVENT % (time.monotonic(), seconds, micro))


def fake_server(path: str, bursts: list[int]) -> int:
    """Serve on the unix socket `path` until killed (the bench's fake
    server process)."""
    raise_nofile()
    threading.stack_size(256 * 1024)  # 500 clients, a thread each
    server = FakeQMPServer(make_greeting(version=(7, 2, 0)), path=path,
                           record=False)
    server.reply("query-status", STATUS)
    server.reply("x-burst", then=Bursts(bursts).send)
    server.reply("x-tick", then=tick)
    print("ready", flush=True)
    threading.Event().wait()
    return 0
