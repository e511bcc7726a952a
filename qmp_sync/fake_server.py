"""
`FakeQMPServer`: a scriptable QMP server for unit tests of code that
talks QMP (the ``fake_qmp_server`` fixture of ``qmp_sync.testing``).

It listens on a unix socket and serves each client in a thread of its
own, with plain blocking sockets: it greets, answers ``qmp_capabilities``
and the commands it was told to answer (``CommandNotFound`` for the
rest), sends events on demand, and records every command it receives.
Faults are switched on per command (`fault`): hang up instead of
answering, never answer, answer with garbage, with half a reply, or
with a line over a size.

Threads: the methods may be called from any thread; the server's own
threads only read the configuration under its lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
from typing import Any, Callable, Union

__all__ = ("FAULTS", "FakeQMPServer")

#: The greeting sent unless told otherwise (`greeting`).
DEFAULT_GREETING: dict[str, Any] = {"QMP": {
    "version": {"qemu": {"micro": 0, "minor": 0, "major": 9},
                "package": "fake"},
    "capabilities": ["oob"]}}

#: The faults `fault` knows: what the server does instead of answering.
FAULTS = ("hang-up", "stall", "garbage", "partial", "oversized")

#: What `reply` takes: a value, or a function of the arguments.
Answer = Union[object, Callable[[dict[str, Any]], object]]


class FakeQMPServer:
    """
    A fake QMP server on a unix socket (`address`), serving until
    `close`.

    :param greeting: The greeting to send; None sends none (as qemu-ga).
    """

    def __init__(self, greeting: dict[str, Any] | None = DEFAULT_GREETING
                 ) -> None:
        #: The greeting sent to each new client (None: none).
        self.greeting = greeting
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[Answer, dict[str, str] | None]] = {}
        self._faults: dict[str, str] = {}
        #: Every command received, in order, as a dict.
        self.received: list[dict[str, Any]] = []
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._dir = tempfile.mkdtemp(prefix="fake-qmp-")
        #: The unix socket path to connect to.
        self.address = os.path.join(self._dir, "qmp.sock")
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(self.address)
        self._listener.listen(8)
        self._closed = False
        self._start(self._accept_loop)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name="fake QMP server")
        self._threads.append(thread)
        thread.start()

    # ------------------------------------------------------------------
    # Scripting it (any thread).

    def reply(self, command: str, value: Answer = None, *,
              error: dict[str, str] | None = None) -> None:
        """
        Answer `command` with ``{"return": value}`` (a callable is called
        with the command's arguments and its result returned), or, with
        `error` (``{"class": ..., "desc": ...}``), with that error.
        """
        with self._lock:
            self._answers[command] = ({} if value is None else value, error)

    def fault(self, command: str, kind: str) -> None:
        """
        Instead of answering `command`: ``"hang-up"`` closes the
        connection, ``"stall"`` never answers, ``"garbage"`` sends a
        line that is not JSON, ``"partial"`` sends half a reply and
        hangs up, ``"oversized"`` sends a 16 MiB line.

        :raise ValueError: For another `kind`.
        """
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULTS}")
        with self._lock:
            self._faults[command] = kind

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send the event to every connected client."""
        message: dict[str, Any] = {"event": event, "timestamp": {
            "seconds": 0, "microseconds": 0}}
        if data is not None:
            message["data"] = data
        line = json.dumps(message).encode() + b"\n"
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # that client left
                conn.sendall(line)

    def close(self) -> None:
        """Stop listening, hang up on every client, remove the socket."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        # close() alone does not wake a thread blocked in accept().
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in connections:
            with contextlib.suppress(OSError):  # gone already
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(5)
        with contextlib.suppress(OSError):
            os.unlink(self.address)
        os.rmdir(self._dir)

    def __enter__(self) -> FakeQMPServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------
    # Serving (the server's threads).

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._connections.append(conn)
            self._start(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.greeting is not None:
                conn.sendall(json.dumps(self.greeting).encode() + b"\n")
            for line in conn.makefile("rb"):
                command = json.loads(line)
                if not isinstance(command, dict):
                    return  # not a command: hang up, as QEMU would not
                if not self._answer(conn, command):
                    return
        except (OSError, ValueError):
            return  # the client went away, or sent something odd
        finally:
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            conn.close()

    def _answer(self, conn: socket.socket, command: dict[str, Any]) -> bool:
        """Answer one command; False to end the connection."""
        name = command.get("execute") or command.get("exec-oob")
        with self._lock:
            self.received.append(command)
            fault = self._faults.get(str(name))
            answer = self._answers.get(str(name))
        reply: dict[str, Any]
        if fault == "hang-up":
            return False
        if fault == "stall":
            return True
        if fault == "garbage":
            conn.sendall(b"{this is not json\n")
            return True
        if fault == "oversized":
            conn.sendall(b'{"return": "' + b"x" * (16 << 20) + b'"}\n')
            return True
        if name == "qmp_capabilities" and answer is None:
            reply = {"return": {}}
        elif answer is None:
            reply = {"error": {"class": "CommandNotFound",
                               "desc": f"The command {name} has not been "
                                       "found"}}
        elif answer[1] is not None:
            reply = {"error": answer[1]}
        else:
            value = answer[0]
            if callable(value):
                value = value(command.get("arguments") or {})
            reply = {"return": value}
        if "id" in command:
            reply["id"] = command["id"]
        data = json.dumps(reply).encode() + b"\n"
        if fault == "partial":
            conn.sendall(data[:len(data) // 2])
            return False
        conn.sendall(data)
        return True
