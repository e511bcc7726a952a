"""
The crossing between caller threads and the event loop thread.

Ownership rules, checked by reading this file alone:

- Only the *loop thread* (the thread running the event loop a client's
  session lives in) touches asyncio objects: the loop, tasks, futures,
  transports, and the async client itself. Caller threads only read a
  client's ``runstate`` and ``greeting``.
- Caller threads reach the loop in exactly one way: `Bridge._schedule`,
  a ``call_soon_threadsafe`` made under the loop thread's lock, which
  refuses new work once the loop thread is stopping (`LoopThread.stop`
  schedules the shutdown itself under the same lock).
- The loop thread hands results back through a `Reply` (one per call)
  and events through a `BlockingListener`; both only ever release a
  lock or notify a condition on that side, never wait.
- A blocking call made *from* the loop thread fails at once
  (`Bridge.check_caller`) instead of deadlocking; so does one made in
  a child process on a client inherited across ``fork()``.

The shared loop thread (`LoopThread.shared`) is a daemon started on
first use, one per process; it is stopped at interpreter exit, ending
every session still open first.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Iterable, Iterator
from typing import Any, Callable, Generic, TypeVar

from .error import QMPError
from .events import EventFilter, EventSelector
from .message import Message
from .protocol import AsyncProtocol, Runstate, raise_state_error

__all__ = ("BlockingListener", "Bridge", "LoopThread", "Reply")

logger = logging.getLogger(__name__)

R = TypeVar("R")

#: How long a caller interrupted by KeyboardInterrupt waits for the
#: loop to abandon its work before re-raising.
_ABORT_GRACE = 2.0
#: How long ending the open sessions may take at interpreter exit.
_EXIT_GRACE = 2.0

# Bumped in a child process after fork(): objects made before it belong
# to the parent's loop thread, which does not exist in the child.
_fork_generation = 0


class _Aborted(BaseException):
    """Marks a `Reply` whose caller was interrupted; never raised to
    users (the caller re-raises its own KeyboardInterrupt)."""


class Reply(Generic[R]):
    """
    A one-shot slot: the loop thread sets it once, one caller thread
    waits for it.

    Waiting is a plain lock acquisition, released by the setter: the
    cheapest wake-up between two threads, with no asyncio object and no
    extra loop pass involved.
    """

    __slots__ = ("_error", "_lock", "_result", "abort", "done", "timer")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._result: R | None = None
        self._error: BaseException | None = None
        #: True once set. Loop thread only.
        self.done = False
        #: Loop thread only: how to abandon the work behind this reply;
        #: it returns True when the work will still set the reply itself
        #: once it has unwound (a cancelled task does).
        self.abort: Callable[[], object] | None = None
        #: Loop thread only: the timer of the call's timeout, if any.
        self.timer: asyncio.TimerHandle | None = None

    def set_result(self, result: R, /) -> None:
        """Runs in the loop thread: deliver `result`; later sets are
        ignored."""
        if not self.done:
            self._result = result
            self._finish()

    def set_exception(self, exception: BaseException, /) -> None:
        """Runs in the loop thread: deliver `exception`; later sets are
        ignored."""
        if not self.done:
            self._error = exception
            self._finish()

    def _finish(self) -> None:
        """Runs in the loop thread: stop the timer, wake the caller."""
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._lock.release()

    def wait(self, bridge: Bridge) -> R:
        """
        Runs in the caller thread: block until the reply is set, then
        return its result or raise its exception (the same object, so
        the traceback gains the caller's frames).

        A `KeyboardInterrupt` (or any exception raised by a signal
        handler) while blocked asks the loop to abandon the work, waits
        briefly for that, and propagates.
        """
        try:
            self._lock.acquire()
        except BaseException:
            with contextlib.suppress(QMPError):  # the loop is gone
                bridge._schedule(bridge._abort, self)
                self._lock.acquire(timeout=_ABORT_GRACE)
            raise
        error = self._error
        if error is not None:
            self._error = None  # no reference cycle through the traceback
            _end_daemon_thread_at_exit()
            raise error
        return self._result  # type: ignore[return-value]


class LoopThread:
    """
    A daemon thread running one event loop, shared by many clients.

    Use `shared()` for the process-wide one; the constructor starts a
    new thread and waits until its loop runs.
    """

    _shared: LoopThread | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        # Held while scheduling work and while setting `stopping`, so
        # that nothing is scheduled behind the shutdown (a stopped loop
        # would accept the work and never run it). Reentrant: a
        # finaliser run by the garbage collector inside a scheduling
        # call schedules work too.
        self.lock = threading.RLock()
        #: Set once stopping has begun; new work is refused from then on.
        self.stopping = False
        # The sessions to end at shutdown.
        self._clients: weakref.WeakSet[AsyncProtocol[Any]] = (
            weakref.WeakSet())
        running = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(running,), name="qmp_sync loop",
            daemon=True)
        self._thread.start()
        running.wait()

    @classmethod
    def shared(cls) -> LoopThread:
        """
        Runs in a caller thread: the process-wide loop thread, started on
        first use (and anew in a child process after ``fork()``).

        :raise QMPError: When the interpreter is shutting down.
        """
        with cls._shared_lock:
            shared = cls._shared
            if shared is None:
                if _exiting:
                    raise QMPError("the interpreter is shutting down; no "
                                   "new qmp_sync sessions can start")
                shared = cls._shared = cls()
            return shared

    def adopt(self, client: AsyncProtocol[Any]) -> None:
        """Runs in a caller thread: end `client`'s session, if still
        open, when this loop thread stops."""
        with self.lock:
            self._clients.add(client)

    def _run(self, running: threading.Event) -> None:
        """Runs in the loop thread: the loop, then its cleanup."""
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.call_soon(running.set)
        try:
            loop.run_forever()
        finally:
            # Whatever is left (nothing, normally) is cancelled and run
            # to its end, so no task is destroyed while pending.
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.wait(leftovers))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()

    def stop(self, timeout: float = _EXIT_GRACE + 1.0) -> None:
        """
        Runs in a caller thread (never the loop thread): end every open
        session, stop the loop and wait for the thread to finish (at
        most `timeout` seconds: it is a daemon, so exit never hangs on
        it). Idempotent.
        """
        with self.lock:
            if self.stopping:
                return
            # Set before the stop is scheduled: from here on every new
            # call is refused instead of queued behind the stop.
            self.stopping = True
            self.loop.call_soon_threadsafe(self._start_shutdown)
        self._thread.join(timeout)

    def _start_shutdown(self) -> None:
        """Runs in the loop thread: see `stop`."""
        self.loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        """Runs in the loop thread: end open sessions, stop the loop."""
        open_clients = [client for client in self._clients
                        if client.runstate is not Runstate.IDLE]
        if open_clients:
            logger.debug("Ending %d open session(s) at exit.",
                         len(open_clients))
            await asyncio.wait(
                [self.loop.create_task(client._reset_quietly())
                 for client in open_clients],
                timeout=_EXIT_GRACE)
        self.loop.stop()


_exiting = False


@atexit.register
def _stop_shared_loop_thread() -> None:
    """Runs in the main thread at exit, after the other non-daemon
    threads have finished: stop the shared loop thread."""
    global _exiting
    with LoopThread._shared_lock:
        _exiting = True
        shared, LoopThread._shared = LoopThread._shared, None
    if shared is not None:
        shared.stop()


def _end_daemon_thread_at_exit() -> None:
    """
    Runs in a caller thread about to raise because its session ended:
    when that is the interpreter exiting and this is a daemon thread (the
    only kind still running then), end the thread quietly instead of
    printing a traceback for an error nobody will handle.
    """
    if _exiting and threading.current_thread().daemon:
        raise SystemExit


def _after_fork_in_child() -> None:
    """Runs in the child after fork(): the parent's loop thread does not
    exist here; the next client starts a new one."""
    global _fork_generation
    _fork_generation += 1
    # The lock may have been held by another thread of the parent.
    LoopThread._shared_lock = threading.Lock()
    LoopThread._shared = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class Bridge:
    """
    One client's way into the loop that hosts its session.

    :param loop: An event loop the caller runs in a thread of its own
        with ``run_forever()``; None for the shared loop thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None
                 ) -> None:
        self._host: LoopThread | None = None
        if loop is None:
            self._host = LoopThread.shared()
            loop = self._host.loop
        #: The loop the session lives in.
        self.loop = loop
        self._generation = _fork_generation

    def adopt(self, client: AsyncProtocol[Any]) -> None:
        """Runs in a caller thread: have the shared loop thread end
        `client`'s session at exit (a caller's own loop is theirs to
        manage)."""
        if self._host is not None:
            self._host.adopt(client)

    @property
    def usable(self) -> bool:
        """Any thread: False once this bridge can carry no more work
        (loop thread stopped or closed, or inherited across fork)."""
        if self._generation != _fork_generation or self.loop.is_closed():
            return False
        return self._host is None or not self._host.stopping

    def check_caller(self, what: str) -> None:
        """
        Runs in a caller thread: raise `QMPError` if `what` (a blocking
        call) cannot work from here.
        """
        if self._generation != _fork_generation:
            raise QMPError(
                f"{what}: this client was created in the parent process "
                "before fork(); its loop thread does not exist in this "
                "child process. Create a new client here.")
        if asyncio._get_running_loop() is self.loop:
            raise QMPError(
                f"{what} is a blocking call and was made from the "
                "client's own event loop thread (an event filter, say), "
                "where it would deadlock; call it from another thread")

    def _schedule(self, func: Callable[..., object], *args: object) -> None:
        """
        Runs in a caller thread: have the loop thread run
        ``func(*args)`` soon.

        :raise QMPError: When the loop thread is stopping or the loop is
            closed or not running.
        """
        host = self._host
        if host is None:
            if not self.loop.is_running():
                raise QMPError("the event loop given to this client is not "
                               "running (start it with run_forever() in a "
                               "thread of its own)")
            try:
                self.loop.call_soon_threadsafe(func, *args)
            except RuntimeError as err:  # closed meanwhile
                raise QMPError(f"the client's event loop is closed: {err}"
                               ) from None
            return
        with host.lock:
            if host.stopping:
                raise QMPError("the qmp_sync loop thread has stopped (the "
                               "interpreter is exiting)")
            self.loop.call_soon_threadsafe(func, *args)

    # ------------------------------------------------------------------
    # Blocking calls; the public methods run in caller threads.

    def call(self, what: str, func: Callable[..., R], *args: object) -> R:
        """
        Run ``func(*args)`` (a plain function) in the loop thread; block
        until it returns; return its result or raise its exception.
        """
        self.check_caller(what)
        reply: Reply[R] = Reply()
        self._schedule(self._call, reply, func, args)
        return reply.wait(self)

    @staticmethod
    def _call(reply: Reply[R], func: Callable[..., R],
              args: tuple[object, ...]) -> None:
        """Runs in the loop thread: see `call`."""
        try:
            result = func(*args)
        except Exception as err:
            reply.set_exception(err)
        else:
            reply.set_result(result)

    def submit(self, what: str,
               begin: Callable[[Any, Reply[R]], Callable[[], object]],
               arg: object, timeout: float | None = None) -> R:
        """
        Start an operation in the loop thread and block until it ends:
        ``begin(arg, reply)`` starts it there and returns the function
        that abandons it; the operation later sets `reply`. No task is
        made: this is the path of every command.

        :raise TimeoutError: When `timeout` seconds pass first; the loop
            has abandoned the operation by the time this raises.
        """
        self.check_caller(what)
        reply: Reply[R] = Reply()
        self._schedule(self._begin, reply, begin, arg, timeout, what)
        return reply.wait(self)

    def _begin(self, reply: Reply[R],
               begin: Callable[[Any, Reply[R]], Callable[[], object]],
               arg: object, timeout: float | None, what: str) -> None:
        """Runs in the loop thread: see `submit`."""
        try:
            reply.abort = begin(arg, reply)
        except Exception as err:
            reply.set_exception(err)
            return
        if timeout is not None and not reply.done:
            reply.timer = self.loop.call_later(
                timeout, self._expire, reply, what, timeout)

    @staticmethod
    def _expire(reply: Reply[Any], what: str, timeout: float) -> None:
        """Runs in the loop thread: the timeout of `submit` ran out."""
        reply.timer = None
        if not reply.done:
            assert reply.abort is not None
            reply.abort()
            reply.set_exception(TimeoutError(
                f"{what} timed out after {timeout:g} s"))

    def run(self, what: str, func: Callable[..., Awaitable[R]],
            *args: object, timeout: float | None = None) -> R:
        """
        Run coroutine ``func(*args)`` as a task in the loop thread;
        block until the task has finished; return its result or raise
        its exception.

        (``run_coroutine_threadsafe`` would do, but cancelling its
        future does not wait for the task to finish; the task's own
        done-callback does.) The coroutine is made in the loop thread,
        so a call refused here leaves no coroutine never awaited.

        :raise TimeoutError: When `timeout` seconds pass first; the task
            has been cancelled and has finished by the time this raises.
        """
        self.check_caller(what)
        reply: Reply[R] = Reply()
        self._schedule(self._start_task, reply, func, args, timeout, what)
        return reply.wait(self)

    def _start_task(self, reply: Reply[R],
                    func: Callable[..., Awaitable[R]],
                    args: tuple[object, ...], timeout: float | None,
                    what: str) -> None:
        """Runs in the loop thread: see `run`."""
        try:
            task = asyncio.ensure_future(func(*args), loop=self.loop)
        except Exception as err:
            reply.set_exception(err)
            return
        timed_out: list[float] = []

        def expire() -> None:
            if task.cancel():
                timed_out.append(timeout or 0.0)

        def finished(task: asyncio.Future[R]) -> None:
            if not task.cancelled():
                error = task.exception()
                if error is None:
                    reply.set_result(task.result())
                else:
                    reply.set_exception(error)
            elif timed_out:
                reply.set_exception(TimeoutError(
                    f"{what} timed out after {timeout:g} s"))
            else:
                reply.set_exception(_Aborted())

        reply.abort = task.cancel
        if timeout is not None:
            reply.timer = self.loop.call_later(timeout, expire)
        task.add_done_callback(finished)

    def _abort(self, reply: Reply[Any]) -> None:
        """Runs in the loop thread: the caller waiting for `reply` was
        interrupted; abandon its work."""
        if reply.done:
            return
        if reply.abort is None or not reply.abort():
            reply.set_exception(_Aborted())

    def release(self, client: AsyncProtocol[Any]) -> None:
        """
        Any thread, never blocks (a finaliser calls it): start ending
        `client`'s session if it is still open. Does nothing when the
        loop is gone.
        """
        if client.runstate is Runstate.IDLE or not self.usable:
            return
        with contextlib.suppress(QMPError):
            self._schedule(self._start_release, client)

    def _start_release(self, client: AsyncProtocol[Any]) -> None:
        """Runs in the loop thread: see `release`."""
        self.loop.create_task(client._reset_quietly())


