"""
The generic asyncio core: one message-based, full-duplex connection.

`AsyncProtocol` knows nothing of QMP. It opens a stream (as a client, as
a one-shot server, or on a socket it is handed), runs one reader task
and one writer task for the whole session, hands each inbound message
to `_on_message`, and tears the session down when asked to or when
either task fails. Subclasses say what a message is by implementing
`_do_recv` and `_do_send`.

Threads: everything here runs in the thread that runs the event loop
(the *loop thread*). Nothing in this module is thread-safe and nothing
blocks; the blocking facade reaches it only through ``qmp_sync._loop``.

Runstates: IDLE -> CONNECTING -> RUNNING -> DISCONNECTING -> IDLE. A
connect or accept that fails, is cancelled or times out always returns
to IDLE. A session that ends by itself (the peer hung up, or a task
failed) waits in DISCONNECTING until `disconnect()` collects it; that
call re-raises the failure, once.

Lifetime: ``async with`` disconnects when the block is left. A protocol
garbage-collected while not IDLE warns with a `ResourceWarning` that
names it, and aborts its stream when that happens in the loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import inspect
import logging
import os
import re
import socket
import time
import warnings
import weakref
from collections.abc import Awaitable, Coroutine
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Generic,
    NoReturn,
    TypeVar,
    Union,
    cast,
)

from ._linereader import LineReader, LineTooLong, PushTarget
from .error import ProtocolError, QMPError
from .util import cancel_and_wait, exception_summary, format_size

if TYPE_CHECKING:
    from ssl import SSLContext
    from types import TracebackType

    from typing_extensions import Self

__all__ = (
    "DEFAULT_READBUFLEN",
    "AsyncProtocol",
    "ConnectError",
    "MessageTooLargeError",
    "Runstate",
    "SocketAddr",
    "SocketAddrT",
    "StateError",
    "describe_end",
    "disconnect_quietly",
    "naming_address",
    "peer_hung_up",
    "require",
)

T = TypeVar("T")

#: Default longest message accepted from the peer, in bytes (10 MiB).
DEFAULT_READBUFLEN = 10 * 1024 * 1024

#: A TCP address, ``(host, port)``.
InternetAddr = tuple[str, int]
#: A unix socket path.
UnixAddr = Union[str, "os.PathLike[str]"]
#: Anything `AsyncProtocol.connect` and `start_server` take as an address.
SocketAddr = Union[UnixAddr, InternetAddr]
#: The same, under the name ``qemu.qmp`` gives it.
SocketAddrT = SocketAddr


class Runstate(enum.Enum):
    """
    Where a connection is in its life: IDLE (nothing open; ready to
    connect), CONNECTING (opening the stream, listening, or establishing
    the session), RUNNING (messages flow both ways), DISCONNECTING (the
    session is ending, or has ended and waits for `disconnect()`).
    """

    IDLE = 0
    CONNECTING = 1
    RUNNING = 2
    DISCONNECTING = 3


class ConnectError(QMPError):
    """
    Connecting (or accepting) failed; the client is back in IDLE.

    :param error_message: Which phase failed, in words.
    :param exc: The root cause (usually `OSError`, `EOFError` or a
        `ProtocolError`); also chained as ``__cause__``.
    """

    def __init__(self, error_message: str, exc: Exception):
        super().__init__(error_message, exc)
        #: Which phase failed, in words.
        self.error_message = error_message
        #: The root cause.
        self.exc = exc

    def __str__(self) -> str:
        cause = str(self.exc) or type(self.exc).__name__
        return f"{self.error_message}: {cause}"


class StateError(QMPError):
    """
    A call was made in a runstate that does not allow it.

    :param error_message: What was wrong, in words.
    :param state: The runstate at the time of the call.
    :param required: The runstate the call needs.
    """

    def __init__(self, error_message: str, state: Runstate,
                 required: Runstate):
        super().__init__(error_message)
        #: What was wrong, in words.
        self.error_message = error_message
        #: The runstate at the time of the call.
        self.state = state
        #: The runstate the call needs.
        self.required = required

    def __str__(self) -> str:
        return (f"{self.error_message} (runstate {self.state.name}; this "
                f"call needs {self.required.name})")


class MessageTooLargeError(ProtocolError):
    """
    The peer sent a message longer than the read limit.

    :param limit: The read limit in bytes (``readbuflen``).
    """

    def __init__(self, limit: int):
        super().__init__(
            f"a message from the server exceeds the {format_size(limit)} "
            "read limit (raise readbuflen to accept it)")
        #: The read limit in bytes.
        self.limit = limit


# The seeds' words, which QEMU's own tests compare.
_STATE_WORDS = {
    Runstate.IDLE: "is disconnected and idle.",
    Runstate.CONNECTING: "is currently connecting.",
    Runstate.RUNNING: "is already connected and running.",
    Runstate.DISCONNECTING: (
        "is disconnecting. Call disconnect() to return to IDLE state."),
}

F = TypeVar("F", bound=Callable[..., Any])

#: Connection failures that ``connect(retry_until=...)`` retries: nobody
#: listens yet, the socket file does not exist yet, or its listen
#: backlog is full.
_NOT_THERE_YET = (ConnectionRefusedError, FileNotFoundError,
                  BlockingIOError)
#: Longest pause between two connection attempts, in seconds.
_RETRY_PAUSE = 0.1


def require(required: Runstate) -> Callable[[F], F]:
    """
    Decorator: allow a method to run only in the `required` runstate.

    For a coroutine method the check happens when the coroutine starts
    running, that is in the loop thread and atomically with the state
    change that follows it; for a plain method, at call time.

    :raise StateError: When the runstate is not `required`.
    """
    def check(proto: AsyncProtocol[Any]) -> None:
        state = proto.runstate
        if state is not required:
            raise_state_error(proto, required, state)

    def decorate(func: F) -> F:
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def async_wrapper(proto: AsyncProtocol[Any],
                                    *args: Any, **kwargs: Any) -> Any:
                check(proto)
                return await func(proto, *args, **kwargs)
            return cast(F, async_wrapper)

        @functools.wraps(func)
        def wrapper(proto: AsyncProtocol[Any], *args: Any,
                    **kwargs: Any) -> Any:
            check(proto)
            return func(proto, *args, **kwargs)
        return cast(F, wrapper)

    return decorate


def raise_state_error(proto: AsyncProtocol[Any], required: Runstate,
                      state: Runstate) -> NoReturn:
    """
    Any thread: raise the `StateError` for calling a method of `proto`
    that needs runstate `required` in runstate `state` (which the caller
    read once: another thread may change the runstate meanwhile, and the
    message must name the state the call saw).
    """
    name = proto.error_name or type(proto).__name__
    lost = proto._ended_by if state is Runstate.DISCONNECTING else None
    if lost is not None:
        raise StateError(
            f"{name} lost its connection to the server: "
            f"{describe_end(lost)}; call close() (or disconnect()), then "
            "connect again", state, required) from lost
    raise StateError(f"{name} {_STATE_WORDS[state]}", state, required)


# What a "HOST:PORT" string looks like (given where a path belongs).
_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]*\]|[^/\[\]:]+):[0-9]+")


def naming_address(error: OSError, address: str) -> OSError:
    """
    Any thread: `error` (from connecting to `address`) as an error of
    the same type whose text names the address, as ``open()`` names its
    file; a unix socket path that does not exist but looks like
    ``HOST:PORT`` gets a hint to pass a ``(host, port)`` tuple.
    """
    if error.errno is None or error.filename is not None:
        return error
    words = error.strerror or str(error)
    if isinstance(error, FileNotFoundError) and _HOST_PORT.fullmatch(
            address):
        host, _, port = address.rpartition(":")
        words += (" (that looks like HOST:PORT: for TCP, pass "
                  f"{(host.strip('[]'), int(port))!r})")
    return type(error)(error.errno, words, address)


async def disconnect_quietly(proto: AsyncProtocol[Any]) -> None:
    """
    Runs in the loop thread: `AsyncProtocol.disconnect`, logging (to
    the protocol's logger) instead of raising the failure it re-raises:
    for a half-built session torn down after a first error (the caller
    needs that one, not this), or a session whose owner is gone.
    """
    try:
        await proto.disconnect()
    except Exception as err:
        proto.logger.debug("disconnect() ended with: %s",
                           exception_summary(err))


def describe_end(error: BaseException) -> str:
    """Any thread: why a session ended, in words, for messages."""
    if isinstance(error, EOFError):
        return "the server closed the connection"
    if peer_hung_up(error):
        return f"the server closed the connection ({error})"
    return str(error) or type(error).__name__


def peer_hung_up(error: BaseException) -> bool:
    """
    True when `error` only means the peer went away: end of stream, or
    a reset or broken pipe (what a killed peer with unread data in its
    socket causes instead of a plain end of stream).
    """
    return isinstance(error, (EOFError, ConnectionResetError,
                              BrokenPipeError))


def _check_address(address: object) -> None:
    """Raise `TypeError` unless `address` is something we can open."""
    if isinstance(address, (str, os.PathLike, socket.socket)):
        return
    if (isinstance(address, tuple) and len(address) == 2
            and isinstance(address[0], str) and isinstance(address[1], int)):
        return
    raise TypeError(
        "address must be a unix socket path, a (host, port) tuple or a "
        f"connected socket.socket, not {address!r}")


class AsyncProtocol(Generic[T]):
    """
    A generic, full-duplex, message-based connection, run by asyncio.

    Subclasses implement `_do_recv` and `_do_send`, and may extend
    `_establish_session`, `_on_message`, `_on_session_end`,
    `_cb_inbound` and `_cb_outbound`.

    :param name: A nickname for logs and ``repr``; messages of a named
        connection go to the child logger ``<module>.<name>``.
    :param readbuflen: The longest message accepted from the peer, in
        bytes; a longer one ends the session with `MessageTooLargeError`.
        Takes effect at the next connect.
    :raise ValueError: If `readbuflen` is not positive.
    """

    #: The logger of this class; a named instance logs to a child of it.
    logger = logging.getLogger(__name__)

    #: The class name that error messages give: None for this class's
    #: own; a facade that wraps the client sets its name, the one its
    #: users called. Such a facade owns the client: garbage-collected
    #: while open, the client leaves the `ResourceWarning` to it.
    error_name: str | None = None

    #: How long closing the stream may take before it is aborted.
    _close_timeout = 5.0

    def __init__(self, name: str | None = None, *,
                 readbuflen: int = DEFAULT_READBUFLEN) -> None:
        if readbuflen <= 0:
            raise ValueError(f"readbuflen must be positive, not {readbuflen}")
        #: The nickname of this connection, if any.
        self.name = name
        if name is not None:
            self.logger = self.logger.getChild(name)
        #: The longest message accepted from the peer, in bytes.
        self.readbuflen = readbuflen

        self._runstate = Runstate.IDLE
        self._runstate_event: asyncio.Event | None = None
        self._runstate_loop: asyncio.AbstractEventLoop | None = None

        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        # Messages waiting for the writer task, oldest first; made for
        # each session, in its loop.
        self._outgoing: _Outgoing[T] | None = None
        # The loop of the current session; its objects belong to it.
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._dc_task: asyncio.Task[None] | None = None
        # The first failure of the session, re-raised once by disconnect().
        self._session_error: BaseException | None = None
        # Why the session began to end (None: disconnect() was called);
        # kept until the session is collected, for StateError messages.
        self._ended_by: BaseException | None = None

        # The task running the connect or accept in progress, if any.
        self._attempt_task: asyncio.Task[None] | None = None
        # Resolved once that attempt has fully unwound (RUNNING or IDLE).
        self._attempt_unwound: asyncio.Future[None] | None = None

        self._server: asyncio.AbstractServer | None = None
        self._server_path: str | None = None
        self._accepted: asyncio.Future[None] | None = None

        # The safety net for a connection dropped without disconnect():
        # what its finaliser needs, kept apart from self (see _dropped).
        self._remains = _Remains(self)
        weakref.finalize(self, _dropped, self._remains)

    def __repr__(self) -> str:
        name = f" name={self.name!r}" if self.name is not None else ""
        return f"<{type(self).__name__}{name} runstate={self._runstate.name}>"

    # ------------------------------------------------------------------
    # Public interface; every method runs in the loop thread.

    @property
    def runstate(self) -> Runstate:
        """The current `Runstate` of the connection."""
        return self._runstate

    async def runstate_changed(self) -> Runstate:
        """Wait for the runstate to change, then return the new one."""
        await self._get_runstate_event().wait()
        return self._runstate

    @require(Runstate.IDLE)
    async def connect(self, address: SocketAddr | socket.socket,
                      ssl: SSLContext | None = None, *,
                      retry_until: float | None = None) -> None:
        """
        Connect to a server and start the session.

        Cancel it (or wrap it in `asyncio.wait_for`), or call
        `disconnect()` from another task, to give up; either way the
        runstate returns to IDLE.

        :param address: A unix socket path, a ``(host, port)`` tuple, or
            an already-connected `socket.socket`, which the client owns
            from then on: it is closed at disconnect, or at once if the
            connect fails.
        :param ssl: A client-side `ssl.SSLContext` for TLS, if any.
        :param retry_until: Seconds during which a refused connection, a
            missing socket file or a full listen backlog is retried (the
            server is still starting), with pauses of up to 0.1 s; the
            runstate stays CONNECTING meanwhile, so `disconnect()` ends
            the retrying too. Not for a socket `address`.
        :raise StateError: When the runstate is not IDLE.
        :raise TypeError: When `address` is none of the above.
        :raise ConnectError: When the connection or the session cannot be
            established (after the retries, if any), or `disconnect()`
            was called meanwhile; ``.exc`` holds the root cause. The
            runstate is back to IDLE.
        """
        _check_address(address)
        await self._connect(address, ssl, retry_until)

    @require(Runstate.IDLE)
    async def open_with_socket(self, sock: socket.socket) -> None:
        """
        Start the session on an already-connected socket.

        The same as ``connect(sock)``: the connection owns the socket from
        now on and closes it at disconnect.

        :raise StateError: When the runstate is not IDLE.
        :raise TypeError: When `sock` is not a socket.
        :raise ConnectError: When the session cannot be established.
        """
        if not isinstance(sock, socket.socket):
            raise TypeError(f"expected a socket.socket, not {sock!r}")
        await self._connect(sock, None, None)

    @require(Runstate.IDLE)
    async def start_server(self, address: SocketAddr,
                           ssl: SSLContext | None = None) -> None:
        """
        Listen for one incoming connection; `accept` takes it.

        Returns as soon as the socket listens; the runstate is then
        CONNECTING. A unix socket file this call creates is removed
        again when listening stops. `disconnect()` stops listening.

        :param address: A unix socket path or a ``(host, port)`` tuple.
        :param ssl: A server-side `ssl.SSLContext` for TLS, if any.
        :raise StateError: When the runstate is not IDLE.
        :raise TypeError: When `address` is not an address.
        :raise ConnectError: When the socket cannot listen.
        """
        _check_address(address)
        if isinstance(address, socket.socket):
            raise TypeError("start_server() needs an address, not a socket")
        emsg = "Failed to establish connection"
        await self._attempt(
            self._session_guard(self._do_start_server(address, ssl), emsg),
            emsg)

    @require(Runstate.CONNECTING)
    async def accept(self) -> None:
        """
        Wait for the peer to connect, then start the session.

        Cancel it (or wrap it in `asyncio.wait_for`), or call
        `disconnect()` from another task, to give up; any failure or
        cancellation stops listening and returns to IDLE.

        :raise StateError: When the runstate is not CONNECTING.
        :raise QMPError: When `start_server` was not called first, or
            another connect or accept is in progress.
        :raise ConnectError: When the session cannot be established.
        """
        if self._accepted is None or self._attempt_task is not None:
            raise QMPError("accept() needs a start_server() call first, "
                           "and no other connect or accept in progress")
        await self._attempt(self._accept_phases(),
                            "Failed to accept a connection")

    @require(Runstate.CONNECTING)
    async def wait_for_peer(self) -> None:
        """
        Wait until a peer has connected to the listening socket, without
        taking the connection (`accept` does). Cancelling this wait
        leaves the socket listening, so a caller can wait within a
        deadline of its own and try again later.

        :raise StateError: When the runstate is not CONNECTING.
        :raise QMPError: When `start_server` was not called first.
        :raise ConnectError: When listening stops meanwhile (because
            `disconnect()` was called).
        """
        accepted = self._accepted
        if accepted is None:
            raise QMPError("accept() needs a start_server() call first")
        await asyncio.wait((accepted,))
        if accepted.cancelled():
            raise ConnectError("Failed to accept a connection", QMPError(
                "disconnect() was called while waiting for the peer"))

    @require(Runstate.IDLE)
    async def start_server_and_accept(
            self, address: SocketAddr,
            ssl: SSLContext | None = None) -> None:
        """
        `start_server` then `accept`, as one call.

        :raise StateError: When the runstate is not IDLE.
        :raise ConnectError: When listening or the session fails.
        """
        await self.start_server(address, ssl)
        await self.accept()

    async def disconnect(self) -> None:
        """
        End the session and return to IDLE; idempotent.

        Waits for the reader and writer tasks to stop and the stream to
        close. Messages queued but not yet written are dropped. Called
        while another task connects or accepts, it aborts that attempt
        (which raises `ConnectError`) and waits until it has unwound.

        :raise Exception: The failure that ended the session on its own
            (a `ProtocolError`, an `OSError`, ...), re-raised once; the
            runstate is IDLE all the same.
        """
        attempt, unwound = self._attempt_task, self._attempt_unwound
        if (attempt is not None and unwound is not None
                and attempt is not asyncio.current_task()):
            self.logger.debug("disconnect() aborts the connection attempt.")
            attempt.cancel()
            await asyncio.wait((unwound,))
        if self._runstate is Runstate.IDLE:
            if attempt is None:
                # Superfluous: pass through DISCONNECTING anyway, as the
                # seeds do, so that watchers of runstate_changed() see
                # the disconnect happen.
                self._set_state(Runstate.DISCONNECTING)
                await asyncio.sleep(0)
                self._end_superfluous_disconnect()
            return
        self.logger.debug("disconnect() called.")
        self._schedule_disconnect(None)
        await self._wait_disconnect()

    async def __aenter__(self) -> Self:
        """
        Runs in the loop thread: begin an ``async with`` block; return
        this object as it is.

        Entering does not connect: a session opens in one of several
        ways (`connect`, `start_server` and `accept`, `open_with_socket`),
        each with an address and options of its own, so the block calls
        the one it needs. What the block promises is the end::

            async with QMPClient("vm") as client:
                await client.connect("/run/vm/qmp.sock")
                await client.execute("stop")
        """
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc_value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        """
        Runs in the loop thread: end the ``async with`` block with
        `disconnect()`, so that the runstate is IDLE when the block is
        left, whether it ended normally, by an exception or cancelled.

        The disconnect runs to its end even if the task is cancelled
        meanwhile (it is bounded: the stream is aborted after
        ``_close_timeout``); the cancellation is raised after it.

        :raise Exception: When the block ended normally: the failure that
            ended the session on its own, as `disconnect()` raises it.
            When the block raised, its exception goes on alone: the
            session's failure is only logged, as it is usually the cause
            of that exception already (an `ExecInterruptedError` or a
            `StateError` chains it), and the user should not see it
            twice.
        :raise asyncio.CancelledError: When the task was cancelled while
            disconnecting.
        """
        ending = asyncio.get_running_loop().create_task(self.disconnect())
        interrupted = False
        while not ending.done():
            try:
                await asyncio.wait((ending,))
            except asyncio.CancelledError:
                interrupted = True
        if interrupted or ending.cancelled():
            if not ending.cancelled():
                self._log_disconnect_error(ending.exception())
            if isinstance(exc_value, asyncio.CancelledError):
                return  # the block's own cancellation goes on
            raise asyncio.CancelledError
        if exc_value is None:
            ending.result()
            return
        self._log_disconnect_error(ending.exception())

    def _log_disconnect_error(self, error: BaseException | None) -> None:
        """Runs in the loop thread: log what `disconnect()` raised
        where another exception goes on instead."""
        if error is not None:
            self.logger.debug("disconnect() ended with: %s",
                              exception_summary(error))

    # ------------------------------------------------------------------
    # Session machinery.

    def _end_superfluous_disconnect(self) -> None:
        """Runs in the loop thread: back to IDLE after the pass through
        DISCONNECTING of a `disconnect()` made while IDLE, unless a
        session has begun or ended meanwhile."""
        if self._runstate is Runstate.DISCONNECTING and self._dc_task is None:
            self._set_state(Runstate.IDLE)

    def _get_runstate_event(self) -> asyncio.Event:
        """
        Runs in the loop thread: the event behind `runstate_changed`,
        made in the running loop (an asyncio.Event belongs to one loop,
        and a client may be reused under a new one after disconnect).
        """
        loop = asyncio.get_running_loop()
        if self._runstate_event is None or self._runstate_loop is not loop:
            self._runstate_event = asyncio.Event()
            self._runstate_loop = loop
        return self._runstate_event

    def _set_state(self, state: Runstate) -> None:
        """Runs in the loop thread: change the runstate, wake watchers."""
        if state is self._runstate:
            return
        self.logger.debug("Runstate %s -> %s", self._runstate.name,
                          state.name)
        self._runstate = state
        self._remains.moved(state, quiet=self.error_name is not None)
        event = self._get_runstate_event()
        event.set()
        event.clear()

    async def _attempt(self, phases: Coroutine[Any, Any, None],
                       emsg: str) -> None:
        """
        Runs in the loop thread: run the phases of a connect or accept
        as a task of their own, so that `disconnect()` can abort them
        without cancelling the caller's task.

        Enters CONNECTING before it yields, so that the runstate check
        of the caller and the state change are one step. If the attempt
        fails, is aborted, or the caller is cancelled (even just as the
        attempt succeeded), the runstate is IDLE when this returns.

        :raise ConnectError: When a phase fails (the phases wrap their
            own errors), or with a `QMPError` root cause when
            `disconnect()` aborted the attempt.
        """
        loop = asyncio.get_running_loop()
        self._set_state(Runstate.CONNECTING)
        attempt = loop.create_task(phases)
        unwound = loop.create_future()
        self._attempt_task, self._attempt_unwound = attempt, unwound
        caller_cancelled = False
        try:
            try:
                await asyncio.wait((attempt,))
            except BaseException:
                # The caller was cancelled (a timeout, say): abort the
                # attempt and unwind it before the caller gets control.
                caller_cancelled = True
                attempt.cancel()
                await asyncio.wait((attempt,))
                if not attempt.cancelled():
                    attempt.exception()  # seen; the caller gets its own
                raise
            finally:
                # From here on, disconnect() takes its ordinary path.
                self._attempt_task = None
                # Reset if the attempt was cancelled before its first
                # step (its own guard never ran), or if it succeeded
                # just as its caller was cancelled: the caller must not
                # be left with a session it thinks failed.
                if ((caller_cancelled or attempt.cancelled())
                        and self._runstate is not Runstate.IDLE):
                    await disconnect_quietly(self)
        finally:
            self._attempt_task = self._attempt_unwound = None
            unwound.set_result(None)
        if attempt.cancelled():
            raise ConnectError(emsg, QMPError(
                "disconnect() was called while connecting"))
        attempt.result()

    async def _connect(self, address: SocketAddr | socket.socket,
                       ssl: SSLContext | None,
                       retry_until: float | None) -> None:
        """Runs in the loop thread: `connect` after its checks."""
        try:
            await self._attempt(
                self._connect_phases(address, ssl, retry_until),
                "Failed to establish connection")
        except BaseException:
            if isinstance(address, socket.socket):
                # Ours even if the attempt never got to use it.
                address.close()
            raise

    async def _connect_phases(self, address: SocketAddr | socket.socket,
                              ssl: SSLContext | None,
                              retry_until: float | None) -> None:
        """Runs in the loop thread, as the attempt task of `connect`."""
        await self._session_guard(
            self._connect_retrying(address, ssl, retry_until),
            "Failed to establish connection")
        await self._session_guard(self._establish_session(),
                                  "Failed to establish session")

    async def _accept_phases(self) -> None:
        """Runs in the loop thread, as the attempt task of `accept`."""
        await self._session_guard(self._do_accept(),
                                  "Failed to accept a connection")
        await self._session_guard(self._establish_session(),
                                  "Failed to establish session")

    async def _session_guard(self, coro: Awaitable[None], emsg: str
                             ) -> None:
        """
        Runs in the loop thread: await `coro`; on any failure go back to
        IDLE and raise.

        Exceptions are wrapped in `ConnectError`; `BaseException`s that
        are not `Exception`s (cancellation, KeyboardInterrupt) are
        re-raised as they are, after the cleanup.
        """
        try:
            await coro
        except BaseException as err:
            self.logger.debug("%s: %s", emsg, exception_summary(err))
            await disconnect_quietly(self)
            if isinstance(err, Exception):
                raise ConnectError(emsg, err) from err
            raise

    async def _connect_retrying(self, address: SocketAddr | socket.socket,
                                ssl: SSLContext | None,
                                retry_until: float | None) -> None:
        """
        Runs in the loop thread: `_do_connect`, retried until
        `retry_until` seconds have passed while it fails in a way that
        means "not there yet" (see `connect`).
        """
        if retry_until is None or isinstance(address, socket.socket):
            await self._do_connect(address, ssl)
            return
        deadline = time.monotonic() + retry_until
        pause = 0.01
        while True:
            try:
                await self._do_connect(address, ssl)
                return
            except _NOT_THERE_YET as err:
                if deadline - time.monotonic() < pause:
                    raise
                self.logger.debug("Not there yet (%s); retrying.",
                                  exception_summary(err))
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_PAUSE)

    def _new_reader(self) -> asyncio.StreamReader:
        """Runs in the loop thread: the reader for a new connection: a
        `LineReader` when this class reads by lines pushed to it (see
        `_pushes_lines`), a plain ``asyncio.StreamReader`` otherwise."""
        if self._pushes_lines():
            return LineReader(self.readbuflen)
        return asyncio.StreamReader(limit=self.readbuflen)

    def _pushes_lines(self) -> bool:
        """
        Any thread: True when this class handles lines as they arrive:
        some class implements `_handle_line`, and no class below it
        overrides `_do_recv`, `_on_message` or `_readline` (a subclass
        that does gets the task-based reader, so its hooks run).
        """
        cls = type(self)
        owner = next(klass for klass in cls.__mro__
                     if "_handle_line" in vars(klass))
        return owner is not AsyncProtocol and all(
            getattr(cls, hook) is getattr(owner, hook)
            for hook in ("_do_recv", "_on_message", "_readline"))

    async def _do_connect(self, address: SocketAddr | socket.socket,
                          ssl: SSLContext | None) -> None:
        """Runs in the loop thread: open the stream as a client."""
        loop = asyncio.get_running_loop()
        reader = self._new_reader()

        def stream_protocol() -> asyncio.StreamReaderProtocol:
            return asyncio.StreamReaderProtocol(reader)

        self.logger.debug("Connecting to %s ...", address)
        if isinstance(address, socket.socket):
            transport, protocol = await loop.create_connection(
                stream_protocol, sock=address)
        elif isinstance(address, tuple):
            try:
                transport, protocol = await loop.create_connection(
                    stream_protocol, address[0], address[1], ssl=ssl)
            except OSError as err:
                raise naming_address(err, f"{address[0]}:{address[1]}"
                                     ) from None
        else:
            # Connected by hand: a unix socket whose listen backlog is
            # full gives EAGAIN, which asyncio's own connect takes for
            # "in progress" and reports as connected.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            path = os.fspath(address)
            try:
                sock.setblocking(False)
                try:
                    sock.connect(path)
                except OSError as err:
                    raise naming_address(err, path) from None
                transport, protocol = await loop.create_unix_connection(
                    stream_protocol, sock=sock, ssl=ssl)
            except BaseException:
                sock.close()
                raise
        self._reader = reader
        self._writer = asyncio.StreamWriter(transport, protocol, reader,
                                            loop)
        self.logger.debug("Connected.")

    async def _do_start_server(self, address: SocketAddr,
                               ssl: SSLContext | None) -> None:
        """Runs in the loop thread: bind and listen."""
        loop = asyncio.get_running_loop()
        self._accepted = loop.create_future()

        def stream_protocol() -> asyncio.StreamReaderProtocol:
            return asyncio.StreamReaderProtocol(self._new_reader(),
                                                self._incoming)

        self.logger.debug("Listening on %s ...", address)
        if isinstance(address, tuple):
            self._server = await loop.create_server(
                stream_protocol, address[0], address[1], ssl=ssl,
                backlog=1)
        else:
            path = os.fspath(address)
            self._server = await loop.create_unix_server(
                stream_protocol, path, ssl=ssl, backlog=1)
            self._server_path = path

    async def _incoming(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        """Runs in the loop thread: take the first incoming connection."""
        accepted = self._accepted
        if accepted is None or accepted.done() or self._writer is not None:
            # Several connections can be queued before we stop listening
            # (bpo-46715); only the first one is ours.
            self.logger.warning("Refusing an extra incoming connection.")
            writer.close()
            return
        self.logger.debug("Incoming connection from %s",
                          writer.get_extra_info("peername") or "a peer")
        self._reader, self._writer = reader, writer
        accepted.set_result(None)
        self._stop_server()

    async def _do_accept(self) -> None:
        """Runs in the loop thread: wait until `_incoming` has a peer."""
        assert self._accepted is not None
        await self._accepted
        self._accepted = None
        self.logger.debug("Connection accepted.")

    def _stop_server(self) -> None:
        """Runs in the loop thread: stop listening; remove our socket file."""
        if self._server is None:
            return
        # Server.wait_closed() also waits for accepted connections on
        # Python >= 3.12, which would never return here; close() alone
        # already closes the listening socket.
        self._server.close()
        self._server = None
        accepted = self._accepted
        if accepted is not None and not accepted.done():
            # Wakes wait_for_peer() and accept(): nobody will come now.
            accepted.cancel()
        if self._server_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._server_path)
            self._server_path = None
        self.logger.debug("Stopped listening.")

    async def _establish_session(self) -> None:
        """
        Runs in the loop thread: start the reader and writer tasks and
        enter RUNNING.

        Subclasses extend it: work before the ``super()`` call happens
        on the bare stream (use `_recv`/`_send` directly), work after it
        with the tasks running.
        """
        assert self._runstate is Runstate.CONNECTING
        self._outgoing = _Outgoing()
        loop = asyncio.get_running_loop()
        self._session_loop = loop
        reader = self._reader
        if not isinstance(reader, LineReader):
            self._reader_task = loop.create_task(
                self._bh_loop(self._bh_recv_message, "Reader task"))
        self._writer_task = loop.create_task(
            self._bh_loop(self._bh_send_message, "Writer task"))
        for task in (self._reader_task, self._writer_task):
            if task is not None:
                # Such a task is destroyed while pending only with this
                # object, dropped without disconnect(), which its
                # finaliser reports (see _dropped): asyncio's "Task was
                # destroyed but it is pending!" would say it again, in
                # its own words. asyncio itself clears this flag where
                # another report covers the task (run_until_complete).
                with contextlib.suppress(AttributeError):
                    cast(Any, task)._log_destroy_pending = False
        self._remains.opened(
            None if self._writer is None else self._writer.transport, loop)
        self._set_state(Runstate.RUNNING)
        if isinstance(reader, LineReader):
            reader.push_to(_LinePusher(self))

    def _check_loop_thread(self, what: str) -> None:
        """
        Raise `QMPError` unless called in the thread that runs the
        session's event loop: the session's asyncio objects work only
        there. Cheap enough for hot paths.
        """
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._session_loop:
            raise QMPError(
                f"{what} must be called from the thread running the event "
                "loop this client connected in (from other threads, use "
                "the blocking facade)")

    def _schedule_disconnect(self, error: BaseException | None = None
                             ) -> None:
        """
        Runs in the loop thread: start tearing the session down, once.

        Called by `disconnect()` (``error`` is None) and by the reader or
        writer task when it ends: with its failure, or with `EOFError`
        when the peer closed the stream. The first failure is kept for
        `disconnect()` to raise, unless it only says that the peer hung
        up (see `peer_hung_up`): that is how sessions normally end.
        """
        if (error is not None and not peer_hung_up(error)
                and self._session_error is None):
            self._session_error = error
        if self._dc_task is not None:
            return
        self._ended_by = error
        if isinstance(self._reader, LineReader):
            self._reader.stop_pushing()
        self._set_state(Runstate.DISCONNECTING)
        try:
            self._on_session_end(error)
        except Exception as err:
            self.logger.error("_on_session_end failed: %s",
                              exception_summary(err))
        self._dc_task = asyncio.get_running_loop().create_task(
            self._bh_disconnect())

    async def _wait_disconnect(self) -> None:
        """
        Runs in the loop thread: wait for the scheduled teardown, clean
        up, enter IDLE and re-raise the session's failure if any.

        When several callers wait, the first one to wake does the cleanup
        and gets the failure; the others return quietly.
        """
        dc_task = self._dc_task
        assert dc_task is not None
        await asyncio.wait((dc_task,))
        if self._dc_task is not dc_task:
            return
        error, self._session_error = self._session_error, None
        self._cleanup()
        self._set_state(Runstate.IDLE)
        if error is not None:
            raise error

    def _cleanup(self) -> None:
        """Runs in the loop thread: forget everything of the last session."""
        for task in (self._dc_task, self._reader_task, self._writer_task):
            assert task is None or task.done()
        self._dc_task = None
        self._reader_task = None
        self._writer_task = None
        self._reader = None
        self._writer = None
        self._outgoing = None
        self._accepted = None
        self._ended_by = None

    async def _bh_disconnect(self) -> None:
        """
        Runs in the loop thread, as the disconnect task: stop listening,
        stop the reader and writer, close the stream.

        Never raises: the stream is closed whatever happens, which is
        all `disconnect()` promises; errors while closing are logged.
        """
        self._stop_server()
        for task in (self._writer_task, self._reader_task):
            if task is not None:
                await cancel_and_wait(task)
        writer = self._writer
        if writer is None:
            return
        if (self._session_error is not None
                or writer.transport.get_write_buffer_size()):
            # A broken stream has nothing worth flushing, and unwritten
            # data is dropped (see disconnect()): waiting for a peer that
            # does not read would only delay the close.
            writer.transport.abort()
        else:
            writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), self._close_timeout)
        except asyncio.TimeoutError:
            self.logger.warning("Closing the stream took over %.0f s; "
                                "aborting it.", self._close_timeout)
            writer.transport.abort()
        except Exception as err:
            # The peer reset or broke the stream as we closed it: it is
            # closed either way, which is all disconnect() promises.
            self.logger.debug("Error while closing the stream: %s",
                              exception_summary(err))
        self.logger.debug("Disconnected.")

    async def _bh_loop(self, step: Callable[[], Awaitable[None]],
                       role: str) -> None:
        """
        Runs in the loop thread, as the reader or writer task: call
        `step` until the task is cancelled, the stream ends or `step`
        fails; then schedule the disconnect.
        """
        try:
            while True:
                await step()
        except asyncio.CancelledError:
            self.logger.debug("%s task cancelled.", role)
            if self._dc_task is None:
                self._abort_abandoned_session()
        except Exception as err:
            self._bottom_half_ended(role, err)

    def _abort_abandoned_session(self) -> None:
        """
        Runs in the loop thread: the reader or writer task was cancelled
        by someone else than `disconnect()`, that is, the event loop is
        shutting down under a session nobody closed (``asyncio.run``
        cancels every task still alive when its coroutine returns).

        Abort the stream now, while the loop can still close it: left to
        the garbage collector, an open transport draws asyncio's raw
        "unclosed transport" warnings (and uvloop's, at ``loop.close()``)
        where the finaliser of this object warns in plain words. Pushing
        stops first, so that the end of the stream starts no disconnect
        task in a loop about to close; the runstate stays as it is until
        `disconnect()` collects the session.
        """
        if isinstance(self._reader, LineReader):
            self._reader.stop_pushing()
        if self._writer is not None and not self._writer.is_closing():
            self._writer.transport.abort()
            self.logger.debug("The loop cancelled the session's tasks; "
                              "stream aborted.")

    def _bottom_half_ended(self, role: str, error: BaseException) -> None:
        """
        Runs in the loop thread: the reader (task or push reader) or the
        writer task stopped on `error` (`EOFError` when the peer closed
        the stream); log it and end the session with it.
        """
        if isinstance(error, EOFError):
            self.logger.debug("%s: the peer closed the connection.", role)
        else:
            self.logger.info("%s failed: %s", role, exception_summary(error))
        self._schedule_disconnect(error)

    async def _bh_recv_message(self) -> None:
        """Runs in the reader task: read one message and handle it."""
        msg = await self._recv()
        await self._on_message(msg)

    async def _bh_send_message(self) -> None:
        """Runs in the writer task: write the next queued message."""
        assert self._outgoing is not None
        await self._send(await self._outgoing.get())

    # ------------------------------------------------------------------
    # Message I/O and the hooks for subclasses; all run in the loop thread.

    def _enqueue(self, msg: T) -> None:
        """
        Runs in the loop thread: send `msg` after everything sent before.

        When nothing is queued and the transport's buffer is empty, the
        message is written at once, which saves the loop pass a hand-off
        to the writer task would cost; otherwise the writer task sends
        it once the buffer drains. A failure to write ends the session,
        exactly as in the writer task.
        """
        assert self._writer is not None and self._outgoing is not None
        if (self._outgoing.empty()
                and not self._writer.transport.get_write_buffer_size()):
            try:
                self._do_send(self._cb_outbound(msg))
            except Exception as err:
                self.logger.info("Writing failed: %s", exception_summary(err))
                self._schedule_disconnect(err)
            return
        self._outgoing.put_nowait(msg)

    def _withdraw(self, msg: T) -> bool:
        """
        Runs in the loop thread: take `msg` (the very object given to
        `_enqueue`) back out of the queue if it has not been written
        yet; True when it was withdrawn, False when it is written (or
        being written) already.
        """
        return self._outgoing is not None and self._outgoing.withdraw(msg)

    async def _readline(self) -> bytes:
        """
        Runs in the loop thread: read one line, newline included.

        At end of stream after a partial line, that partial line is
        returned (without newline); the next call raises `EOFError`.

        :raise EOFError: At end of stream with nothing left.
        :raise MessageTooLargeError: When the line exceeds `readbuflen`.
        :raise OSError: When the stream fails.
        """
        assert self._reader is not None
        try:
            line = await self._reader.readline()
        except ValueError as err:
            # StreamReader reports a line over its limit as ValueError.
            raise MessageTooLargeError(self.readbuflen) from err
        if not line:
            raise EOFError("the peer closed the connection")
        return line

    async def _recv(self) -> T:
        """Runs in the loop thread: read one message, filtered by
        `_cb_inbound`. Outside the reader task only before the session
        runs (it would steal messages from it)."""
        return self._cb_inbound(await self._do_recv())

    async def _send(self, msg: T) -> None:
        """Runs in the loop thread: write one message, filtered by
        `_cb_outbound`, and wait while the stream is over its buffer
        limit."""
        self._do_send(self._cb_outbound(msg))
        if self._writer is not None:
            await self._writer.drain()

    async def _do_recv(self) -> T:
        """Hook, runs in the loop thread: read and return one message."""
        raise NotImplementedError

    def _handle_line(self, line: bytes) -> None:
        """
        Hook, runs in the loop thread, inside the transport's
        ``data_received``: parse and handle one line (newline included;
        at the end of the stream, an unfinished line without it). An
        exception raised here ends the session with that failure.

        A class that implements it reads by *push*: once the session
        runs, each line goes here the moment it arrives, with no reader
        task (see ``qmp_sync._linereader``), and `_end_of_batch` follows
        each chunk received. A class that does not (or a subclass that
        overrides `_do_recv`, `_on_message` or `_readline` below the one
        that does) gets the reader task, which awaits `_do_recv` and
        `_on_message` for each message. Both keep the order of messages,
        both honour `readbuflen`, and both end the session through the
        same path, so `disconnect()` re-raises a failure of either once.
        Before the session runs (greeting, negotiation), `_recv` reads
        with `_readline` in both.
        """
        raise NotImplementedError

    def _end_of_batch(self) -> None:
        """Hook, runs in the loop thread (push reader only): every line
        of the chunk just received has been handled; wake whoever waits
        for what they brought, once."""

    def _do_send(self, msg: T) -> None:
        """Hook, runs in the loop thread: write one message to
        ``self._writer`` (without draining)."""
        raise NotImplementedError

    async def _on_message(self, msg: T) -> None:
        """
        Hook, runs in the reader task: handle one inbound message.

        An exception raised here ends the session with that failure.
        Never wait here for the reader or for a reply: it would deadlock.
        """

    def _on_session_end(self, error: BaseException | None) -> None:
        """
        Hook, runs in the loop thread: the session has started to end,
        because of `error` (None for `disconnect()`; `EOFError` or
        another error for which `peer_hung_up` holds when the peer went
        away).

        Called once per session, before the reader and writer stop.
        Must not block and should not raise.
        """

    def _cb_outbound(self, msg: T) -> T:
        """Hook, runs in the loop thread: log (lazily) or rewrite each
        outbound message; returns the message to send."""
        self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: T) -> T:
        """Hook, runs in the loop thread: log (lazily) or rewrite each
        inbound message before `_on_message` sees it."""
        self.logger.debug("<-- %s", msg)
        return msg


def _nothing() -> None:
    """What a dead weak reference returns."""
    return None


class _Remains:
    """
    What the finaliser of an `AsyncProtocol` (`_dropped`) needs to know
    about it, kept apart from it: a finaliser must not reach the object
    it watches. The protocol updates it in the loop thread; the
    finaliser reads it in whatever thread collects the protocol.

    The transport and its loop are held by weak references: alive, they
    may lead back to the protocol (an accepted connection's does).
    """

    # One per client: kept small (an idle client costs some 11 KiB).
    __slots__ = ("_loop", "_transport", "class_name", "label", "quiet",
                 "runstate")

    def __init__(self, proto: AsyncProtocol[Any]) -> None:
        name = "" if proto.name is None else f" {proto.name!r}"
        #: The protocol's class name.
        self.class_name = type(proto).__name__
        #: The protocol, in words: its class and name.
        self.label = f"{self.class_name}{name}"
        #: Its runstate, as `AsyncProtocol._set_state` last set it.
        self.runstate = Runstate.IDLE
        #: Not to warn: a facade (which sets ``error_name``) owns the
        #: protocol and warns about a session left open in its own name.
        self.quiet = False
        self._transport: Callable[[], asyncio.WriteTransport | None] = (
            _nothing)
        self._loop: Callable[[], asyncio.AbstractEventLoop | None] = (
            _nothing)

    def moved(self, state: Runstate, *, quiet: bool) -> None:
        """Runs in the loop thread: the protocol entered `state`;
        `quiet` when a facade owns it (see `quiet`)."""
        self.runstate = state
        self.quiet = quiet

    def opened(self, transport: asyncio.WriteTransport | None,
               loop: asyncio.AbstractEventLoop) -> None:
        """Runs in the loop thread: a session starts on `transport`
        (None for a session without a stream, as some tests make), in
        `loop`."""
        self._transport = self._loop = _nothing
        if transport is None:
            return
        try:
            self._transport = weakref.ref(transport)
            self._loop = weakref.ref(loop)
        except TypeError:
            # A transport or loop without weak references (not asyncio's
            # nor uvloop's): the finaliser will only warn.
            self._transport = self._loop = _nothing

    def abort(self) -> bool:
        """
        Any thread: abort the transport of the session if it is still
        open and this thread runs its loop; True if it did.

        From another thread, or once the loop has stopped, nothing is
        touched: a transport is not thread-safe, and in a child process
        after ``fork()`` the loop's selector is shared with the parent.
        """
        transport, loop = self._transport(), self._loop()
        if transport is None or loop is None or transport.is_closing():
            return False
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if running is not loop:
            return False
        transport.abort()
        return True


def _dropped(remains: _Remains) -> None:
    """
    Any thread (the garbage collector's, or the main thread at exit):
    the finaliser of an `AsyncProtocol`. One dropped while not IDLE had
    its session left open: abort its stream when this thread runs its
    loop, then warn, once, in our words.

    A weak reference's callback, this runs before the garbage collector
    calls any ``__del__`` of the same garbage: asyncio's
    ``StreamWriter.__del__`` then finds the transport closing and keeps
    quiet instead of warning about an "unclosed" stream.
    """
    state = remains.runstate
    if state is Runstate.IDLE:
        return
    aborted = remains.abort()
    if remains.quiet:
        return
    fate = "; its connection was aborted" if aborted else ""
    warnings.warn(
        f"{remains.label} was garbage-collected without disconnect() "
        f"(runstate {state.name}){fate}. Await its disconnect() when done "
        f"with it, or use 'async with {remains.class_name}(...) as "
        "client:', which disconnects when the block is left",
        ResourceWarning, stacklevel=1)


class _LinePusher(PushTarget):
    """Runs in the loop thread: delivers the lines a `LineReader` pushes
    to the hooks of `proto`, and ends its session when pushing ends."""

    def __init__(self, proto: AsyncProtocol[Any]) -> None:
        self._proto = proto

    def line_received(self, line: bytes) -> None:
        self._proto._handle_line(line)

    def chunk_done(self) -> None:
        self._proto._end_of_batch()

    def push_failed(self, error: BaseException) -> None:
        proto = self._proto
        if isinstance(error, LineTooLong):
            error = MessageTooLargeError(proto.readbuflen)
        proto._bottom_half_ended("Reader", error)


class _Outgoing(Generic[T]):
    """
    Runs in the loop thread: the queue of messages for the writer task.
    It has the part of ``asyncio.Queue`` that code on the core uses (as
    the seeds have it, a subclass may ``await self._outgoing.put(msg)``)
    and `withdraw`, which takes back a message not yet written. It is
    not an ``asyncio.Queue``: that holds three more deques and an event
    for each session, some 2.5 KiB for every idle client.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        # The writer task, waiting in get() for a message.
        self._waiter: asyncio.Future[None] | None = None

    def empty(self) -> bool:
        """True when no message waits."""
        return not self._items

    def qsize(self) -> int:
        """How many messages wait."""
        return len(self._items)

    def put_nowait(self, item: T) -> None:
        """Queue `item`, waking the writer task if it waits."""
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def put(self, item: T) -> None:
        """`put_nowait` (the queue has no bound)."""
        self.put_nowait(item)

    async def get(self) -> T:
        """The oldest message, once there is one."""
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()

    def withdraw(self, item: T) -> bool:
        """Take `item` (that very object) out; True if it was queued."""
        for index, queued in enumerate(self._items):
            if queued is item:
                del self._items[index]
                return True
        return False
