"""
Event delivery for the async client: `EventListener` and `Events`.

A client hands every inbound event to each registered listener (an
`EventSelector`) whose names and filter accept it. `EventListener`
queues what it accepts until somebody takes it with `EventListener.get`
(or ``async for``).

Threads: all of this runs in the loop thread; nothing here is
thread-safe. The blocking facade hands events to other threads through
a listener of its own (``qmp_sync._loop.BlockingListener``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Callable

from .message import Message
from .util import exception_summary

__all__ = ("EventFilter", "EventListener", "EventSelector", "Events")

logger = logging.getLogger(__name__)

#: A predicate on events: True to accept the event.
EventFilter = Callable[[Message], bool]


class EventSelector:
    """
    The part every listener shares: which events it accepts. Subclasses
    say what happens to an accepted event (`put`).

    :param names: An event name, or several; None accepts every name.
        Names compare case-insensitively.
    :param event_filter: Called with each event whose name matched;
        return True to accept it. Runs in the loop thread, inside the
        reader: keep it quick and never block in it. If it raises, the
        error is logged and the event is not queued here.
    """

    def __init__(self, names: str | Iterable[str] | None = None,
                 event_filter: EventFilter | None = None) -> None:
        if isinstance(names, str):
            names = (names,)
        #: The accepted event names (upper case), or None for all.
        self.names: frozenset[str] | None = (
            None if names is None else frozenset(n.upper() for n in names))
        #: The filter given at construction, if any.
        self.event_filter = event_filter

    def accepts(self, event: Message) -> bool:
        """
        Runs in the loop thread: True when `event` passes the name list
        and the filter.

        :raise Exception: Whatever the filter raises.
        """
        if self.names is not None:
            name = event.get("event")
            if not isinstance(name, str) or name.upper() not in self.names:
                return False
        return self.event_filter is None or bool(self.event_filter(event))

    def put(self, event: Message) -> None:
        """Runs in the loop thread: take an accepted event. Never
        blocks."""
        raise NotImplementedError

    def session_ended(self) -> None:
        """Runs in the loop thread: the session that fed this listener
        has ended (no more events until the next one). Never blocks."""

    def flush(self) -> None:
        """Runs in the loop thread: the client has handled everything it
        has read so far; a listener that defers waking its waiters (a
        blocking one: waking other threads at every event of a burst
        costs more than it brings) wakes them now. Never blocks."""


class EventListener(EventSelector):
    """
    A queue of the events a client received that this listener accepts.

    :param names: An event name, or several; None accepts every name.
        Names compare case-insensitively.
    :param event_filter: See `EventSelector`.
    :param history_len: How many of the most recent accepted events
        `history` keeps.
    """

    def __init__(self, names: str | Iterable[str] | None = None,
                 event_filter: EventFilter | None = None, *,
                 history_len: int = 1000) -> None:
        super().__init__(names, event_filter)
        #: The most recent events this listener accepted, oldest first.
        self.history: collections.deque[Message] = collections.deque(
            maxlen=history_len)
        self._queue: collections.deque[Message] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        names = "all" if self.names is None else sorted(self.names)
        return (f"<{type(self).__name__} names={names} "
                f"queued={len(self._queue)}>")

    def put(self, event: Message) -> None:
        """
        Runs in the loop thread: queue an accepted event and wake a
        waiting `get`. Never blocks.
        """
        self.history.append(event)
        self._queue.append(event)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> Message:
        """
        Runs in the loop thread: wait for the next event and return it.

        Cancellation is safe: no event is lost.
        """
        while not self._queue:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            # shield: one cancelled getter must not cancel the shared
            # waiter of the others.
            await asyncio.shield(self._waiter)
        return self._queue.popleft()

    def empty(self) -> bool:
        """True when no event is queued."""
        return not self._queue

    def clear(self) -> list[Message]:
        """Drop every queued event; return them, oldest first."""
        events = list(self._queue)
        self._queue.clear()
        return events

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        return await self.get()


class Events:
    """
    Mixin: a set of listeners fed with every event the client receives.

    ``self.events`` is the default listener: it accepts every event.
    """

    def __init__(self) -> None:
        #: The default listener; receives every event.
        self.events = EventListener()
        # A tuple replaced on change, so dispatch iterates a snapshot even
        # if a filter registers or removes listeners.
        self._listeners: tuple[EventSelector, ...] = (self.events,)
        # A flush of the listeners is scheduled (see _schedule_flush).
        self._flush_scheduled = False

    def register_listener(self, listener: EventSelector) -> None:
        """
        Start feeding `listener` with events.

        :raise ValueError: When it is registered already.
        """
        if listener in self._listeners:
            raise ValueError(f"{listener!r} is already registered")
        self._listeners += (listener,)

    def remove_listener(self, listener: EventSelector) -> None:
        """
        Stop feeding `listener`; its queued events stay in it.

        :raise ValueError: When it is not registered.
        """
        if listener not in self._listeners:
            raise ValueError(f"{listener!r} is not registered")
        self._listeners = tuple(
            item for item in self._listeners if item is not listener)

    @contextlib.contextmanager
    def listen(self, *listeners: EventSelector) -> Iterator[None]:
        """
        Context manager: register `listeners` for the block, remove them
        after it.

        :raise ValueError: When one of them is registered already.
        """
        with contextlib.ExitStack() as registered:
            for listener in listeners:
                self.register_listener(listener)
                registered.callback(self.remove_listener, listener)
            yield

    @contextlib.contextmanager
    def listener(self, names: str | Iterable[str] | None = None,
                 event_filter: EventFilter | None = None
                 ) -> Iterator[EventListener]:
        """
        Context manager: a new listener, registered for the block.

        :param names: See `EventListener`.
        :param event_filter: See `EventListener`.
        """
        listener = EventListener(names, event_filter)
        with self.listen(listener):
            yield listener

    def _dispatch_event(self, event: Message) -> None:
        """Runs in the reader task: give `event` to every listener that
        accepts it."""
        for listener in self._listeners:
            try:
                accepted = listener.accepts(event)
            except Exception as err:
                # A buggy filter must not end the session.
                logger.error("Event filter of %r failed on %s: %s",
                             listener, event.get("event"),
                             exception_summary(err))
                continue
            if accepted:
                listener.put(event)

    def _flush_listeners(self) -> None:
        """Runs in the loop thread: every listener's `flush`."""
        self._flush_scheduled = False
        for listener in self._listeners:
            listener.flush()

    def _schedule_flush(self) -> None:
        """Runs in the loop thread: flush the listeners in the next loop
        pass, once however many events come before it: by then the
        reader has handled everything it has read so far."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_listeners)

    def _end_listeners(self) -> None:
        """Runs in the loop thread: tell every listener that the session
        has ended."""
        for listener in self._listeners:
            listener.session_ended()
