"""
`Message`: one QMP message, a JSON object.

A `Message` is a `MutableMapping[str, object]` over a plain `dict`;
``bytes(msg)`` is its compact JSON encoding as written to the wire (the
client adds the line terminator), ``str(msg)`` the same as text.
Serialising refuses what QMP cannot carry: values that are not JSON,
NaN and infinities.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

__all__ = ("Message",)

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


class Message(MutableMapping[str, object]):
    """
    One QMP message: a JSON object with string keys.

    :param value: A mapping to copy, or the wire form (``bytes`` holding
        one JSON object); empty when omitted.
    :raise TypeError: When `value` is neither, or its keys are not all
        strings.
    :raise ValueError: When `value` is bytes that do not hold a JSON
        object.
    """

    __slots__ = ("_obj", "_wire")

    def __init__(self, value: bytes | Mapping[str, object] | None = None
                 ) -> None:
        self._wire: bytes | None = None
        if value is None:
            self._obj: dict[str, object] = {}
        elif isinstance(value, (bytes, bytearray, memoryview)):
            self._obj = self._parse(bytes(value))
        elif isinstance(value, Mapping):
            obj = dict(value)
            for key in obj:
                if not isinstance(key, str):
                    raise TypeError(
                        f"QMP message keys must be strings, not {key!r}")
            self._obj = obj
        else:
            raise TypeError(
                "Message() takes a mapping or bytes, not "
                f"{type(value).__name__}")

    @classmethod
    def _wrap(cls, obj: dict[str, object]) -> Message:
        """Adopt `obj` (no copy, no checks): for dicts fresh from JSON."""
        msg = cls.__new__(cls)
        msg._obj = obj
        msg._wire = None
        return msg

    @staticmethod
    def _parse(data: bytes) -> dict[str, object]:
        try:
            obj = json.loads(data)
        except ValueError as err:
            raise ValueError(f"not valid JSON: {err}") from err
        if not isinstance(obj, dict):
            raise ValueError(
                f"a QMP message is a JSON object, not {type(obj).__name__}")
        return obj

    def __bytes__(self) -> bytes:
        """
        The wire form: compact JSON, UTF-8.

        :raise TypeError: When a value is not JSON-serialisable.
        :raise ValueError: For NaN, infinity or circular references.
        """
        if self._wire is not None:
            return self._wire
        try:
            return _encode(self._obj).encode("utf-8")
        except TypeError as err:
            raise TypeError(f"QMP message is not JSON-serialisable: {err}"
                            ) from err

    def _freeze_wire(self) -> None:
        """
        Serialise now and let ``bytes()`` return that result until a key
        is set or deleted. Only for messages the client owns: a change
        *inside* a value would not be seen.

        :raise TypeError, ValueError: As ``bytes()``.
        """
        self._wire = None
        self._wire = bytes(self)

    def __str__(self) -> str:
        return bytes(self).decode("utf-8")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._obj!r})"

    # Delegate straight to the dict: the Mapping mixins would go through
    # __getitem__ and exceptions, which costs on the hot path.
    def __getitem__(self, key: str) -> object:
        return self._obj[key]

    def __setitem__(self, key: str, value: object) -> None:
        if not isinstance(key, str):
            raise TypeError(f"QMP message keys must be strings, not {key!r}")
        self._obj[key] = value
        self._wire = None

    def __delitem__(self, key: str) -> None:
        del self._obj[key]
        self._wire = None

    def __iter__(self) -> Iterator[str]:
        return iter(self._obj)

    def __len__(self) -> int:
        return len(self._obj)

    def __contains__(self, key: object) -> bool:
        return key in self._obj

    def get(self, key: str, default: Any | None = None) -> Any:
        """Return ``self[key]``, or `default` when absent."""
        return self._obj.get(key, default)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Message):
            return self._obj == other._obj
        if isinstance(other, Mapping):
            return self._obj == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, object]:
        """Return a shallow copy as a plain `dict`."""
        return dict(self._obj)
