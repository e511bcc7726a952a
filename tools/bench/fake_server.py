"""The fake QMP server: a process of its own that serialises what it
can in advance, so that it is not what is measured."""

from __future__ import annotations

import codecs
import json
import socket
import threading
import time
from typing import Any

from bench.common import (
    raise_nofile,
)

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, '
            b'"major": 7}, "package": ""}, "capabilities": ["oob"]}}\r\n')
# Replies without their closing brace: the id, if any, goes there.
REPLIES = {
    "qmp_capabilities": b'{"return": {}',
    "query-status": b'{"return": {"status": "running", "singlestep": '
                    b'false, "running": true}',
}
BURST_EVENT = (b'{"event": "X", "data": {"seq": %d}, "timestamp": '
               b'{"seconds": %d, "microseconds": %d}}\r\n')
TICK_EVENT = (b'{"event": "TICK", "data": {"t": %a}, "timestamp": '
              b'{"seconds": %d, "microseconds": %d}}\r\n')


def build_burst(count: int) -> bytes:
    seconds, micro = divmod(int(time.time() * 1e6), 1_000_000)
    return b"".join([BURST_EVENT % (seq, seconds, micro)
                     for seq in range(count)])


class FakeServer:
    """A QMP server for clients to be measured against, not itself."""

    def __init__(self, path: str, bursts: list[int]) -> None:
        self.bursts = {count: build_burst(count) for count in bursts}
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(1024)

    def serve_forever(self) -> None:
        threading.stack_size(256 * 1024)
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self.serve, args=(conn,),
                             daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        decoder = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8")()
        pending = ""
        with conn:
            try:
                conn.sendall(GREETING)
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    pending = (pending + utf8.decode(data)).lstrip()
                    while pending:
                        try:
                            message, end = decoder.raw_decode(pending)
                        except ValueError:   # incomplete: wait for more
                            if len(pending) > 1 << 20:
                                return
                            break
                        pending = pending[end:].lstrip()
                        self.answer(conn, message)
            except OSError:
                return              # the client went away mid-reply

    def answer(self, conn: socket.socket, message: Any) -> None:
        command = message.get("execute", message.get("exec-oob"))
        if "id" in message:
            end = b', "id": ' + json.dumps(message["id"]).encode() + b"}\r\n"
        else:
            end = b"}\r\n"
        reply = REPLIES.get(command)
        if reply is not None:
            conn.sendall(reply + end)
            return
        arguments = message.get("arguments") or {}
        if command == "x-burst":
            count = int(arguments["count"])
            burst = self.bursts.get(count)
            if burst is None:
                burst = self.bursts[count] = build_burst(count)
            conn.sendall(b'{"return": {}' + end)
            conn.sendall(burst)
        elif command == "x-tick":
            conn.sendall(b'{"return": {}' + end)
            self.tick(conn, int(arguments["count"]),
                      float(arguments["interval"]))
        else:
            conn.sendall(b'{"error": {"class": "CommandNotFound", "desc": '
                         + json.dumps(f"The command {command} has not "
                                      "been found").encode()
                         + b"}" + end)

    @staticmethod
    def tick(conn: socket.socket, count: int, interval: float) -> None:
        start = time.monotonic()
        for i in range(1, count + 1):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            seconds, micro = divmod(int(time.time() * 1e6), 1_000_000)
            conn.sendall(TICK_EVENT % (time.monotonic(), seconds, micro))


def fake_server(path: str, bursts: list[int]) -> int:
    raise_nofile()
    server = FakeServer(path, bursts)
    print("ready", flush=True)
    server.serve_forever()
    return 0


