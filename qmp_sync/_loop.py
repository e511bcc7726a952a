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
  schedules the shutdown itself under the same lock). Every blocking
  call is a `Bridge.block_on`: the loop starts the work, a timer (if
  any) abandons it, and the result comes back through a `Handoff`,
  which the loop thread fills by releasing a lock, never waiting.
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
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Coroutine
from functools import partial
from typing import Any, Callable, Generic, TypeVar

from .error import QMPError
from .protocol import AsyncProtocol, Runstate, disconnect_quietly

__all__ = (
    "SIGNAL_POLL",
    "Bridge",
    "Handoff",
    "LoopThread",
    "Starter",
    "end_daemon_thread_at_exit",
)

logger = logging.getLogger(__name__)

R = TypeVar("R")

#: How long a caller interrupted by KeyboardInterrupt waits for the
#: loop to abandon its work before re-raising.
_ABORT_GRACE = 2.0
#: Longest a blocked caller sleeps between two looks for a pending
#: signal. A blocked lock acquisition is not always interrupted by a
#: signal: with uvloop running in the process, a SIGINT sent to the main
#: thread was seen to stay pending (Ctrl-C ignored) until the call
#: returned. Waking up now and then lets the Python-level handler run,
#: and a KeyboardInterrupt be raised, within this many seconds.
SIGNAL_POLL = 0.1
#: How long ending the open sessions may take at interpreter exit.
_EXIT_GRACE = 2.0

# Bumped in a child process after fork(): objects made before it belong
# to the parent's loop thread, which does not exist in the child.
_fork_generation = 0


class _Aborted(BaseException):
    """Marks a `Handoff` whose caller was interrupted; never raised to
    users (the caller re-raises its own KeyboardInterrupt)."""


#: Started in the loop thread by `Bridge.block_on`: begins the work,
#: which fills the hand-off later (or at once), and returns how to
#: abandon it, or None when it cannot be abandoned. Abandoning returns
#: True when the work will still fill the hand-off itself once it has
#: unwound (a cancelled task does).
Starter = Callable[["Handoff[R]"], "Callable[[], object] | None"]


