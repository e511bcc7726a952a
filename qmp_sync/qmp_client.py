"""
`QMPClient`: the asyncio QMP client.

It reads and checks the server's greeting, negotiates capabilities
(enabling out-of-band execution when the server offers it), gives every
command an id, routes each reply to the coroutine that sent the command
and every event to the registered listeners. When the connection ends,
every command still in flight ends at once with `ExecInterruptedError`,
whose ``__cause__`` is what ended it.

Threads: everything here runs in the loop thread.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Mapping
from functools import partial
from typing import Callable, Protocol

from .error import ProtocolError, QMPError
from .events import Events
from .message import Message
from .protocol import (
    DEFAULT_READBUFLEN,
    AsyncProtocol,
    Runstate,
    peer_hung_up,
    raise_state_error,
    require,
)

__all__ = (
    "BadReplyError",
    "ExecInterruptedError",
    "ExecuteError",
    "GreetingError",
    "NegotiationError",
    "QMPClient",
    "ReplySink",
    "ServerParseError",
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


class _SentCommand(Message):
    """
    A command as the client sends it: serialised once, when created, so
    that a value that is not JSON fails in the caller, before anything
    is sent, and the writer sends these very bytes. The client owns it
    and never changes it afterwards.
    """

    def __init__(self, msg: Message) -> None:
        self.data = msg.data
        self.wire = Message.__bytes__(self)

    def __bytes__(self) -> bytes:
        return self.wire


#: A command as sent (with its id) and the server's reply to it.
Exchange = tuple[Message, Message]


class ReplySink(Protocol):
    """
    Where `QMPClient._submit` delivers the outcome of one command: an
    `asyncio.Future` in the loop, or ``qmp_sync._loop.Reply`` for a
    caller in another thread. Both methods are called in the loop
    thread, at most once in all, and must not block.
    """

    def set_result(self, result: Exchange, /) -> None:
        """The command and its reply, whatever the reply says."""

    def set_exception(self, exception: BaseException, /) -> None:
        """The command ended without a reply (`ExecInterruptedError`)."""


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
    `listener`.

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

    def __init__(self, name: str | None = None,
                 readbuflen: int = DEFAULT_READBUFLEN) -> None:
        AsyncProtocol.__init__(self, name, readbuflen=readbuflen)
        Events.__init__(self)
        self._greeting: Message | None = None
        self._oob_enabled = False
        self._next_id = 0
        # In flight: id key -> (where its reply goes, the command sent).
        self._pending: dict[object, tuple[ReplySink, Message]] = {}
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
        Build a command message.

        :param cmd: The command name.
        :param arguments: Its arguments, if any.
        :param oob: Build an ``exec-oob`` (out-of-band) command.
        :raise TypeError: When `cmd` is not a string or `arguments` not a
            mapping.
        """
        if not isinstance(cmd, str):
            raise TypeError(f"command name must be a str, not {cmd!r}")
        msg = Message({"exec-oob" if oob else "execute": cmd})
        if arguments is not None:
            if not isinstance(arguments, Mapping):
                raise TypeError("arguments must be a mapping, not "
                                f"{type(arguments).__name__}")
            msg["arguments"] = arguments
        return msg

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
            out-of-band execution; nothing is sent.
        :raise BadReplyError: When the reply is malformed.
        """
        return await self.execute_msg(
            self.make_execute_msg(cmd, arguments, oob=oob))

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
        return self._reply_value(*await self._exchange(msg))

    async def execute_reply(self, msg: Mapping[str, object]) -> Message:
        """
        Execute a command message; return the whole reply, error replies
        included (nothing raised for them).

        A private id added to `msg` is removed from the reply; an id the
        caller gave stays.

        :raise: As `execute_msg`, except `ExecuteError`.
        """
        return self._reply_message(*await self._exchange(msg))

    # ------------------------------------------------------------------
    # Reading replies; pure functions of the messages, safe in any thread.

    @classmethod
    def _reply_value(cls, sent: Message, reply: Message) -> object:
        """
        Any thread: the ``return`` value of `reply` to `sent`.

        :raise ExecuteError: For an error reply.
        :raise BadReplyError: For a malformed reply.
        """
        if "return" in reply and "error" not in reply:
            return reply["return"]
        if "error" in reply and "return" not in reply:
            cls._check_error(reply, sent)
            raise ExecuteError(sent, reply)
        raise BadReplyError("reply has neither or both of 'return' and "
                            "'error'", reply, sent)

    @staticmethod
    def _reply_message(sent: Message, reply: Message) -> Message:
        """
        Any thread: `reply` as the caller of `execute_reply` sees it, that
        is without the id the client gave `sent` (an id of the caller's
        own stays).
        """
        key = sent.get("id")
        if isinstance(key, str) and key.startswith(_ID_PREFIX):
            return Message._wrap(
                {k: v for k, v in reply.items() if k != "id"})
        return reply

    # ------------------------------------------------------------------
    # Sending commands; all run in the loop thread.

    async def _exchange(self, msg: Mapping[str, object]) -> Exchange:
        """
        Runs in the loop thread: send a command, await its reply; return
        both (the sent message with its id, and the reply).
        """
        future: asyncio.Future[Exchange] = (
            asyncio.get_running_loop().create_future())
        abandon = self._submit(msg, future)
        try:
            return await future
        except asyncio.CancelledError:
            abandon()
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                # The session ended just as the caller gave up: mark the
                # error as seen, or asyncio logs it as never retrieved.
                future.exception()
            raise

    def _submit(self, msg: Mapping[str, object],
                sink: ReplySink) -> Callable[[], None]:
        """
        Runs in the loop thread: check and send a command without
        waiting for its reply.

        `sink` gets the command as sent and its reply (whatever it
        says), or `ExecInterruptedError` when the session ends first.
        Returns the function to call if the caller stops waiting
        (cancelled, timed out): it forgets the command, whose late reply
        will then be dropped quietly, and leaves `sink` alone.

        :raise: As `execute_msg`, before anything is sent.
        """
        # The runstate check is inline, not @require: this is the hot path.
        if self._runstate is not Runstate.RUNNING:
            raise_state_error(self, Runstate.RUNNING)
        self._check_loop_thread("execute()")
        sent, key = self._prepare(msg)
        self._pending[key] = (sink, sent)
        self._enqueue(sent)
        return partial(self._abandon, key, sink)

    def _abandon(self, key: object, sink: ReplySink) -> None:
        """Runs in the loop thread: see `_submit`."""
        entry = self._pending.get(key)
        if entry is not None and entry[0] is sink:
            del self._pending[key]
            self._abandoned.add(key)

    def _prepare(self, msg: Mapping[str, object]) -> tuple[Message, object]:
        """
        Runs in the loop thread: check a command message, give it an id
        and serialise it once, so that every caller error is raised here
        before anything is sent. Returns (message to send, id key).
        """
        if not isinstance(msg, Mapping):
            raise TypeError("a command message is a mapping, not "
                            f"{type(msg).__name__}")
        has_exec, has_oob = "execute" in msg, "exec-oob" in msg
        if has_exec == has_oob:
            raise ValueError("a command message needs exactly one of "
                             "'execute' and 'exec-oob'")
        name = msg["execute" if has_exec else "exec-oob"]
        if not isinstance(name, str):
            raise TypeError(f"command name must be a str, not {name!r}")
        if has_oob and not self._oob_enabled:
            raise ValueError(
                f"cannot run {name!r} out of band: this session did not "
                "negotiate the 'oob' capability")
        arguments = msg.get("arguments")
        if arguments is not None and not isinstance(arguments, Mapping):
            raise TypeError(f"arguments of {name!r} must be a mapping, not "
                            f"{type(arguments).__name__}")
        sent = Message(msg)
        if "id" in msg:
            key = _id_key(msg["id"])
            if isinstance(key, str) and key.startswith(_ID_PREFIX):
                raise ValueError(f"ids starting with {_ID_PREFIX!r} are "
                                 "reserved for the client")
            if key in self._pending:
                raise ValueError(f"id {msg['id']!r} is already in flight")
        else:
            self._next_id += 1
            key = f"{_ID_PREFIX}{self._next_id}"
            sent["id"] = key
        return _SentCommand(sent), key

    @staticmethod
    def _check_error(reply: Message, sent: Message) -> None:
        """Raise `BadReplyError` unless ``reply['error']`` is well-formed."""
        error = reply["error"]
        if not (isinstance(error, dict)
                and isinstance(error.get("class"), str)
                and isinstance(error.get("desc"), str)):
            raise BadReplyError("malformed error object in reply", reply,
                                sent)

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

    async def _open_session(self, negotiate: bool,
                            opening: Callable[..., Awaitable[None]],
                            *args: object) -> None:
        """
        Runs in the loop thread: await ``opening(*args)`` (this client's
        `connect`, `accept` or `open_with_socket`) with negotiation on or
        off for this session. Off also skips the greeting: qemu-ga sends
        none. The caller makes sure no other opening runs meanwhile.
        """
        self.await_greeting = self.negotiate = negotiate
        await opening(*args)

    # ------------------------------------------------------------------
    # Session and message hooks; all run in the loop thread.

    async def _establish_session(self) -> None:
        """Runs in the loop thread: greeting and negotiation on the bare
        stream, then the reader and writer tasks."""
        self._greeting = None
        self._oob_enabled = False
        self._pending = {}
        self._abandoned = set()
        if self.await_greeting or self.negotiate:
            self._greeting = await self._get_greeting()
        if self.negotiate:
            await self._negotiate()
        await super()._establish_session()

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
        msg = self.make_execute_msg(
            "qmp_capabilities", {"enable": enable} if enable else None)
        msg["id"] = _NEGOTIATION_ID
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
        line = await self._readline()
        if not line.endswith(b"\n"):
            raise ServerParseError(
                "the server closed the connection in the middle of a "
                f"message ({len(line)} bytes received)", line)
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise ServerParseError(
                f"malformed JSON from the server ({err}): {_preview(line)}",
                line) from err
        if type(obj) is not dict:
            raise ServerParseError(
                f"the server sent a JSON {type(obj).__name__}, not an "
                f"object: {_preview(line)}", line)
        return Message._wrap(obj)

    def _do_send(self, msg: Message) -> None:
        """Runs in the loop thread: write one message and its newline."""
        assert self._writer is not None
        self._writer.write(bytes(msg) + b"\n")

    async def _on_message(self, msg: Message) -> None:
        """Runs in the reader task: route a reply to its caller, an event
        to the listeners."""
        if "event" in msg:
            self._dispatch_event(msg)
            return
        if "id" not in msg:
            if ("QMP" in msg and self._greeting is None
                    and not (self.await_greeting or self.negotiate)):
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
        key = _id_key(msg["id"])
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
        sink.set_result((sent, msg))

    def _on_session_end(self, error: BaseException | None) -> None:
        """Runs in the loop thread: end every command in flight with
        `ExecInterruptedError` at once."""
        if error is None:
            reason = "the client disconnected"
        elif isinstance(error, EOFError):
            reason = "the server closed the connection"
        elif peer_hung_up(error):
            reason = f"the server closed the connection ({error})"
        else:
            reason = str(error) or type(error).__name__
        pending, self._pending = self._pending, {}
        for sink, sent in pending.values():
            name = sent.get("execute") or sent.get("exec-oob")
            exc = ExecInterruptedError(
                f"{name!r} was interrupted: {reason}")
            exc.__cause__ = error
            sink.set_exception(exc)
        self._end_listeners()
