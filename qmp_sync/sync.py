"""
`QMPSyncClient`: the blocking, thread-safe QMP client.

Each client's session lives in an event loop run by a background thread
(one thread shared by every client, by default); the methods here block
only the thread that calls them. Events are queued as they arrive,
whether or not anybody waits for them.

Threads: everything here runs in caller threads and never touches
asyncio objects; ``qmp_sync._loop`` carries every call across.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._loop import BlockingListener, Bridge
from .events import EventFilter
from .message import Message
from .protocol import (
    DEFAULT_READBUFLEN,
    AsyncProtocol,
    ConnectError,
    Runstate,
    SocketAddr,
)
from .qmp_client import Exchange, QMPClient

if TYPE_CHECKING:
    from ssl import SSLContext

    from typing_extensions import Self

__all__ = ("BlockingListener", "QMPSyncClient", "event_match")

#: Connection failures that `connect(retry_until=...)` retries: nobody
#: listens yet, the socket file does not exist yet, or its listen
#: backlog is full.
_RETRIED = (ConnectionRefusedError, FileNotFoundError, BlockingIOError)
#: Longest pause between two connection attempts, in seconds.
_RETRY_PAUSE = 0.1


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


def _seconds(value: object, name: str) -> float | None:
    """Check a timeout argument: None or a number of seconds >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not "
                        f"{value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, not {value!r}")
    return float(value)


