"""
A fake QMP server for unit tests of code that talks QMP (the
``fake_qmp_server`` fixture of ``qmp_sync.testing``), and the one fake
peer of qmp_sync's own tests.

`FakeQMPServer` answers by itself: it greets, negotiates, answers the
commands it was told to answer (``CommandNotFound`` for the rest, as
QEMU does), sends events on demand and records every command. It serves
a unix socket (default), TCP on 127.0.0.1, and socketpairs, each client
in a thread of its own with plain blocking sockets. Faults are switched
on per command (`FakeQMPServer.fault`). What it received can be checked
with `FakeQMPServer.commands`, `FakeQMPServer.arguments`,
`FakeQMPServer.assert_received` and `FakeQMPServer.wait_for`::

    server.reply("query-status", {"status": "running", "running": True})
    server.reply("stop", error={"class": "GenericError", "desc": "no"})
    ...  # the code under test connects to server.address
    server.assert_received("query-status")
    server.assert_received("blockdev-add", {"driver": "null-co",
                                            "node-name": "n0"})
    assert server.commands == ["qmp_capabilities", "query-status"]

`FakeConnection` is one connection driven step by step instead, for
faults at an exact point of the exchange: the test greets, reads a
command, answers it, sends garbage or half a line, or hangs up, each a
blocking call bounded by `FakeConnection.timeout`.

Threads: every public method may be called from any thread. The
server's own threads read its configuration under its lock.
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import json
import os
import re
import socket
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Union

from typing_extensions import Self

__all__ = (
    "DEFAULT_GREETING",
    "FAULTS",
    "FakeConnection",
    "FakeQMPServer",
    "make_greeting",
)


def make_greeting(capabilities: Sequence[str] = ("oob",),
                  version: tuple[int, int, int] = (9, 0, 0)
                  ) -> dict[str, Any]:
    """A QMP greeting offering `capabilities`, from QEMU `version`
    (major, minor, micro)."""
    major, minor, micro = version
    return {"QMP": {
        "version": {"qemu": {"micro": micro, "minor": minor,
                             "major": major},
                    "package": "fake"},
        "capabilities": list(capabilities)}}


#: The greeting sent unless told otherwise: QEMU 9.0 offering oob.
DEFAULT_GREETING = make_greeting()

#: The faults `FakeQMPServer.fault` knows: what the server does instead
#: of answering.
FAULTS = ("hang-up", "stall", "garbage", "partial", "oversized")

#: What `FakeQMPServer.reply` takes: a value, or a function of the
#: command's arguments.
Answer = Union[object, Callable[[dict[str, Any]], object]]

#: What `FakeQMPServer.reply` calls after the reply (its `then`): with
#: the client's connection and the command's arguments.
FollowUp = Callable[["FakeConnection", dict[str, Any]], None]

#: What `FakeConnection.send` writes: raw bytes as they are, a mapping
#: as one JSON line.
Sendable = Union[bytes, bytearray, Mapping[str, Any]]

_NOT_NEGOTIATED = "Expecting capabilities negotiation with 'qmp_capabilities'"
_NEGOTIATED_ALREADY = "Capabilities negotiation is already complete, " \
                      "command ignored"


_DECODER = json.JSONDecoder()
#: What may be left of a number or a word (true, NaN...) cut short.
_TOKEN_START = re.compile(r"[\w.+-]*")


def _stops_early(error: json.JSONDecodeError, text: str) -> bool:
    """Whether `text` failed to decode only because more is to come."""
    # What follows the error is the start of a token a read cut short (a
    # number, true/false/null): a complete token would be followed by
    # whitespace or punctuation.
    return (error.msg.startswith("Unterminated string")
            or _TOKEN_START.fullmatch(text, error.pos) is not None)


def _name_of(command: Mapping[str, Any]) -> str:
    return str(command.get("execute", command.get("exec-oob")))


class FakeConnection:
    """
    The server's end of one connection, driven step by step.

    Make one with `socketpair` (the client gets `client_sock`), or wrap
    an accepted socket. Every read waits at most `timeout` seconds and
    then raises `TimeoutError`, so a test that expects a command the
    client never sends fails instead of hanging.

    :param sock: The server's end of the connection (now owned here).
    :param timeout: Longest wait of a read, in seconds (None: forever).
    :param record: False to keep no record in `received`.
    """

    def __init__(self, sock: socket.socket, timeout: float | None = 10.0,
                 *, record: bool = True) -> None:
        self.sock = sock
        self._record = record
        #: Longest wait of a read, in seconds.
        self.timeout = timeout
        sock.settimeout(timeout)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""
        self._skipping = False
        self._client_sock: socket.socket | None = None
        #: Every message read from the client, in order.
        self.received: list[dict[str, Any]] = []

    @classmethod
    def socketpair(cls, timeout: float | None = 10.0) -> FakeConnection:
        """A connection on one end of a new socketpair; the other end is
        `client_sock`."""
        client_sock, server_sock = socket.socketpair()
        connection = cls(server_sock, timeout)
        connection._client_sock = client_sock
        return connection

    @property
    def client_sock(self) -> socket.socket:
        """
        The client's end of a `socketpair` connection. Whoever takes it
        owns (and closes) it; `close` closes it only if nobody did.

        :raise ValueError: For a connection not made by `socketpair`, or
            when it was taken already.
        """
        if self._client_sock is None:
            raise ValueError("no client end to hand out (not made by "
                             "socketpair(), or taken already)")
        client_sock, self._client_sock = self._client_sock, None
        return client_sock

    def send(self, *items: Sendable) -> None:
        """Write each item: bytes as they are, a mapping as one line of
        JSON (a `qmp_sync.Message` included)."""
        for item in items:
            if isinstance(item, (bytes, bytearray)):
                self.sock.sendall(item)
            else:
                self.sock.sendall(json.dumps(dict(item)).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        """
        Read one message from the client and record it in `received`.
        As QEMU, it takes a stream of JSON values: a newline after each
        is usual, not needed.

        :raise EOFError: When the client hung up.
        :raise TimeoutError: When nothing came within `timeout`.
        :raise ValueError: When the client sent something that is not
            JSON (it is dropped, up to the next newline) or not a JSON
            object; the next call reads on after it.
        """
        while True:
            text = self._pending.lstrip()
            if text:
                try:
                    message, end = _DECODER.raw_decode(text)
                except json.JSONDecodeError as err:
                    if not _stops_early(err, text):
                        _, newline, self._pending = text.partition("\n")
                        self._skipping = not newline
                        raise ValueError(f"JSON parse error, {err.msg}: "
                                         f"{text[:60]!r}") from None
                else:
                    self._pending = text[end:]
                    if not isinstance(message, dict):
                        raise ValueError("QMP input must be a JSON object, "
                                         f"not {text[:end][:60]!r}")
                    if self._record:
                        self.received.append(message)
                    return message
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the client closed the connection")
            more = self._utf8.decode(data)
            if self._skipping:  # the rest of a line that was not JSON
                _, newline, more = more.partition("\n")
                self._skipping = not newline
            self._pending = text + more

    def answer(self, result: object = None, **extra: Any) -> dict[str, Any]:
        """Read one command and reply ``{"return": result}`` (``{}`` for
        None), with its id and the `extra` members; return the
        command."""
        command = self.recv()
        reply = {"return": {} if result is None else result, **extra}
        if "id" in command:
            reply["id"] = command["id"]
        self.send(reply)
        return command

    def greet(self, greeting: Mapping[str, Any] = DEFAULT_GREETING
              ) -> None:
        """Send the greeting."""
        self.send(greeting)

    def handshake(self, capabilities: Sequence[str] = ("oob",)
                  ) -> dict[str, Any]:
        """Greet offering `capabilities`, then answer
        ``qmp_capabilities``; return that command."""
        self.greet(make_greeting(capabilities))
        return self.answer()

    def at_eof(self) -> bool:
        """Read until the client hangs up (bounded by `timeout`); True
        when it did."""
        rest = self._pending.strip()
        while True:
            data = self.sock.recv(65536)
            if not data:
                return rest == ""
            rest += data.decode(errors="replace").strip()

    def close(self) -> None:
        """Hang up (and close the client's end if nobody took it)."""
        self.sock.close()
        if self._client_sock is not None:
            self._client_sock.close()
            self._client_sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class FakeQMPServer:
    """
    A fake QMP server that answers by itself, serving until `close`.

    :param greeting: The greeting sent to each client (`make_greeting`
        builds others: ``make_greeting(())`` offers no oob). None sends
        none and needs no negotiation, as the guest agent (qemu-ga).
    :param tcp: Listen on TCP 127.0.0.1 (a free port) instead of a unix
        socket.
    :param path: The unix socket's path (removed again by `close`); by
        default one in a new temporary directory.
    :param record: False to keep no record of the commands received
        (`received` stays empty), for a server that serves millions.
    """

    def __init__(self, greeting: Mapping[str, Any] | None = DEFAULT_GREETING,
                 *, tcp: bool = False, path: str | None = None,
                 record: bool = True) -> None:
        self._record = record
        #: The greeting sent to each new client (None: none, and no
        #: negotiation either); may be changed between connections.
        self.greeting = None if greeting is None else copy.deepcopy(
            dict(greeting))
        self._lock = threading.Condition()
        self._answers: dict[str, _Scripted] = {}
        self._faults: dict[str, str] = {}
        self._received: list[dict[str, Any]] = []
        self._connections: list[FakeConnection] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._dir: str | None = None
        self._listener: socket.socket
        #: Where to connect: a unix socket path, or ``("127.0.0.1",
        #: port)``.
        self.address: str | tuple[str, int]
        if tcp:
            self._listener = socket.socket(socket.AF_INET)
            self._listener.bind(("127.0.0.1", 0))
            self.address = self._listener.getsockname()
        else:
            if path is None:
                self._dir = tempfile.mkdtemp(prefix="fake-qmp-")
                path = os.path.join(self._dir, "qmp.sock")
            self.address = path
            self._listener = socket.socket(socket.AF_UNIX)
            self._listener.bind(self.address)
        self._listener.listen(256)
        accepting = self._thread(self._accept_loop)
        self._threads.append(accepting)
        accepting.start()

    @staticmethod
    def _thread(target: Callable[..., None], *args: object
                ) -> threading.Thread:
        return threading.Thread(target=target, args=args, daemon=True,
                                name="fake QMP server")

    # ------------------------------------------------------------------
    # Scripting it.

    def reply(self, command: str, value: Answer = None, *,
              error: Mapping[str, str] | None = None,
              then: FollowUp | None = None) -> None:
        """
        Answer `command` with ``{"return": value}`` from now on: a
        callable is called with the command's arguments (a dict, empty
        when there were none) and its result returned; None returns
        ``{}``. With `error` (``{"class": ..., "desc": ...}``), answer
        with that error instead. `then`, if given, is called after the
        reply is written, in the thread serving that client, with its
        `FakeConnection` and the arguments: to send events that follow
        the reply (as a job's events follow the command that started
        it) to that client alone.
        """
        with self._lock:
            self._answers[command] = _Scripted(
                {} if value is None else value,
                None if error is None else dict(error), then)

    def fault(self, command: str, kind: str) -> None:
        """
        Instead of answering `command`: ``"hang-up"`` closes the
        connection, ``"stall"`` never answers, ``"garbage"`` sends a
        line that is not JSON, ``"partial"`` sends half a reply and
        hangs up (a close mid-reply), ``"oversized"`` sends a 16 MiB
        line.

        :raise ValueError: For another `kind`.
        """
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULTS}")
        with self._lock:
            self._faults[command] = kind

    def emit(self, event: str, data: Mapping[str, Any] | None = None
             ) -> None:
        """Send the event to every client connected now. Like any
        write, this blocks while a client that reads nothing has a full
        socket buffer."""
        message: dict[str, Any] = {"event": event, "timestamp": {
            "seconds": 0, "microseconds": 0}}
        if data is not None:
            message["data"] = dict(data)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # that client left
                connection.send(message)

    def socketpair(self) -> socket.socket:
        """Serve one end of a new socketpair, as a client that connected;
        return the other end, which the caller owns (for
        ``open_with_socket``)."""
        client_sock, server_sock = socket.socketpair()
        self._serve_new(server_sock)
        return client_sock

    # ------------------------------------------------------------------
    # What it received.

    @property
    def received(self) -> list[dict[str, Any]]:
        """Every command received, in order, as dicts (a copy)."""
        with self._lock:
            return list(self._received)

    @property
    def commands(self) -> list[str]:
        """The names of the commands received, in order."""
        return [_name_of(command) for command in self.received]

    def arguments(self, command: str) -> list[dict[str, Any]]:
        """The arguments of each `command` received, in order (``{}``
        for one sent without)."""
        return [dict(received.get("arguments") or {})
                for received in self.received
                if _name_of(received) == command]

    def assert_received(self, command: str,
                        arguments: Mapping[str, Any] | None = None, *,
                        times: int | None = None) -> None:
        """
        Check that `command` was received: with exactly these
        `arguments` if given, exactly `times` times if given (at least
        once if not).

        :raise AssertionError: Otherwise, listing what was received.
        """
        seen = self.arguments(command)
        if arguments is not None:
            seen = [args for args in seen if args == dict(arguments)]
        wanted = f"{command}" + ("" if arguments is None
                                 else f" with arguments {dict(arguments)}")
        if times is None and not seen:
            raise AssertionError(f"{wanted} was not received; the server "
                                 f"received: {self._summary()}")
        if times is not None and len(seen) != times:
            raise AssertionError(f"{wanted} was received {len(seen)} "
                                 f"times, not {times}; the server "
                                 f"received: {self._summary()}")

    def wait_for(self, command: str, timeout: float = 10.0
                 ) -> dict[str, Any]:
        """
        Wait until `command` has been received; return it (the first
        one).

        :raise TimeoutError: When it has not come within `timeout`
            seconds.
        """
        def first() -> dict[str, Any] | None:
            return next((received for received in self._received
                         if _name_of(received) == command), None)

        with self._lock:
            if not self._lock.wait_for(lambda: first() is not None,
                                       timeout):
                raise TimeoutError(f"{command} not received within "
                                   f"{timeout} s; the server received: "
                                   f"{self.commands}")
            found = first()
        assert found is not None
        return found

    def _summary(self) -> str:
        return ", ".join(
            f"{_name_of(command)}{command.get('arguments') or ''}"
            for command in self.received) or "nothing"

    # ------------------------------------------------------------------
    # Ending.

    def close(self) -> None:
        """Stop listening, hang up on every client, wait for the
        server's threads, and remove the socket."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
            threads = list(self._threads)
        # close() alone does not wake a thread blocked in accept().
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):  # gone already
                connection.sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)
        if isinstance(self.address, str):
            with contextlib.suppress(OSError):  # removed already
                os.unlink(self.address)
        if self._dir is not None:
            os.rmdir(self._dir)
            self._dir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------
    # Serving (the server's threads).

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._serve_new(sock):
                return

    def _serve_new(self, sock: socket.socket) -> bool:
        """Serve `sock` in a thread of its own; False (and `sock`
        closed) once the server is closed."""
        # The server keeps its own record (or none).
        connection = FakeConnection(sock, timeout=None, record=False)
        serving = self._thread(self._serve, connection)
        with self._lock:
            if self._closed:
                connection.close()
                return False
            self._connections.append(connection)
            self._threads.append(serving)
        serving.start()
        return True

    def _serve(self, connection: FakeConnection) -> None:
        with self._lock:
            greeting = self.greeting
        negotiated = greeting is None
        try:
            if greeting is not None:
                connection.greet(greeting)
            while True:
                try:
                    command = connection.recv()
                except ValueError as err:  # QEMU answers, and reads on
                    connection.send(_error_body(str(err), "GenericError")
                                    + b"}\n")
                    continue
                if self._record:
                    with self._lock:
                        self._received.append(command)
                        self._lock.notify_all()
                if not self._answer(connection, command, negotiated):
                    return
                negotiated = negotiated or (
                    _name_of(command) == "qmp_capabilities")
        except (OSError, EOFError, ValueError):
            return  # the client left, or a scripted answer failed
        finally:
            with self._lock:
                self._connections.remove(connection)
            connection.close()

    def _answer(self, connection: FakeConnection, command: dict[str, Any],
                negotiated: bool) -> bool:
        """Answer one command; False to end the connection."""
        name = _name_of(command)
        with self._lock:
            fault = self._faults.get(name)
            answer = self._answers.get(name)
        if fault == "hang-up":
            return False
        if fault == "stall":
            return True
        if fault == "garbage":
            connection.send(b"{this is not json\n")
            return True
        if fault == "oversized":
            connection.send(b'{"return": "' + b"x" * (16 << 20) + b'"}\n')
            return True
        arguments = dict(command.get("arguments") or {})
        body, scripted = self._reply_to(name, arguments, answer, negotiated)
        if "id" in command:
            body += b', "id": ' + json.dumps(command["id"]).encode()
        data = body + b"}\n"
        if fault == "partial":
            connection.send(data[:len(data) // 2])
            return False
        connection.send(data)
        if scripted is not None and scripted.then is not None:
            scripted.then(connection, arguments)
        return True

    @staticmethod
    def _reply_to(name: str, arguments: dict[str, Any],
                  answer: _Scripted | None, negotiated: bool
                  ) -> tuple[bytes, _Scripted | None]:
        """The reply QEMU would give, unless scripted otherwise, without
        its id and closing brace; and the scripted answer it used."""
        if not negotiated and name != "qmp_capabilities":
            return _error_body(_NOT_NEGOTIATED), None  # as QEMU refuses
        if answer is not None:
            return answer.body(arguments), answer
        if name != "qmp_capabilities":
            return _error_body(f"The command {name} has not been found"), None
        if negotiated:
            return _error_body(_NEGOTIATED_ALREADY), None
        return b'{"return": {}', None


def _error_body(desc: str, error_class: str = "CommandNotFound") -> bytes:
    return b'{"error": ' + json.dumps({"class": error_class,
                                       "desc": desc}).encode()


class _Scripted:
    """How `FakeQMPServer` answers one command (see its `reply`); a
    fixed answer is serialised once, here."""

    def __init__(self, value: Answer, error: dict[str, str] | None,
                 then: FollowUp | None) -> None:
        self.value = value
        self.error = error
        self.then = then
        self._fixed: bytes | None = None
        if error is not None:
            self._fixed = b'{"error": ' + json.dumps(error).encode()
        elif not callable(value):
            self._fixed = b'{"return": ' + json.dumps(value).encode()

    def body(self, arguments: dict[str, Any]) -> bytes:
        """The reply without its id and closing brace; a function that
        raises, or returns what JSON cannot hold, gives a GenericError
        that says so (the test's client sees it, and the server reads
        on)."""
        if self._fixed is not None:
            return self._fixed
        assert callable(self.value)
        try:
            value = json.dumps(self.value(arguments))
        except Exception as err:  # the test's own function failed
            return _error_body(f"the fake server's reply function "
                               f"raised {type(err).__name__}: {err}",
                               "GenericError")
        return b'{"return": ' + value.encode()
