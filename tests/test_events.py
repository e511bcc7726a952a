"""EventListener and the Events mixin, without a connection."""

from __future__ import annotations

import asyncio
import logging

import pytest

from qmp_sync import EventListener, Message
from qmp_sync.events import Events


def event(name: str, **data: object) -> Message:
    return Message({"event": name, "data": data})


async def test_names_and_filter() -> None:
    """A listener takes the names it lists (any case) that pass its filter."""
    listener = EventListener(("stop", "RESUME"),
                             lambda ev: ev["data"] != {"skip": True})
    assert listener.accepts(event("STOP"))
    assert listener.accepts(event("resume"))
    assert not listener.accepts(event("SHUTDOWN"))
    assert not listener.accepts(event("STOP", skip=True))
    assert not listener.accepts(Message({"event": 5}))
    assert EventListener().accepts(event("ANYTHING"))
    assert EventListener("JOB").names == frozenset({"JOB"})


async def test_get_waits_and_keeps_order() -> None:
    """get() waits for the next event; events come out in order."""
    listener = EventListener()
    getter = asyncio.ensure_future(listener.get())
    await asyncio.sleep(0)
    assert not getter.done()
    for i in range(3):
        listener.put(event("E", i=i))
    assert (await getter)["data"] == {"i": 0}
    assert [(await listener.get())["data"]["i"] for _ in range(2)] == [1, 2]
    assert listener.empty()


async def test_cancelled_get_loses_nothing() -> None:
    """Cancelling one get() neither loses an event nor breaks others."""
    listener = EventListener()
    first = asyncio.ensure_future(listener.get())
    second = asyncio.ensure_future(listener.get())
    await asyncio.sleep(0)
    first.cancel()
    listener.put(event("A"))
    assert (await second)["event"] == "A"
    listener.put(event("B"))
    assert (await listener.get())["event"] == "B"


async def test_async_for_clear_history() -> None:
    """async for yields events; clear() drops and returns the queue;
    history keeps the most recent accepted events."""
    listener = EventListener(history_len=2)
    for name in "ABC":
        listener.put(event(name))
    seen = []
    async for ev in listener:
        seen.append(ev["event"])
        if len(seen) == 2:
            break
    assert seen == ["A", "B"]
    assert [ev["event"] for ev in listener.clear()] == ["C"]
    assert listener.empty() and listener.clear() == []
    assert [ev["event"] for ev in listener.history] == ["B", "C"]


def test_events_mixin_registration() -> None:
    """listen()/listener() register for a block; double registration and
    removing a stranger are ValueErrors."""
    hub = Events()
    extra = EventListener("X")
    with hub.listen(extra):
        hub._dispatch_event(event("X"))
        with pytest.raises(ValueError, match="already registered"):
            hub.register_listener(extra)
    hub._dispatch_event(event("X"))
    assert len(extra.clear()) == 1
    assert len(hub.events.clear()) == 2
    with pytest.raises(ValueError, match="not registered"):
        hub.remove_listener(extra)
    with hub.listener("Y") as only_y:
        hub._dispatch_event(event("X"))
        hub._dispatch_event(event("Y"))
    assert [ev["event"] for ev in only_y.clear()] == ["Y"]
    assert hub._listeners == (hub.events,)


def test_failing_filter_is_logged_and_skipped(
        caplog: pytest.LogCaptureFixture) -> None:
    """A filter that raises is logged; other listeners still get the event."""
    hub = Events()

    def broken(ev: Message) -> bool:
        raise KeyError("oops")

    with caplog.at_level(logging.ERROR), hub.listener(
            event_filter=broken) as bad:
        hub._dispatch_event(event("E"))
    assert bad.empty()
    assert len(hub.events.clear()) == 1
    assert "Event filter" in caplog.text and "KeyError" in caplog.text