class BlockingListener(EventSelector):
    """
    A thread-safe queue of the events a client received that this
    listener accepts: the loop thread puts, caller threads take.

    :param client: The async client whose events these are; its
        runstate tells waiters whether more events can come.
    :param names: See `EventSelector`.
    :param event_filter: See `EventSelector` (runs in the loop thread).
    """

    def __init__(self, client: AsyncProtocol[Any],
                 names: str | Iterable[str] | None = None,
                 event_filter: EventFilter | None = None) -> None:
        super().__init__(names, event_filter)
        self._client = client
        self._cond = threading.Condition(threading.Lock())
        # (sequence number, event), oldest first; the numbers let a
        # waiter look only at what arrived since it last looked.
        self._queue: collections.deque[tuple[int, Message]] = (
            collections.deque())
        self._count = 0
        self._waiting = 0
        # Loop thread only: a wake-up of the waiters is scheduled.
        self._wake_scheduled = False

    def __repr__(self) -> str:
        names = "all" if self.names is None else sorted(self.names)
        return (f"<{type(self).__name__} names={names} "
                f"queued={len(self._queue)}>")

    # ------------------------------------------------------------------
    # The loop thread's side: never blocks beyond the short critical
    # sections of the caller side.

    def put(self, event: Message) -> None:
        """
        Runs in the loop thread: queue `event`; wake waiters once the
        reader has handled everything it has read so far.

        Waking them at each event would have them take events one by
        one, fighting the reader for the GIL at every event of a burst;
        waking them at the end of the batch costs one loop pass.
        """
        with self._cond:
            self._queue.append((self._count, event))
            self._count += 1
            if self._waiting and not self._wake_scheduled:
                self._wake_scheduled = True
                asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        """Runs in the loop thread: wake the waiters."""
        with self._cond:
            self._wake_scheduled = False
            self._cond.notify_all()

    def session_ended(self) -> None:
        """Runs in the loop thread: wake waiters, who then find that no
        more events can come."""
        with self._cond:
            if self._waiting:
                self._cond.notify_all()

    # ------------------------------------------------------------------
    # The caller threads' side.

    def empty(self) -> bool:
        """True when no event is queued."""
        return not self._queue

    def clear(self) -> list[Message]:
        """Drop every queued event; return them, oldest first."""
        with self._cond:
            events = [event for _, event in self._queue]
            self._queue.clear()
        return events

    def get(self, timeout: float | None = None) -> Message:
        """
        Take the oldest queued event, waiting for one if none is queued.

        :param timeout: Seconds to wait at most; None waits as long as
            the session runs.
        :raise TimeoutError: When `timeout` passes first.
        :raise StateError: When no event is queued and the session is
            not running (or ends while waiting).
        """
        return self.take(None, timeout, "get()")

    def get_nowait(self) -> Message | None:
        """The oldest queued event, taken out, or None."""
        with self._cond:
            return self._queue.popleft()[1] if self._queue else None

    def __iter__(self) -> Iterator[Message]:
        """Yield events as they come, until the session has ended and
        the queue is empty."""
        while True:
            try:
                yield self.get()
            except QMPError:
                if self._client.runstate is Runstate.RUNNING:
                    raise
                return

    def take(self, match: Callable[[Message], bool] | None,
             timeout: float | None, what: str) -> Message:
        """
        Take out the first queued event for which `match` holds (the
        oldest event when `match` is None), looking at queued events
        first and then waiting for new ones; every other event stays
        queued, in order.

        :param timeout: One deadline for the whole wait, in seconds;
            None waits as long as the session runs.
        :param what: The call, for error messages.
        :raise TimeoutError: When the deadline passes first.
        :raise StateError: When the session is not running (or ends)
            before a matching event is queued.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = -1  # sequence number of the last event looked at
        with self._cond:
            while True:
                found = self._find(match, seen)
                if found is not None:
                    return found
                if self._queue:
                    seen = self._queue[-1][0]
                if self._client.runstate is not Runstate.RUNNING:
                    _end_daemon_thread_at_exit()
                    raise_state_error(self._client, Runstate.RUNNING)
                remaining = None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"{what}: no matching event within "
                            f"{timeout:g} s")
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1

    def _find(self, match: Callable[[Message], bool] | None,
              seen: int) -> Message | None:
        """Caller thread, lock held: take out the first event newer than
        `seen` for which `match` holds, if any."""
        queue = self._queue
        if not queue:
            return None
        if match is None:
            return queue.popleft()[1]
        # Count the events that arrived after `seen` (from the right:
        # only those are new), then look at them oldest first.
        start = len(queue)
        while start > 0 and queue[start - 1][0] > seen:
            start -= 1
        for index in range(start, len(queue)):
            event = queue[index][1]
            if match(event):
                del queue[index]
                return event
        return None