class Handoff(Generic[R]):
    """
    A one-shot slot: the loop thread fills it once, one caller thread
    waits for it.

    Waiting is a plain lock acquisition, released by the filler: the
    cheapest wake-up between two threads, with no asyncio object and no
    extra loop pass involved.
    """

    __slots__ = (
        "_error",
        "_lock",
        "_result",
        "abort",
        "done",
        "timed_out",
        "timer",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._result: R | None = None
        self._error: BaseException | None = None
        #: Loop thread only: True once filled.
        self.done = False
        #: Loop thread only: how to abandon the work (see `Starter`).
        self.abort: Callable[[], object] | None = None
        #: Loop thread only: the timer of the call's timeout, if any.
        self.timer: asyncio.TimerHandle | None = None
        #: Loop thread only: the error to raise once the timeout has
        #: passed and the work has unwound.
        self.timed_out: TimeoutError | None = None

    def set_result(self, result: R, /) -> None:
        """Runs in the loop thread: deliver `result`; later fills are
        ignored."""
        if not self.done:
            self._result = result
            self._finish()

    def set_exception(self, exception: BaseException, /) -> None:
        """Runs in the loop thread: deliver `exception`; later fills are
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

    def wait(self, interrupted: Callable[[], None]) -> R:
        """
        Runs in the caller thread: block until filled, then return the
        result or raise the exception (the same object, so the traceback
        gains the caller's frames).

        A `KeyboardInterrupt` (or any exception a signal handler raises)
        while blocked calls `interrupted` (which asks the loop to abandon
        the work), waits briefly for the loop to do so, and propagates.
        """
        try:
            while not self._lock.acquire(timeout=SIGNAL_POLL):
                pass
        except BaseException:
            with contextlib.suppress(QMPError):  # the loop is gone
                interrupted()
                self._lock.acquire(timeout=_ABORT_GRACE)
            raise
        error = self._error
        if error is not None:
            self._error = None  # no reference cycle through the traceback
            end_daemon_thread_at_exit()
            raise error
        return self._result  # type: ignore[return-value]


#: The environment variable that picks the loop of the library's own
#: thread: ``asyncio`` (the standard library's) or ``uvloop``.
LOOP_VARIABLE = "QMP_SYNC_LOOP"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """
    Runs in a caller thread: a new event loop for the library's own
    loop thread: uvloop's when it is installed (``pip install
    qmp_sync[speed]``), else the standard library's; ``QMP_SYNC_LOOP``
    set to ``asyncio`` forces the standard one, set to ``uvloop`` asks
    for uvloop and fails without it. A loop a caller passes with
    ``loop=`` is never replaced.

    :raise QMPError: When ``QMP_SYNC_LOOP`` has another value, or asks
        for uvloop and it is not installed.
    """
    choice = os.environ.get(LOOP_VARIABLE, "")
    if choice not in ("", "asyncio", "uvloop"):
        raise QMPError(f"{LOOP_VARIABLE} must be 'asyncio' or 'uvloop', "
                       f"not {choice!r}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise QMPError(f"{LOOP_VARIABLE}=uvloop, but uvloop is not "
                               "installed (pip install qmp_sync[speed])"
                               ) from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


class LoopThread:
    """
    A daemon thread running one event loop, shared by many clients.

    Use `shared()` for the process-wide one; the constructor starts a
    new thread and waits until its loop runs.
    """

    _shared: LoopThread | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = new_event_loop()
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
        #: The loop thread's identifier.
        self.ident = self._thread.ident

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
                [self.loop.create_task(disconnect_quietly(client))
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


def end_daemon_thread_at_exit() -> None:
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

    Every blocking call goes through `block_on` (directly, or through
    `block_on_call` and `block_on_coroutine`, which build its starter):
    one scheduling path, one timeout rule, one interruption rule.

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
        host = self._host
        if host is not None:
            # Our own thread: comparing thread ids is cheaper than asking
            # asyncio, which raises in a thread without a loop.
            in_loop = threading.get_ident() == host.ident
        else:
            try:
                in_loop = asyncio.get_running_loop() is self.loop
            except RuntimeError:
                in_loop = False
        if in_loop:
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

    def block_on(self, what: str, start: Starter[R],
                 timeout: float | None = None) -> R:
        """
        Runs in a caller thread: have the loop thread call
        ``start(handoff)``, then block until the work it began fills the
        hand-off; return its result or raise its exception.

        :param what: The call, for error messages.
        :param timeout: Seconds (already checked, see
            ``util.timeout_seconds``), or None for no limit.
        :raise TimeoutError: When `timeout` passes first; the loop has
            abandoned the work (and, where abandoning takes time, seen it
            unwind) by the time this raises.
        :raise QMPError: When the call cannot be made from this thread,
            or the loop is gone.
        """
        self.check_caller(what)
        handoff: Handoff[R] = Handoff()
        self._schedule(self._start, handoff, start, timeout, what)
        return handoff.wait(partial(self._schedule, self._abandon, handoff))

    def _start(self, handoff: Handoff[R], start: Starter[R],
               timeout: float | None, what: str) -> None:
        """Runs in the loop thread: see `block_on`."""
        try:
            handoff.abort = start(handoff)
        except Exception as err:
            handoff.set_exception(err)
            return
        if timeout is not None and not handoff.done:
            handoff.timer = self.loop.call_later(
                timeout, self._expire, handoff, what, timeout)

    @staticmethod
    def _expire(handoff: Handoff[Any], what: str, timeout: float) -> None:
        """Runs in the loop thread: the timeout of `block_on` ran out."""
        handoff.timer = None
        if handoff.done:
            return
        handoff.timed_out = TimeoutError(
            f"{what} timed out after {timeout:g} s")
        abort = handoff.abort
        if abort is None or not abort():
            handoff.set_exception(handoff.timed_out)

    @staticmethod
    def _abandon(handoff: Handoff[Any]) -> None:
        """Runs in the loop thread: the caller waiting for `handoff` was
        interrupted; abandon its work."""
        if handoff.done:
            return
        abort = handoff.abort
        if abort is None or not abort():
            handoff.set_exception(_Aborted())

    def block_on_call(self, what: str, func: Callable[..., R],
                      *args: object) -> R:
        """
        Runs in a caller thread: run ``func(*args)`` (a plain function)
        in the loop thread; block until it returns; return its result or
        raise its exception.
        """
        def start(handoff: Handoff[R]) -> None:
            handoff.set_result(func(*args))
        return self.block_on(what, start)

    def block_on_coroutine(self, what: str,
                           func: Callable[..., Coroutine[Any, Any, R]],
                           *args: object, timeout: float | None = None
                           ) -> R:
        """
        Runs in a caller thread: run coroutine ``func(*args)`` as a task
        in the loop thread; block until the task has finished; return
        its result or raise its exception.

        On a timeout (or an interruption) the task is cancelled and has
        finished by the time this raises. The coroutine is made in the
        loop thread, so a call refused here leaves no coroutine never
        awaited.
        """
        def start(handoff: Handoff[R]) -> Callable[[], bool]:
            task = self.loop.create_task(func(*args))

            def finished(task: asyncio.Task[R]) -> None:
                if task.cancelled():
                    handoff.set_exception(handoff.timed_out or _Aborted())
                    return
                error = task.exception()
                if error is None:
                    handoff.set_result(task.result())
                else:
                    handoff.set_exception(error)

            task.add_done_callback(finished)
            return task.cancel
        return self.block_on(what, start, timeout)

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
        self.loop.create_task(disconnect_quietly(client))
