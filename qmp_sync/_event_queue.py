"""
`BlockingListener`: the thread-safe event queue of the blocking facade.

The loop thread puts the events a client receives; caller threads take
them, waiting on a condition. A queue costs little while it is read:
up to `COMPACT_AFTER` queued events are kept as parsed messages, and
events queued beyond those as their compact JSON (about twice their
size on the wire instead of some thirteen times), parsed again when
taken. An optional cap drops the oldest events past it, counted and
logged, never silently.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Union

from ._loop import SIGNAL_POLL, end_daemon_thread_at_exit
from .error import QMPError
from .events import EventFilter, EventSelector
from .message import Message, decode
from .protocol import AsyncProtocol, Runstate, raise_state_error
from .util import timeout_seconds

__all__ = ("COMPACT_AFTER", "BlockingListener")

logger = logging.getLogger(__name__)

#: How many queued events are kept parsed; later ones are stored as
#: compact JSON until the queue shrinks.
COMPACT_AFTER = 10_000

# Compact JSON that decodes to the very same value (NaN included, which
# a server may send): json.loads(_compact(x)) == x for anything json
# decoded.
_compact = json.JSONEncoder(separators=(",", ":"), allow_nan=True,
                            check_circular=False).encode

#: A queued event: parsed, or compact JSON to parse when taken.
_Stored = Union[Message, bytes]


def _parsed(stored: _Stored) -> Message:
    """The event held by a queue entry, as a `Message`."""
    if isinstance(stored, bytes):
        value = decode(stored)
        assert isinstance(value, dict)
        return Message.adopt(value)
    return stored


class BlockingListener(EventSelector):
    """
    A thread-safe queue of the events a client received that this
    listener accepts: the loop thread puts, caller threads take.

    :param client: The async client whose events these are; its
        runstate tells waiters whether more events can come.
    :param names: See `EventSelector`.
    :param event_filter: See `EventSelector` (runs in the loop thread).
    :param max_queued: At most this many events stay queued: past it
        the oldest are dropped, counted in `dropped` and logged (one
        warning per overflow). None keeps every event.
    :raise ValueError: When `max_queued` is not positive.
    """

    def __init__(self, client: AsyncProtocol[Any],
                 names: str | Iterable[str] | None = None,
                 event_filter: EventFilter | None = None, *,
                 max_queued: int | None = None) -> None:
        super().__init__(names, event_filter)
        if max_queued is not None and (
                isinstance(max_queued, bool)
                or not isinstance(max_queued, int) or max_queued < 1):
            raise ValueError("the event queue's cap must be a positive int "
                             f"or None, not {max_queued!r}")
        self._client = client
        self._max_queued = max_queued
        self._cond = threading.Condition(threading.Lock())
        # (sequence number, event), oldest first; the numbers let a
        # waiter look only at what arrived since it last looked.
        self._queue: collections.deque[tuple[int, _Stored]] = (
            collections.deque())
        self._count = 0
        self._waiting = 0
        #: How many events were dropped because the queue was full.
        self.dropped = 0
        # Loop thread only: a warning was logged for this overflow.
        self._overflowing = False
        # Loop thread only: events were queued since the last flush.
        self._unflushed = False

    def __repr__(self) -> str:
        names = "all" if self.names is None else sorted(self.names)
        return (f"<{type(self).__name__} names={names} "
                f"queued={len(self._queue)}>")

    # ------------------------------------------------------------------
    # The loop thread's side: never blocks beyond the short critical
    # sections of the caller side.

    def put(self, event: Message) -> None:
        """
        Runs in the loop thread: queue `event`; waiters are woken at the
        next `flush`, once the client has handled everything it has
        read so far.

        Waking them at each event would have them take events one by
        one, fighting the reader for the GIL at every event of a burst.
        """
        stored: _Stored = event
        if len(self._queue) >= COMPACT_AFTER:
            # Outside the lock: encoding takes a while.
            stored = _compact(event.data).encode("utf-8")
        with self._cond:
            queue = self._queue
            cap = self._max_queued
            if cap is not None and len(queue) >= cap:
                queue.popleft()
                self.dropped += 1
                if not self._overflowing:
                    self._overflowing = True
                    logger.warning(
                        "Event queue full (%d events nobody took): "
                        "dropping the oldest; %d dropped so far",
                        cap, self.dropped)
            elif cap is not None and len(queue) <= cap // 2:
                # Drained well below the cap: a later overflow is a new
                # one, and is logged again.
                self._overflowing = False
            queue.append((self._count, stored))
            self._count += 1
            self._unflushed = True

    def flush(self) -> None:
        """Runs in the loop thread: wake the waiters, if events came
        since the last flush."""
        if self._unflushed:
            self._unflushed = False
            with self._cond:
                if self._waiting:
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
            stored = [event for _, event in self._queue]
            self._queue.clear()
        return [_parsed(event) for event in stored]

    def get(self, timeout: float | None = None) -> Message:
        """
        Take the oldest queued event, waiting for one if none is queued.

        :param timeout: Seconds to wait at most; None (or infinity) waits
            as long as the session runs.
        :raise TimeoutError: When `timeout` passes first.
        :raise StateError: When no event is queued and the session is
            not running (or ends while waiting).
        :raise ValueError: For a NaN or negative `timeout`.
        """
        return self.take(None, timeout_seconds(timeout), "get()")

    def get_nowait(self) -> Message | None:
        """The oldest queued event, taken out, or None."""
        with self._cond:
            if not self._queue:
                return None
            stored = self._queue.popleft()[1]
        return _parsed(stored)

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

        :param timeout: One deadline for the whole wait, in seconds
            (already checked, see ``util.timeout_seconds``); None waits
            as long as the session runs.
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
                state = self._client.runstate
                if state is not Runstate.RUNNING:
                    end_daemon_thread_at_exit()
                    raise_state_error(self._client, Runstate.RUNNING, state)
                pause = SIGNAL_POLL  # see SIGNAL_POLL
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"{what}: no matching event within "
                            f"{timeout:g} s")
                    pause = min(pause, remaining)
                self._waiting += 1
                try:
                    self._cond.wait(pause)
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
            return _parsed(queue.popleft()[1])
        # Count the events that arrived after `seen` (from the right:
        # only those are new), then look at them oldest first.
        start = len(queue)
        while start > 0 and queue[start - 1][0] > seen:
            start -= 1
        for index in range(start, len(queue)):
            event = _parsed(queue[index][1])
            if match(event):
                del queue[index]
                return event
        return None
