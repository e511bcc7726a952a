"""
`QMPSyncClient`: the blocking, thread-safe QMP client.

Each client's session lives in an event loop run by a background thread
(one thread shared by every client, by default); the methods here block
only the thread that calls them. Events are queued as they arrive,
whether or not anybody waits for them.

Threads: everything here runs in caller threads and never touches
asyncio objects, except `QMPSyncClient._opening`, a coroutine that runs
in the loop thread and only awaits the async client;
``qmp_sync._loop`` carries every call across. The async client is
reached through its public interface only: its coroutines, `submit`,
`command`/`command_from`, and the reply functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import warnings
import weakref
from collections.abc import Awaitable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable

from ._event_queue import BlockingListener
from ._loop import Bridge
from .error import QMPError
from .events import EventFilter
from .message import Message
from .protocol import (
    DEFAULT_READBUFLEN,
    AsyncProtocol,
    ConnectError,
    Runstate,
    SocketAddr,
)
from .qmp_client import (
    Command,
    Exchange,
    QMPClient,
    reply_message,
    reply_value,
)
from .util import timeout_seconds

if TYPE_CHECKING:
    from ssl import SSLContext

    from typing_extensions import Self

__all__ = ("BlockingListener", "QMPSyncClient", "event_match")


def event_match(value: object, match: object) -> bool:
    """
    True when `value` (an event, or part of one) matches `match`, by
    the rule of QEMU's ``QEMUMachine.event_match``: None matches
    anything; a mapping matches a mapping that has every one of its
    keys with a matching value (recursively); anything else compares
    with ``==``.
    """
    if match is None:
        return True
    if isinstance(match, Mapping):
        return isinstance(value, Mapping) and all(
            key in value and event_match(value[key], item)
            for key, item in match.items())
    return value == match


def _wait_seconds(wait: object) -> float | None:
    """Check a `pull_event` style wait: True is None (forever), a number
    is seconds (0 and False mean no wait: 0.0)."""
    if wait is True:
        return None
    if wait is False:
        return 0.0
    if wait is None:
        raise TypeError("wait must be True, False or a number of seconds, "
                        "not None")
    return timeout_seconds(wait, "wait")


def _remaining(start: float, timeout: float | None) -> float | None:
    """Seconds left of `timeout` counted from `start` (None: no limit)."""
    if timeout is None:
        return None
    return max(0.0, start + timeout - time.monotonic())


def _release(bridge: Bridge, core: AsyncProtocol[Any]) -> None:
    """Finaliser of a `QMPSyncClient` (any thread, never blocks): end a
    session the caller never closed, and warn about it."""
    if core.runstate is not Runstate.IDLE:
        try:
            name = "" if core.name is None else f" {core.name!r}"
            warnings.warn(f"QMPSyncClient{name} was garbage-collected "
                          "without close(); closing its session",
                          ResourceWarning, stacklevel=1)
        finally:
            # Even when warnings are errors.
            bridge.release(core)


class QMPSyncClient:
    """
    A blocking QMP client, safe to use from any number of threads.

    Every method blocks the calling thread only; none may be called from
    the loop thread itself (an event filter, say): that raises
    `QMPError` instead of deadlocking. Every error raised is a
    `QMPError` or a built-in exception.

    Rules between threads: `close()` wins. A `connect`, `accept` or
    `open_with_socket` running in another thread when `close()` is
    called ends with `ConnectError` (or, if it had just succeeded, its
    session is closed); commands in flight end with
    `ExecInterruptedError`; event waits with `StateError` unless a
    matching event is queued. A command whose caller got
    `TimeoutError` or `KeyboardInterrupt` before it was written to the
    socket is withdrawn and never sent; once written, its late reply is
    dropped. So the commands queued for sending are only ever those of
    callers still waiting, each within its own timeout.

    Timeouts everywhere: seconds as an int or float; None, infinity and
    anything beyond `threading.TIMEOUT_MAX` mean no limit; NaN or a
    negative number is a `ValueError`, raised before anything is sent.

    :param address: The default address of `connect`: a unix socket
        path, a ``(host, port)`` tuple or a connected `socket.socket`.
    :param name: A nickname for logs and ``repr``.
    :param loop: An event loop that the caller runs with
        ``run_forever()`` in a thread of its own, to host the session;
        the client never stops or closes it. Keep it running while calls
        are in flight: a call whose loop stops under it never returns.
        By default the session lives in the library's shared loop
        thread, started on first use.
    :param readbuflen: The longest message accepted from the server, in
        bytes.
    :param max_queued_events: At most this many events stay queued for
        `pull_event` and friends: past it the oldest are dropped,
        counted in `dropped_events` and logged (a warning per overflow).
        None (the default) keeps every event: nothing is ever lost, and
        a queued event costs some 1.3 KB for the first 10,000 and about
        twice its size on the wire after that.
    :param greeting_timeout: Seconds `connect` (and `accept`) wait for
        the server's greeting once connected; None waits for ever. QEMU
        greets a client only when the monitor's previous client has
        left, so the `ConnectError` on a timeout says that another
        client probably holds the monitor.
    :raise ValueError: When `max_queued_events` is not a positive int,
        or `greeting_timeout` is NaN or negative.
    """

    def __init__(self, address: SocketAddr | socket.socket | None = None,
                 *, name: str | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 readbuflen: int = DEFAULT_READBUFLEN,
                 max_queued_events: int | None = None,
                 greeting_timeout: float | None = 10.0) -> None:
        self._address = address
        core = QMPClient(name, readbuflen)
        core.greeting_timeout = timeout_seconds(greeting_timeout,
                                                "greeting_timeout")
        core.error_name = type(self).__name__
        self._events = BlockingListener(core, max_queued=max_queued_events)
        # Events go to our thread-safe queue instead; the async client's
        # default queue would only grow.
        core.remove_listener(core.events)
        core.register_listener(self._events)
        self._core = core
        self._bridge = Bridge(loop)
        self._bridge.adopt(core)
        # Counts close() calls, so that an opening call can tell that
        # one came after it started (see _opening).
        self._closes = 0
        # The safety net for a client dropped without close(); it holds
        # no reference to `self`.
        finalizer = weakref.finalize(self, _release, self._bridge, core)
        # At exit the loop thread itself ends the sessions still open.
        finalizer.atexit = False

    def __repr__(self) -> str:
        name = f" name={self.name!r}" if self.name is not None else ""
        return (f"<{type(self).__name__}{name} "
                f"runstate={self.runstate.name}>")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    @property
    def name(self) -> str | None:
        """The nickname given at construction, if any."""
        return self._core.name

    @property
    def runstate(self) -> Runstate:
        """The current `Runstate` of the session."""
        return self._core.runstate

    @property
    def greeting(self) -> Message | None:
        """The server's greeting in the current (or last) session; None
        when there was none (not connected yet, or ``negotiate=False``)."""
        return self._core.greeting

    @property
    def dropped_events(self) -> int:
        """How many events were dropped because the queue held
        `max_queued_events` already (0 without a cap)."""
        return self._events.dropped

    # ------------------------------------------------------------------
    # Opening and closing the session.

    async def _opening(self, closes: int, phase: str,
                       opening: Callable[[], Awaitable[None]]) -> None:
        """
        Runs in the loop thread: ``await opening()``, unless `close()`
        was called since the caller read `closes` (the count of close
        calls) as it began.

        Checked here, in the loop thread, because close() schedules its
        disconnect there after counting: a close that came before this
        step is seen here, and one that comes after it finds the opening
        under way and aborts it.
        """
        if self._closes != closes:
            raise ConnectError(phase, QMPError(
                "close() was called while connecting"))
        await opening()

    def connect(self, address: SocketAddr | socket.socket | None = None, *,
                ssl: SSLContext | None = None, negotiate: bool = True,
                timeout: float | None = None,
                retry_until: float | None = None) -> None:
        """
        Connect to the server and start the session (greeting and
        capabilities negotiation included).

        :param address: A unix socket path, a ``(host, port)`` tuple or
            a connected `socket.socket` (owned by the client from then
            on); by default the one given to the constructor.
        :param ssl: A client-side `ssl.SSLContext` for TLS, if any.
        :param negotiate: False to skip the greeting and negotiation
            (for qemu-ga, which has neither).
        :param timeout: Seconds the whole call may take, retries
            included.
        :param retry_until: Seconds during which a refused connection
            or a missing socket file is retried (QEMU still starting).
            `close()` from another thread ends the retrying.
        :raise ConnectError: When connecting fails (after retrying, if
            asked to), or `close()` was called meanwhile; ``.exc`` is the
            root cause. The client is IDLE.
        :raise TimeoutError: When `timeout` passes first; the client is
            IDLE.
        :raise StateError: When the client is not IDLE.
        :raise ValueError: When there is no address at all, or a timeout
            is NaN or negative.
        """
        closes = self._closes
        if address is None:
            address = self._address
        if address is None:
            raise ValueError("connect() needs an address; none was given "
                             "here or to the constructor")
        try:
            seconds = timeout_seconds(timeout)
            retry = timeout_seconds(retry_until, "retry_until")
            self._bridge.block_on_coroutine(
                "connect()", self._opening, closes,
                "Failed to establish connection",
                partial(self._core.connect, address, ssl,
                        retry_until=retry, negotiate=negotiate),
                timeout=seconds)
        except BaseException:
            if isinstance(address, socket.socket):
                # Ours even when the attempt never got to use it.
                address.close()
            raise

    def open_with_socket(self, sock: socket.socket, *,
                         negotiate: bool = True,
                         timeout: float | None = None) -> None:
        """
        Start the session on an already-connected socket (one end of a
        socketpair handed to QEMU, say); the client owns it from now on.

        :raise: As `connect`; `TypeError` when `sock` is not a socket.
        """
        closes = self._closes
        if not isinstance(sock, socket.socket):
            raise TypeError(f"expected a socket.socket, not {sock!r}")
        try:
            seconds = timeout_seconds(timeout)
            self._bridge.block_on_coroutine(
                "open_with_socket()", self._opening, closes,
                "Failed to establish connection",
                partial(self._core.open_with_socket, sock,
                        negotiate=negotiate),
                timeout=seconds)
        except BaseException:
            # Ours even when the attempt never got to use it.
            sock.close()
            raise

    def start_server(self, address: SocketAddr, *,
                     ssl: SSLContext | None = None) -> None:
        """
        Listen for QEMU's incoming connection (QEMU started with
        ``-qmp unix:PATH`` as a client); `accept` takes it. The
        runstate is CONNECTING from now on, until the session ends.

        :param address: A unix socket path (the file is removed again
            when listening stops) or a ``(host, port)`` tuple.
        :param ssl: A server-side `ssl.SSLContext` for TLS, if any.
        :raise ConnectError: When the socket cannot listen.
        :raise StateError: When the client is not IDLE.
        """
        self._bridge.block_on_coroutine(
            "start_server()", self._core.start_server, address, ssl)

    def accept(self, *, timeout: float | None = 15.0,
               negotiate: bool = True) -> None:
        """
        Wait for the peer to connect to the socket `start_server`
        opened, then start the session.

        :param timeout: Seconds the whole call may take. When nobody
            connects in time, the socket keeps listening (runstate
            CONNECTING) and `accept` may be called again; when the peer
            connected but the session could not be set up in time, the
            client is IDLE.
        :param negotiate: False to skip the greeting and negotiation.
        :raise TimeoutError: When `timeout` passes first.
        :raise ConnectError: When the session cannot be established, or
            `close()` was called meanwhile (from another thread); the
            client is IDLE.
        :raise StateError: When `start_server` was not called.
        :raise ValueError: When `timeout` is NaN or negative.
        """
        closes = self._closes
        seconds = timeout_seconds(timeout)
        start = time.monotonic()
        phase = "Failed to accept a connection"
        try:
            self._bridge.block_on_coroutine(
                "accept()", self._opening, closes, phase,
                self._core.wait_for_peer, timeout=seconds)
        except TimeoutError:
            raise TimeoutError(
                f"accept(): nobody connected within {seconds:g} s; "
                "still listening (call accept() again, or "
                "close() to stop)") from None
        self._bridge.block_on_coroutine(
            "accept()", self._opening, closes, phase,
            partial(self._core.accept, negotiate=negotiate),
            timeout=_remaining(start, seconds))

    def disconnect(self) -> None:
        """
        End the session (or stop listening, or abort a connect or accept
        in progress in another thread) and return to IDLE; idempotent.

        Commands still waiting for replies end with
        `ExecInterruptedError`; threads waiting for events wake up with
        `StateError` unless a matching event is queued. Queued events
        stay queued. Unwritten commands are dropped, so this returns
        promptly even when the server does not read.

        :raise Exception: The failure that ended the session on its own
            (a `ProtocolError`, say), once; the client is IDLE all the
            same.
        """
        self._closes += 1
        if self.runstate is Runstate.IDLE and not self._bridge.usable:
            return  # nothing to end, and no loop to end it in
        self._bridge.block_on_coroutine("disconnect()",
                                        self._core.disconnect)

    def close(self) -> None:
        """The same as `disconnect`."""
        self.disconnect()

    # ------------------------------------------------------------------
    # Commands.

    def execute(self, cmd: str, arguments: Mapping[str, object] | None = None,
                *, oob: bool = False, timeout: float | None = None
                ) -> object:
        """
        Execute a command and return its ``return`` value.

        :param cmd: The command name.
        :param arguments: Its arguments, if any.
        :param oob: Execute it out of band (needs a session that
            negotiated 'oob', and a command that allows it).
        :param timeout: Seconds to wait for the reply at most. When they
            pass, a command not yet written is withdrawn, one written is
            abandoned (its late reply is dropped); the session stays
            usable either way.
        :raise ExecuteError: When the server answers with an error.
        :raise TimeoutError: When `timeout` passes first.
        :raise ExecInterruptedError: When the session ends first.
        :raise StateError: When the client is not RUNNING.
        :raise TypeError: For a bad argument, a value that is not
            JSON-serialisable or a key that is not a string (at any
            depth); nothing is sent.
        :raise ValueError: For NaN or infinity among the arguments,
            arguments nested too deeply to encode, or a NaN or negative
            timeout; nothing is sent.
        """
        seconds = timeout_seconds(timeout)
        return reply_value(*self._exchange(
            self._core.command(cmd, arguments, oob=oob), seconds))

    def execute_msg(self, msg: Mapping[str, object], *,
                    timeout: float | None = None) -> object:
        """
        Execute a caller-built command message (``execute`` or
        ``exec-oob``, ``arguments``, and an ``id`` of its own if the
        caller likes); return its ``return`` value. `msg` is not
        modified.

        :raise: As `execute`; also `ValueError` for a message that is not
            a command or whose id is already in flight.
        """
        seconds = timeout_seconds(timeout)
        return reply_value(*self._exchange(
            self._core.command_from(msg), seconds))

    def execute_reply(self, msg: Mapping[str, object], *,
                      timeout: float | None = None) -> Message:
        """
        Execute a command message; return the whole reply, error replies
        included (nothing is raised for those). An id the client added
        is removed from the reply; the caller's own id stays.

        :raise: As `execute_msg`, except `ExecuteError`.
        """
        seconds = timeout_seconds(timeout)
        return reply_message(*self._exchange(
            self._core.command_from(msg), seconds))

    def _exchange(self, command: Command,
                  timeout: float | None) -> Exchange:
        """Caller thread: send `command`; block until its reply comes."""
        exchange: Exchange = self._bridge.block_on(
            f"execute({command.name!r})",
            partial(self._core.submit, command), timeout)
        return exchange

    def cmd(self, cmd: str, **kwargs: object) -> object:
        """
        Shorthand for `execute`: ``cmd('block-commit', device='drive0')``.
        Keyword names are used as they are (write ``**{'node-name': x}``
        for names with dashes).
        """
        return self.execute(cmd, kwargs or None)

    def send_fd_scm(self, fd: int) -> None:
        """
        Pass file descriptor `fd` to QEMU (SCM_RIGHTS), for the next
        command that takes one (``getfd``, ``add-fd``).

        :raise QMPError: When the connection is not a plain unix socket.
        :raise OSError: When `fd` is not an open file descriptor.
        :raise TypeError: When `fd` is not an int.
        :raise StateError: When the client is not RUNNING.
        """
        self._bridge.block_on_call("send_fd_scm()", self._core.send_fd_scm,
                                   fd)

    # ------------------------------------------------------------------
    # Events.

    def pull_event(self, wait: bool | float = False) -> Message | None:
        """
        Take the oldest queued event.

        :param wait: False or 0: do not wait (None when nothing is
            queued); True (or infinity): wait as long as the session
            runs; a number: wait that many seconds at most.
        :raise TimeoutError: When a number of seconds passes first.
        :raise StateError: When waiting and the session is not running
            (or ends meanwhile) with nothing queued.
        :raise ValueError: When `wait` is NaN or negative.
        """
        seconds = _wait_seconds(wait)
        if seconds == 0.0:
            return self._events.get_nowait()
        self._bridge.check_caller("pull_event()")
        event = self._events.get_nowait()
        if event is not None:
            return event
        return self._events.take(None, seconds, "pull_event()")

    def get_events(self, wait: bool | float = False) -> list[Message]:
        """
        Take every queued event, oldest first.

        :param wait: As for `pull_event`: when nothing is queued, wait
            for one event first (then take all that are queued).
        :raise: As `pull_event`.
        """
        seconds = _wait_seconds(wait)
        events = self._events.clear()
        if events or seconds == 0.0:
            return events
        self._bridge.check_caller("get_events()")
        first = self._events.take(None, seconds, "get_events()")
        return [first, *self._events.clear()]

    def clear_events(self) -> list[Message]:
        """Drop every queued event; return them, oldest first."""
        return self._events.clear()

    def event_wait(self, name: str, timeout: float | None = 60.0,
                   match: Mapping[str, object] | None = None) -> Message:
        """
        Take out the first event called `name` that matches `match`
        (see `event_match`), looking at queued events first, then
        waiting for new ones. Every other event stays queued, in order.

        :param match: None, or a mapping the event must match.
        :param timeout: One deadline for the whole wait, in seconds
            (None: as long as the session runs).
        :raise TimeoutError: When no such event comes in time.
        :raise StateError: When the session is not running (or ends)
            before such an event is queued.
        :raise TypeError: When `name` is not a str or `match` neither a
            mapping nor None (no event could ever match it).
        :raise ValueError: When `timeout` is NaN or negative.
        """
        return self.events_wait([(name, match)], timeout)

    def events_wait(self, events: Sequence[tuple[str, object]],
                    timeout: float | None = 60.0) -> Message:
        """
        Like `event_wait` for several kinds of events: `events` is a
        list of ``(name, match)``; the first event matching any of them
        is taken out and returned.

        :raise: As `event_wait`; `TypeError` for a malformed `events`.
        """
        wanted = []
        for item in events:
            if not (isinstance(item, tuple) and len(item) == 2
                    and isinstance(item[0], str)):
                raise TypeError("events must be (name, match) pairs, not "
                                f"{item!r}")
            name, match = item
            if match is not None and not isinstance(match, Mapping):
                raise TypeError(
                    f"the match for {name} must be a mapping or None, not "
                    f"{match!r}: an event is a mapping, so nothing else "
                    "could match it")
            wanted.append((name.upper(), match))
        seconds = timeout_seconds(timeout)
        self._bridge.check_caller("events_wait()")

        def matches(event: Message) -> bool:
            name = event.get("event")
            return isinstance(name, str) and any(
                name.upper() == wanted_name and event_match(event, match)
                for wanted_name, match in wanted)

        names = " or ".join(name for name, _ in wanted)
        return self._events.take(matches, seconds, f"waiting for {names}")

    @contextlib.contextmanager
    def listen(self, names: str | Iterable[str] | None = None,
               event_filter: EventFilter | None = None
               ) -> Iterator[BlockingListener]:
        """
        Context manager: a private listener that receives, for the
        block, the events accepted by `names` and `event_filter`,
        besides (not instead of) the client's own queue.

        The listener has ``get(timeout=None)``, ``get_nowait()``,
        ``empty()``, ``clear()`` and iteration (which ends when the
        session has ended and the listener is empty). `event_filter`
        runs in the loop thread: it must be quick and must not call the
        client.
        """
        listener = BlockingListener(self._core, names, event_filter)
        self._bridge.block_on_call("listen()", self._core.register_listener,
                                   listener)
        try:
            yield listener
        finally:
            if self._bridge.usable:
                self._bridge.block_on_call(
                    "listen()", self._core.remove_listener, listener)
