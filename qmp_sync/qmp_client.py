"""
`QMPClient`: the asyncio QMP client.

It reads and checks the server's greeting, negotiates capabilities
(enabling out-of-band execution when the server offers it), gives every
command an id, routes each reply to the coroutine that sent the command
and every event to the registered listeners. When the connection ends,
every command still in flight ends at once with `ExecInterruptedError`,
whose ``__cause__`` is what ended it.

Threads: the client runs in the loop thread, with three exceptions
that any thread may use, and that make up the interface of the blocking
facade (``qmp_sync.sync``) besides the public coroutines: building a
`Command` (`QMPClient.command`, `QMPClient.command_from`), turning a
reply into a value (`reply_value`, `reply_message`), and reading
``runstate``/``greeting``. `QMPClient.submit` is the loop thread's end
of a command whose caller waits elsewhere.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import json
import logging
import os
import socket
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Callable, Protocol

from .error import ProtocolError, QMPError
from .events import Events
from .message import Message, decode, encode
from .protocol import (
    DEFAULT_READBUFLEN,
    AsyncProtocol,
    Runstate,
    SocketAddr,
    describe_end,
    raise_state_error,
    require,
)

if TYPE_CHECKING:
    from ssl import SSLContext

# Beside its own: the names users of qemu.qmp.qmp_client import from it.
__all__ = (
    "AsyncProtocol",
    "BadReplyError",
    "Command",
    "ExecInterruptedError",
    "ExecuteError",
    "GreetingError",
    "Message",
    "NegotiationError",
    "ProtocolError",
    "QMPClient",
    "QMPError",
    "ReplySink",
    "Runstate",
    "ServerParseError",
    "reply_message",
    "reply_value",
)

# Ids the client assigns; a caller's own ids must not look like them.
_ID_PREFIX = "__qmp_sync#"
_NEGOTIATION_ID = _ID_PREFIX + "negotiate"


def _preview(data: object, size: int = 80) -> str:
    text = repr(data)
    return text if len(text) <= size else text[:size] + "..."


class ServerParseError(ProtocolError):
    """
    The server sent something that is not a QMP message: malformed JSON,
    a JSON value that is not an object, a message cut off by the end of
    the stream; or it answered with an id-less error, meaning it could
    not parse what we sent.

    :param error_message: What happened, in words.
    :param raw: What was received (bytes or the message).
    """

    def __init__(self, error_message: str, raw: bytes | Message):
        super().__init__(error_message)
        #: What was received.
        self.raw = raw


class BadReplyError(ProtocolError):
    """
    The server sent a well-formed message that makes no sense where it
    came: a reply with neither ``return`` nor ``error``, a malformed
    ``error`` object, or a message that is neither a reply nor an event.

    :param error_message: What was wrong, in words.
    :param reply: The offending message.
    :param sent: The command it answered, if known.
    """

    def __init__(self, error_message: str, reply: Message,
                 sent: Message | None = None):
        super().__init__(f"{error_message}: {_preview(reply.to_dict())}")
        #: The offending message.
        self.reply = reply
        #: The command it answered, if known.
        self.sent = sent


class GreetingError(ProtocolError):
    """
    The server's greeting was missing or malformed.

    :param error_message: What was wrong, in words.
    :param received: What arrived instead, if anything.
    """

    def __init__(self, error_message: str,
                 received: Message | None = None):
        super().__init__(error_message)
        #: What arrived instead of a greeting, if anything.
        self.received = received


class NegotiationError(ProtocolError):
    """
    The server refused or garbled the capabilities negotiation.

    :param error_message: What was wrong, in words.
    :param received: The server's reply.
    """

    def __init__(self, error_message: str, received: Message):
        super().__init__(error_message)
        #: The server's reply to ``qmp_capabilities``.
        self.received = received


class ExecuteError(QMPError):
    """
    The server answered a command with an error.

    ``str()`` of it is the server's description of the error.

    :param sent: The command as sent.
    :param received: The error reply.
    """

    def __init__(self, sent: Message, received: Message):
        error = received["error"]
        assert isinstance(error, dict)
        super().__init__(error["desc"])
        #: The command as sent.
        self.sent = sent
        #: The whole error reply.
        self.received = received
        #: The error's class, e.g. ``"GenericError"``.
        self.error_class: str = error["class"]
        #: The server's description of the error.
        self.desc: str = error["desc"]

    def __str__(self) -> str:
        return self.desc


class ExecInterruptedError(QMPError):
    """
    The connection ended while the command was in flight; whether the
    server executed it is unknown. ``__cause__`` is what ended it, if
    it was a failure.
    """


class Command(Message):
    """
    A command checked and serialised once, ready to send: made by
    `QMPClient.command` or `QMPClient.command_from` in any thread, so
    that every caller error (a bad name, arguments that are not JSON, a
    key that is not a string, nesting too deep) is raised there, before
    anything is sent; the client writes these very bytes. Nobody changes
    it afterwards.
    """

    #: The command's name.
    name: str
    #: True for an ``exec-oob`` command.
    oob: bool
    #: The wire form, line terminator included.
    wire: bytes
    #: The key of its id among the commands in flight.
    key: object
    #: True when the id is the caller's own (it stays in the reply).
    own_id: bool

    @classmethod
    def made(cls, data: dict[str, object], wire: bytes, name: str,
             oob: bool, key: object, *, own_id: bool) -> Command:
        """Any thread: a command of `data` (adopted, with its id) whose
        wire form is `wire`; for `QMPClient` to build, after its
        checks."""
        command = cls.__new__(cls)
        command.data = data
        command.wire = wire
        command.name = name
        command.oob = oob
        command.key = key
        command.own_id = own_id
        return command

    def __bytes__(self) -> bytes:
        return self.wire[:-1]


#: A command as sent (with its id) and the server's reply to it.
Exchange = tuple[Command, Message]


def reply_value(sent: Command, reply: Message) -> object:
    """
    Any thread: the ``return`` value of `reply` to `sent`.

    :raise ExecuteError: For an error reply.
    :raise BadReplyError: For a malformed reply.
    """
    if "return" in reply and "error" not in reply:
        return reply["return"]
    if "error" in reply and "return" not in reply:
        _check_error(reply, sent)
        raise ExecuteError(sent, reply)
    raise BadReplyError("reply has neither or both of 'return' and "
                        "'error'", reply, sent)


def reply_message(sent: Command, reply: Message) -> Message:
    """
    Any thread: `reply` as the caller of `execute_reply` sees it, that
    is without the id the client gave `sent` (an id of the caller's own
    stays).
    """
    if sent.own_id:
        return reply
    return Message.adopt({k: v for k, v in reply.items() if k != "id"})


def _check_error(reply: Message, sent: Message) -> None:
    """Raise `BadReplyError` unless ``reply['error']`` is well-formed."""
    error = reply["error"]
    if not (isinstance(error, dict)
            and isinstance(error.get("class"), str)
            and isinstance(error.get("desc"), str)):
        raise BadReplyError("malformed error object in reply", reply, sent)


class ReplySink(Protocol):
    """
    Where `QMPClient.submit` delivers the outcome of one command: an
    `asyncio.Future` in the loop, or the blocking facade's hand-off to
    a caller in another thread. Both methods are called in the loop
    thread, at most once in all, and must not block.
    """

    def set_result(self, result: Exchange, /) -> None:
        """The command and its reply, whatever the reply says."""

    def set_exception(self, exception: BaseException, /) -> None:
        """The command ended without a reply (`ExecInterruptedError`)."""


#: A str as a JSON string, non-ASCII escaped (as `encode` writes it).
_json_string = json.encoder.encode_basestring_ascii


def _check_command(name: object, arguments: object) -> None:
    """Any thread: raise `TypeError` unless `name` is a command name and
    `arguments` None or a mapping."""
    if not isinstance(name, str):
        raise TypeError(f"command name must be a str, not {name!r}")
    if arguments is not None and not isinstance(arguments, Mapping):
        raise TypeError(f"arguments of {name!r} must be a mapping, not "
                        f"{type(arguments).__name__}")


def _id_key(value: object) -> object:
    """A hashable key for a message id (ids may be any JSON value)."""
    if type(value) is str:
        return value
    return ("json", json.dumps(value, sort_keys=True))


class QMPClient(AsyncProtocol[Message], Events):
    """
    An asyncio QMP client.

    Connect with `connect` (or `start_server` + `accept`, or
    `open_with_socket`), then `execute` commands; events arrive in
    ``self.events`` and in any listener registered with `listen` or
    `listener`. In ``async with QMPClient() as client:`` (connecting
    inside the block) the client is disconnected when the block is
    left; one garbage-collected while still connected warns with a
    `ResourceWarning` that names it.

    :param name: A nickname for logs and ``repr``.
    :param readbuflen: The longest message accepted from the server, in
        bytes (default 10 MiB).
    """

    logger = logging.getLogger(__name__)

    #: Wait for (and check) the server's greeting when connecting; done
    #: regardless when `negotiate` is set, as negotiation follows it.
    await_greeting = True
    #: Negotiate capabilities when connecting (False for qemu-ga).
    negotiate = True
    #: Seconds to wait for the greeting once connected (None: no limit).
    #: QEMU serves one client per monitor and greets the next only when
    #: the current one leaves, so a silent server usually means that
    #: another client holds the monitor: `GreetingError` says so.
    greeting_timeout: float | None = 10.0

    def __init__(self, name: str | None = None,
                 readbuflen: int = DEFAULT_READBUFLEN) -> None:
        AsyncProtocol.__init__(self, name, readbuflen=readbuflen)
        Events.__init__(self)
        self._greeting: Message | None = None
        self._oob_enabled = False
        # Whether the session being opened reads a greeting and
        # negotiates: set by the call that opens it, in the loop thread.
        self._expect_greeting = True
        self._expect_negotiation = True
        # Private ids; next() on a count is atomic, so any thread may
        # build commands.
        self._ids = itertools.count(1)
        # In flight: id key -> (where its reply goes, the command sent).
        self._pending: dict[object, tuple[ReplySink, Command]] = {}
        # Replies routed and not yet handed over (see _end_of_batch).
        self._answered: list[tuple[ReplySink, Exchange]] = []
        # Ids whose callers gave up; their late replies are dropped quietly.
        self._abandoned: set[object] = set()

    @property
    def greeting(self) -> Message | None:
        """The greeting of the current (or last) session, or None."""
        return self._greeting

    @property
    def oob_enabled(self) -> bool:
        """True when this session negotiated out-of-band execution."""
        return self._oob_enabled

    # ------------------------------------------------------------------
    # Commands; all run in the loop thread.

    @classmethod
    def make_execute_msg(cls, cmd: str,
                         arguments: Mapping[str, object] | None = None,
                         *, oob: bool = False) -> Message:
        """
        Build a command message (any thread).

        :param cmd: The command name.
        :param arguments: Its arguments, if any.
        :param oob: Build an ``exec-oob`` (out-of-band) command.
        :raise TypeError: When `cmd` is not a string or `arguments` not a
            mapping.
        """
        _check_command(cmd, arguments)
        msg = Message({"exec-oob" if oob else "execute": cmd})
        if arguments is not None:
            msg["arguments"] = arguments
        return msg

    def command(self, cmd: str,
                arguments: Mapping[str, object] | None = None,
                *, oob: bool = False) -> Command:
        """
        Any thread: build, check and serialise a command with a private
        id, ready for `submit`.

        :raise TypeError: For a name that is not a string, arguments that
            are not a mapping or not JSON-serialisable, or a key that is
            not a string at any depth.
        :raise ValueError: For NaN, infinity, circular references or
            nesting too deep to encode.
        """
        _check_command(cmd, arguments)
        data: dict[str, object] = {"exec-oob" if oob else "execute": cmd}
        if arguments is not None:
            data["arguments"] = arguments
            return self._finish_command(data, cmd, oob, None)
        # The common case, without arguments, spelled out: what encode()
        # would write, at a fraction of the cost.
        key = f"{_ID_PREFIX}{next(self._ids)}"
        data["id"] = key
        wire = b"".join((
            b'{"exec-oob":' if oob else b'{"execute":',
            _json_string(cmd).encode("ascii"), b',"id":',
            _json_string(key).encode("ascii"), b"}\n"))
        return Command.made(data, wire, cmd, oob, key, own_id=False)

    def command_from(self, msg: Mapping[str, object]) -> Command:
        """
        Any thread: check and serialise a caller-built command message
        (``execute`` or ``exec-oob``, ``arguments``, and an ``id`` of the
        caller's own if any, else a private one), ready for `submit`.
        `msg` itself is not modified.

        :raise: As `command`; also `ValueError` for a message that is not
            a command, or an id in the client's reserved form.
        """
        if not isinstance(msg, Mapping):
            raise TypeError("a command message is a mapping, not "
                            f"{type(msg).__name__}")
        has_exec, has_oob = "execute" in msg, "exec-oob" in msg
        if has_exec == has_oob:
            raise ValueError("a command message needs exactly one of "
                             "'execute' and 'exec-oob'")
        name = msg["execute" if has_exec else "exec-oob"]
        _check_command(name, msg.get("arguments"))
        assert isinstance(name, str)
        data = dict(msg)
        own_id = None
        if "id" in data:
            own_id = _id_key(data["id"])
            if isinstance(own_id, str) and own_id.startswith(_ID_PREFIX):
                raise ValueError(f"ids starting with {_ID_PREFIX!r} are "
                                 "reserved for the client")
        return self._finish_command(data, name, has_oob, own_id)

    def _finish_command(self, data: dict[str, object], name: str,
                        oob: bool, own_id: object | None) -> Command:
        """Any thread: give `data` its id unless it has one (`own_id`),
        serialise it, and make it a `Command`."""
        if own_id is None:
            key: object = f"{_ID_PREFIX}{next(self._ids)}"
            data["id"] = key
        else:
            key = own_id
        return Command.made(data, encode(data) + b"\n", name, oob, key,
                            own_id=own_id is not None)

    async def execute(self, cmd: str,
                      arguments: Mapping[str, object] | None = None,
                      *, oob: bool = False) -> object:
        """
        Execute a command and return its ``return`` value.

        :param cmd: The command name.
        :param arguments: Its arguments, if any.
        :param oob: Execute it out of band (the session must have
            negotiated 'oob', and the command must allow it).
        :raise ExecuteError: When the server answers with an error.
        :raise ExecInterruptedError: When the connection ends first.
        :raise StateError: When the client is not RUNNING.
        :raise TypeError: For arguments that are not JSON-serialisable
            or of the wrong type; nothing is sent.
        :raise ValueError: For an 'oob' command on a session without
            out-of-band execution, or arguments nested too deeply;
            nothing is sent.
        :raise BadReplyError: When the reply is malformed.
        """
        return reply_value(
            *await self._exchange(self.command(cmd, arguments, oob=oob)))

    async def execute_msg(self, msg: Mapping[str, object]) -> object:
        """
        Execute a caller-built command message; return its ``return``.

        The message needs ``execute`` or ``exec-oob`` and may carry
        ``arguments`` and its own ``id`` (any JSON value not in flight
        already); without one it gets a private id. `msg` itself is not
        modified.

        :raise: As `execute`; also `ValueError` for a message that is not
            a command or an id already in flight.
        """
        return reply_value(*await self._exchange(self.command_from(msg)))

    async def execute_reply(self, msg: Mapping[str, object]) -> Message:
        """
        Execute a command message; return the whole reply, error replies
        included (nothing raised for them).

        A private id added to `msg` is removed from the reply; an id the
        caller gave stays.

        :raise: As `execute_msg`, except `ExecuteError`.
        """
        return reply_message(*await self._exchange(self.command_from(msg)))

    # ------------------------------------------------------------------
    # Sending commands; all run in the loop thread.

    async def _exchange(self, command: Command) -> Exchange:
        """
        Runs in the loop thread: send a command, await its reply; return
        both (the command as sent, and the reply).
        """
        future: asyncio.Future[Exchange] = (
            asyncio.get_running_loop().create_future())
        withdraw = self.submit(command, future)
        try:
            return await future
        except asyncio.CancelledError:
            withdraw()
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                # The session ended just as the caller gave up: mark the
                # error as seen, or asyncio logs it as never retrieved.
                future.exception()
            raise

    def submit(self, command: Command,
               sink: ReplySink) -> Callable[[], None]:
        """
        Runs in the loop thread: send `command` (from `command` or
        `command_from`) without waiting for its reply.

        `sink` gets the command and its reply (whatever it says), or
        `ExecInterruptedError` when the session ends first. Returns the
        function to call when the caller stops waiting (cancelled, timed
        out, interrupted): a command not yet written is withdrawn and
        never sent; one already written is forgotten, and its late reply
        dropped quietly. Either way `sink` is left alone.

        :raise StateError: When the client is not RUNNING.
        :raise ValueError: For an 'oob' command on a session without
            out-of-band execution, or an id already in flight.
        :raise QMPError: When called from another thread than the loop's.
        """
        # The runstate check is inline, not @require: this is the hot path.
        state = self._runstate
        if state is not Runstate.RUNNING:
            raise_state_error(self, Runstate.RUNNING, state)
        self._check_loop_thread("execute()")
        if command.oob and not self._oob_enabled:
            raise ValueError(
                f"cannot run {command.name!r} out of band: this session "
                "did not negotiate the 'oob' capability")
        key = command.key
        if key in self._pending:
            raise ValueError(f"id {command['id']!r} is already in flight")
        self._pending[key] = (sink, command)
        self._enqueue(command)
        return partial(self._give_up, command, sink)

    def _give_up(self, command: Command, sink: ReplySink) -> None:
        """Runs in the loop thread: see `submit`."""
        key = command.key
        entry = self._pending.get(key)
        if entry is None or entry[0] is not sink:
            return  # answered, or the session ended, meanwhile
        del self._pending[key]
        if not self._withdraw(command):
            self._abandoned.add(key)

    @require(Runstate.RUNNING)
    def send_fd_scm(self, fd: int) -> None:
        """
        Pass file descriptor `fd` to the server (SCM_RIGHTS).

        The server keeps it for the next command that takes a passed fd,
        e.g. ``getfd`` or ``add-fd``. Runs in the loop thread only.

        :raise StateError: When the client is not RUNNING.
        :raise TypeError: When `fd` is not an int.
        :raise QMPError: When the connection is not a plain unix socket,
            a message is still being written, or the call comes from
            another thread than the loop's.
        :raise OSError: When `fd` is not an open file descriptor.
        """
        if isinstance(fd, bool) or not isinstance(fd, int):
            raise TypeError(f"fd must be an int, not {fd!r}")
        self._check_loop_thread("send_fd_scm()")
        assert self._writer is not None
        transport = self._writer.transport
        sock = transport.get_extra_info("socket")
        if (sock is None or sock.family != socket.AF_UNIX
                or transport.get_extra_info("sslcontext") is not None):
            raise QMPError("send_fd_scm() needs a plain unix socket "
                           "connection")
        if transport.get_write_buffer_size():
            # Our byte would land in the middle of a partly written
            # message.
            raise QMPError("send_fd_scm(): a message is still being "
                           "written; try again")
        os.fstat(fd)  # OSError now for a bad fd, not after the dup below
        fds = array.array("i", [fd])
        # A duplicate of the transport's socket: a real socket.socket
        # whose sendmsg() we may call, and closing it leaves ours open.
        with socket.fromfd(sock.fileno(), socket.AF_UNIX,
                           socket.SOCK_STREAM) as dup:
            dup.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  fds.tobytes())])

    # ------------------------------------------------------------------
    # Opening a session: as the base class, with negotiation per call.

    @require(Runstate.IDLE)
    async def connect(self, address: SocketAddr | socket.socket,
                      ssl: SSLContext | None = None, *,
                      retry_until: float | None = None,
                      negotiate: bool | None = None) -> None:
        """
        Connect to a server, read its greeting, negotiate capabilities.

        :param negotiate: False to skip the greeting and negotiation for
            this session (qemu-ga has neither), True to do both; None
            follows `await_greeting` and `negotiate`.
        :raise: As `AsyncProtocol.connect`.
        """
        self._set_handshake(negotiate)
        await super().connect(address, ssl, retry_until=retry_until)

    @require(Runstate.IDLE)
    async def open_with_socket(self, sock: socket.socket, *,
                               negotiate: bool | None = None) -> None:
        """
        Start the session on an already-connected socket, as `connect`.

        :raise: As `AsyncProtocol.open_with_socket`.
        """
        self._set_handshake(negotiate)
        await super().open_with_socket(sock)

    @require(Runstate.CONNECTING)
    async def accept(self, *, negotiate: bool | None = None) -> None:
        """
        Take the peer's connection to the socket `start_server` opened,
        then greeting and negotiation as in `connect`.

        :raise: As `AsyncProtocol.accept`.
        """
        self._set_handshake(negotiate)
        await super().accept()

    def _set_handshake(self, negotiate: bool | None) -> None:
        """Runs in the loop thread, in the opening call's first step
        (atomically with its runstate check): fix this session's
        handshake."""
        if negotiate is None:
            self._expect_negotiation = self.negotiate
            self._expect_greeting = self.await_greeting or self.negotiate
        else:
            self._expect_greeting = self._expect_negotiation = negotiate

    # ------------------------------------------------------------------
    # Session and message hooks; all run in the loop thread.

    async def _establish_session(self) -> None:
        """Runs in the loop thread: greeting and negotiation on the bare
        stream, then the reader and writer tasks."""
        self._greeting = None
        self._oob_enabled = False
        self._pending = {}
        self._answered = []
        self._abandoned = set()
        if self._expect_greeting:
            self._greeting = await self._greeting_in_time()
        if self._expect_negotiation:
            await self._negotiate()
        await super()._establish_session()

    async def _greeting_in_time(self) -> Message:
        """Runs in the loop thread: `_get_greeting` within
        `greeting_timeout`."""
        limit = self.greeting_timeout
        try:
            return await asyncio.wait_for(self._get_greeting(), limit)
        except asyncio.TimeoutError:
            raise GreetingError(
                f"the server accepted the connection but sent no greeting "
                f"within {limit:g} s: another client probably holds this "
                "monitor (QEMU serves one client per monitor, and greets "
                "the next only when that one leaves); close it, or raise "
                "greeting_timeout (None waits for ever)") from None

    async def _get_greeting(self) -> Message:
        """Runs in the loop thread: read and check the greeting. Events
        that come before it go to the listeners: QEMU can broadcast one
        (RESUME, as it starts) to a connection it has accepted but not
        yet greeted."""
        while True:
            try:
                msg = await self._recv()
            except EOFError as err:
                raise GreetingError("the server closed the connection "
                                    "instead of greeting") from err
            if "event" not in msg or "QMP" in msg:
                break
            self._dispatch_event(msg)
            self._flush_listeners()
        qmp = msg.get("QMP")
        if not isinstance(qmp, dict):
            raise GreetingError(f"expected a greeting, got {_preview(msg)}",
                                msg)
        if not isinstance(qmp.get("version"), dict):
            raise GreetingError("greeting has no 'version' object", msg)
        if not isinstance(qmp.get("capabilities"), list):
            raise GreetingError("greeting has no 'capabilities' list", msg)
        return msg

    async def _negotiate(self) -> None:
        """Runs in the loop thread: send ``qmp_capabilities``, enabling
        'oob' when the greeting offers it."""
        offered = []
        if self._greeting is not None:
            qmp = self._greeting["QMP"]
            assert isinstance(qmp, dict)
            offered = qmp["capabilities"]
        enable = ["oob"] if "oob" in offered else []
        msg = Message({"execute": "qmp_capabilities",
                       "id": _NEGOTIATION_ID})
        if enable:
            msg["arguments"] = {"enable": enable}
        await self._send(msg)
        try:
            reply = await self._recv()
        except EOFError as err:
            raise GreetingError("the server closed the connection during "
                                "negotiation") from err
        if "QMP" in reply:
            raise NegotiationError(
                "the server greeted again instead of answering "
                "qmp_capabilities (QEMU 7.2 can, to a client that connects "
                "while it is still starting): connect again", reply)
        if reply.get("id") != _NEGOTIATION_ID or "return" not in reply:
            error = reply.get("error")
            desc = error.get("desc") if isinstance(error, dict) else None
            raise NegotiationError(
                f"qmp_capabilities failed: {desc}" if desc else
                f"unexpected reply to qmp_capabilities: {_preview(reply)}",
                reply)
        self._oob_enabled = bool(enable)

    async def _do_recv(self) -> Message:
        """Runs in the loop thread: read one line, parse one message."""
        return self._parse_line(await self._readline())

    @staticmethod
    def _parse_line(line: bytes) -> Message:
        """Any thread: the message in one line from the server.

        :raise ServerParseError: For an unfinished line, malformed JSON,
            or JSON that is not an object.
        """
        if not line.endswith(b"\n"):
            raise ServerParseError(
                "the server closed the connection in the middle of a "
                f"message ({len(line)} bytes received)", line)
        try:
            obj = decode(line)
        except ValueError as err:
            raise ServerParseError(
                f"malformed JSON from the server ({err}): {_preview(line)}",
                line) from err
        if type(obj) is not dict:
            raise ServerParseError(
                f"the server sent a JSON {type(obj).__name__}, not an "
                f"object: {_preview(line)}", line)
        return Message.adopt(obj)

    def _do_send(self, msg: Message) -> None:
        """Runs in the loop thread: write one message and its newline."""
        assert self._writer is not None
        if isinstance(msg, Command):
            self._writer.write(msg.wire)
        else:
            self._writer.write(bytes(msg) + b"\n")

    def _handle_line(self, line: bytes) -> None:
        """Runs in the loop thread (push reader): parse and route one
        line; see `AsyncProtocol._handle_line`."""
        self._route(self._cb_inbound(self._parse_line(line)))

    def _end_of_batch(self) -> None:
        """Runs in the loop thread (push reader): wake the threads that
        wait for the events and the replies of the chunk just handled;
        the repliers last, as the last thing before the loop goes idle,
        so that a woken caller rarely has to wait for the loop thread to
        let go of the interpreter."""
        self._flush_listeners()
        self._deliver_answers()

    async def _on_message(self, msg: Message) -> None:
        """Runs in the reader task (the task-based reader): route one
        message; blocking listeners are woken once the reader has
        handled what it has read so far."""
        self._route(msg)
        self._deliver_answers()
        self._schedule_flush()

    def _route(self, msg: Message) -> None:
        """Runs in the loop thread: route a reply to its caller, an event
        to the listeners."""
        data = msg.data  # the dict itself: Message's `in` is Python code
        if "event" in data:
            self._dispatch_event(msg)
            return
        if "id" not in data:
            if ("QMP" in msg and self._greeting is None
                    and not self._expect_greeting):
                # A greeting nobody waited for (negotiate=False, to a
                # server that greets after all): keep it, it is no fault.
                self._greeting = msg
                return
            if "error" in msg:
                # An id-less error means the server could not parse a
                # command, so it cannot say which: no reply can be
                # trusted to match its command any more.
                error = msg["error"]
                desc = error.get("desc") if isinstance(error, dict) else None
                raise ServerParseError(
                    f"the server could not parse a command: {desc}", msg)
            raise BadReplyError("unexpected message from the server", msg)
        key = _id_key(data["id"])
        entry = self._pending.pop(key, None)
        if entry is None:
            if key in self._abandoned:
                self._abandoned.discard(key)
                self.logger.debug("Dropping the late reply to id %r",
                                  msg["id"])
            else:
                self.logger.warning("Dropping a reply with unknown id %r",
                                    msg["id"])
            return
        sink, sent = entry
        self._answered.append((sink, (sent, msg)))

    def _deliver_answers(self) -> None:
        """Runs in the loop thread: hand the replies routed so far to
        their callers."""
        answered, self._answered = self._answered, []
        for sink, exchange in answered:
            sink.set_result(exchange)

    def _on_session_end(self, error: BaseException | None) -> None:
        """Runs in the loop thread: hand over the replies that came, end
        every other command in flight with `ExecInterruptedError` at
        once."""
        self._deliver_answers()
        reason = ("the client disconnected" if error is None
                  else describe_end(error))
        pending, self._pending = self._pending, {}
        for sink, sent in pending.values():
            name = sent.get("execute") or sent.get("exec-oob")
            exc = ExecInterruptedError(
                f"{name!r} was interrupted: {reason}")
            exc.__cause__ = error
            sink.set_exception(exc)
        self._end_listeners()
