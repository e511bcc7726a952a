"""Message: a QMP JSON object as a mapping, and its wire form."""

from __future__ import annotations

import math

import pytest

from qmp_sync import Message


def test_mapping_behaviour() -> None:
    """A Message reads and writes like the dict it wraps."""
    msg = Message({"execute": "stop"})
    msg["arguments"] = {"a": [1, None]}
    assert msg["execute"] == "stop"
    assert "arguments" in msg and "id" not in msg
    assert msg.get("id") is None and msg.get("id", 7) == 7
    assert list(msg) == ["execute", "arguments"]
    assert len(msg) == 2
    del msg["arguments"]
    assert msg == {"execute": "stop"}
    assert msg == Message({"execute": "stop"})
    assert msg != {"execute": "cont"}
    assert msg.to_dict() == {"execute": "stop"}
    assert repr(msg) == "Message({'execute': 'stop'})"
    assert Message() == {}


def test_wire_form_round_trip() -> None:
    """bytes(msg) is compact UTF-8 JSON; Message(bytes) parses it back."""
    msg = Message({"execute": "x", "arguments": {"s": "é", "n": 1.5}})
    assert bytes(msg) == (b'{"execute":"x","arguments":{"s":"\\u00e9",'
                          b'"n":1.5}}')
    assert str(msg) == bytes(msg).decode()
    assert Message(bytes(msg)) == msg
    assert Message(bytearray(b'{"a":null}')) == {"a": None}


@pytest.mark.parametrize("data, error", [
    (b"[1, 2]", "a QMP message is a JSON object, not list"),
    (b"{", "not valid JSON"),
    (b"\xff", "not valid JSON"),
])
def test_bad_wire_form(data: bytes, error: str) -> None:
    """Bytes that are not one JSON object are a ValueError saying why."""
    with pytest.raises(ValueError, match=error):
        Message(data)


def test_unserialisable_values_are_refused() -> None:
    """Values QMP cannot carry fail serialisation with a clear error."""
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        bytes(Message({"arguments": {"f": object()}}))
    with pytest.raises(ValueError):
        bytes(Message({"n": math.nan}))
    with pytest.raises(TypeError, match="keys must be strings"):
        Message({1: "x"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="keys must be strings"):
        Message()[2] = 1  # type: ignore[index]
    with pytest.raises(TypeError, match="takes a mapping or bytes"):
        Message(42)  # type: ignore[arg-type]