def _wait_seconds(wait: object) -> float | None:
    """Check a `pull_event` style wait: True is None (forever), a number
    is seconds (0 and False mean no wait: 0.0)."""
    if wait is True:
        return None
    if wait is False:
        return 0.0
    seconds = _seconds(wait, "wait")
    if seconds is None:
        raise TypeError("wait must be True, False or a number of seconds, "
                        "not None")
    return seconds


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
    """

    def __init__(self, address: SocketAddr | socket.socket | None = None,
                 *, name: str | None = None,
                 loop: asyncio.AbstractEventLoop | None = None,
                 readbuflen: int = DEFAULT_READBUFLEN) -> None:
        self._address = address
        core = QMPClient(name, readbuflen)
        # Events go to our thread-safe queue instead; the async client's
        # default queue would only grow.
        core.remove_listener(core.events)
        self._events = BlockingListener(core)
        core.register_listener(self._events)
        self._core = core
        self._bridge = Bridge(loop)
        self._bridge.adopt(core)
        # One connect/accept at a time, so that each one's negotiation
        # setting is its own.
        self._opening = threading.Lock()
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

    # ------------------------------------------------------------------
    # Opening and closing the session.

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
        :raise ConnectError: When connecting fails (after retrying, if
            asked to); ``.exc`` is the root cause. The client is IDLE.
        :raise TimeoutError: When `timeout` passes first; the client is
            IDLE.
        :raise StateError: When the client is not IDLE.
        :raise ValueError: When there is no address at all.
        """
        if address is None:
            address = self._address
        if address is None:
            raise ValueError("connect() needs an address; none was given "
                             "here or to the constructor")
        timeout = _seconds(timeout, "timeout")
        retry = _seconds(retry_until, "retry_until")
        start = time.monotonic()
        pause = 0.01
        with self._opening:
            while True:
                try:
                    self._bridge.run(
                        "connect()", self._core._open_session, negotiate,
                        self._core.connect, address, ssl,
                        timeout=_remaining(start, timeout))
                    return
                except ConnectError as err:
                    if (retry is None or isinstance(address, socket.socket)
                            or not isinstance(err.exc, _RETRIED)):
                        raise
                    # Give up when the next attempt would come after
                    # either deadline.
                    left = _remaining(start, timeout)
                    if (start + retry - time.monotonic() < pause
                            or (left is not None and left < pause)):
                        raise
                # A caller thread: sleeping here blocks nobody else.
                time.sleep(pause)
                pause = min(pause * 2, _RETRY_PAUSE)

    def open_with_socket(self, sock: socket.socket, *,
                         negotiate: bool = True,
                         timeout: float | None = None) -> None:
        """
        Start the session on an already-connected socket (one end of a
        socketpair handed to QEMU, say); the client owns it from now on.

        :raise: As `connect`; `TypeError` when `sock` is not a socket.
        """
        timeout = _seconds(timeout, "timeout")
        with self._opening:
            self._bridge.run(
                "open_with_socket()", self._core._open_session, negotiate,
                self._core.open_with_socket, sock, timeout=timeout)

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
        self._bridge.run("start_server()", self._core.start_server,
                         address, ssl)

    def accept(self, *, timeout: float | None = 15.0,
               negotiate: bool = True) -> None:
        """
        Wait for the peer to connect to the socket `start_server`
        opened, then start the session.

        :param timeout: Seconds the whole call may take. When nobody
            connects in time, the socket keeps listening and `accept`
            may be called again.
        :param negotiate: False to skip the greeting and negotiation.
        :raise TimeoutError: When `timeout` passes first.
        :raise ConnectError: When the session cannot be established;
            the client is IDLE.
        :raise StateError: When `start_server` was not called.
        """
        timeout = _seconds(timeout, "timeout")
        start = time.monotonic()
        with self._opening:
            try:
                self._bridge.run("accept()", self._core._wait_incoming,
                                 timeout=timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"accept(): nobody connected within {timeout:g} s; "
                    "still listening (call accept() again, or "
                    "disconnect() to stop)") from None
            self._bridge.run("accept()", self._core._open_session,
                             negotiate, self._core.accept,
                             timeout=_remaining(start, timeout))

    def disconnect(self) -> None:
        """
        End the session (or stop listening, or abort a connect in
        progress in another thread) and return to IDLE; idempotent.

        Commands still waiting for replies end with
        `ExecInterruptedError`; threads waiting for events wake up with
        `StateError` unless a matching event is queued. Queued events
        stay queued.

        :raise Exception: The failure that ended the session on its own
            (a `ProtocolError`, say), once; the client is IDLE all the
            same.
        """
        if self._core.runstate is Runstate.IDLE:
            return
        self._bridge.run("disconnect()", self._core.disconnect)

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
            pass, the command is abandoned (its late reply is dropped)
            and the session stays usable.
        :raise ExecuteError: When the server answers with an error.
        :raise TimeoutError: When `timeout` passes first.
        :raise ExecInterruptedError: When the session ends first.
        :raise StateError: When the client is not RUNNING.
        :raise TypeError: For a bad argument or a value that is not
            JSON-serialisable; nothing is sent.
        """
        return self.execute_msg(
            QMPClient.make_execute_msg(cmd, arguments, oob=oob),
            timeout=timeout)

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
        return QMPClient._reply_value(*self._exchange(msg, timeout))

    def execute_reply(self, msg: Mapping[str, object], *,
                      timeout: float | None = None) -> Message:
        """
        Execute a command message; return the whole reply, error replies
        included (nothing is raised for those). An id the client added
        is removed from the reply; the caller's own id stays.

        :raise: As `execute_msg`, except `ExecuteError`.
        """
        return QMPClient._reply_message(*self._exchange(msg, timeout))

    def _exchange(self, msg: Mapping[str, object],
                  timeout: float | None) -> Exchange:
        """Caller thread: send `msg`; block until its reply comes."""
        name = None
        if isinstance(msg, Mapping):
            name = msg.get("execute") or msg.get("exec-oob")
        reply: Exchange = self._bridge.submit(
            f"execute({name!r})", self._core._submit, msg,
            _seconds(timeout, "timeout"))
        return reply

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
        self._bridge.call("send_fd_scm()", self._core.send_fd_scm, fd)

    # ------------------------------------------------------------------
    # Events.

    def pull_event(self, wait: bool | float = False) -> Message | None:
        """
        Take the oldest queued event.

        :param wait: False or 0: do not wait (None when nothing is
            queued); True: wait as long as the session runs; a number:
            wait that many seconds at most.
        :raise TimeoutError: When a number of seconds passes first.
        :raise StateError: When waiting and the session is not running
            (or ends meanwhile) with nothing queued.
        """
        seconds = _wait_seconds(wait)
        if seconds == 0.0:
            return self._events.get_nowait()
        self._bridge.check_caller("pull_event()")
        return self._events.take(None, seconds, "pull_event()")

    def get_events(self, wait: bool | float = False) -> list[Message]:
        """
        Take every queued event, oldest first.

        :param wait: As for `pull_event`: when nothing is queued, wait
            for one event first (then take all that are queued).
        :raise: As `pull_event`.
        """
        events = self._events.clear()
        if events or _wait_seconds(wait) == 0.0:
            return events
        first = self.pull_event(wait)
        assert first is not None
        return [first, *self._events.clear()]

    def clear_events(self) -> list[Message]:
        """Drop every queued event; return them, oldest first."""
        return self._events.clear()

    def event_wait(self, name: str, timeout: float | None = 60.0,
                   match: object = None) -> Message:
        """
        Take out the first event called `name` that matches `match`
        (see `event_match`), looking at queued events first, then
        waiting for new ones. Every other event stays queued, in order.

        :param timeout: One deadline for the whole wait, in seconds
            (None: as long as the session runs).
        :raise TimeoutError: When no such event comes in time.
        :raise StateError: When the session is not running (or ends)
            before such an event is queued.
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
            wanted.append((item[0].upper(), item[1]))
        seconds = _seconds(timeout, "timeout")
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
        self._bridge.call("listen()", self._core.register_listener,
                          listener)
        try:
            yield listener
        finally:
            if self._bridge.usable:
                self._bridge.call("listen()", self._core.remove_listener,
                                  listener)

