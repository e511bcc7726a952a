"""
`Message`: one QMP message, a JSON object.

A `Message` is a mutable mapping of strings to JSON values (a
`collections.UserDict` whose ``data`` is a plain `dict`); ``bytes(msg)``
is its compact JSON encoding as written to the wire (the client adds
the line terminator), ``str(msg)`` the same as text. Serialising refuses
what QMP cannot carry: values that are not JSON, NaN and infinities.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from typing import Any

__all__ = ("Message",)

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"QMP message keys must be strings, not {key!r}")


class Message(collections.UserDict[str, object]):
    """
    One QMP message: a JSON object with string keys.

    :param value: A mapping to copy, or the wire form (``bytes`` holding
        one JSON object); empty when omitted.
    :raise TypeError: When `value` is neither, or its keys are not all
        strings.
    :raise ValueError: When `value` is bytes that do not hold a JSON
        object.
    """

    data: dict[str, object]

    def __init__(self, value: bytes | Mapping[str, object] | None = None
                 ) -> None:
        # UserDict.__init__ would copy key by key through __setitem__.
        if value is None:
            self.data = {}
        elif isinstance(value, (bytes, bytearray, memoryview)):
            self.data = self._parse(bytes(value))
        elif isinstance(value, Mapping):
            self.data = dict(value)
            for key in self.data:
                _check_key(key)
        else:
            raise TypeError("Message() takes a mapping or bytes, not "
                            f"{type(value).__name__}")

    @classmethod
    def _wrap(cls, obj: dict[str, object]) -> Message:
        """Adopt `obj` (no copy, no checks): for dicts fresh from JSON."""
        msg = cls.__new__(cls)
        msg.data = obj
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
        try:
            return _encode(self.data).encode("utf-8")
        except TypeError as err:
            raise TypeError(f"QMP message is not JSON-serialisable: {err}"
                            ) from err

    def __str__(self) -> str:
        return bytes(self).decode("utf-8")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.data!r})"

    def __setitem__(self, key: str, value: object) -> None:
        _check_key(key)
        self.data[key] = value

    # UserDict's get() goes through __getitem__ and __missing__; this is
    # on the hot path of every inbound message.
    def get(self, key: str, default: Any | None = None) -> Any:
        """Return ``self[key]``, or `default` when absent."""
        return self.data.get(key, default)

    def to_dict(self) -> dict[str, object]:
        """Return a shallow copy as a plain `dict`."""
        return dict(self.data)
