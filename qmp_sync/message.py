"""
`Message`: one QMP message, a JSON object.

A `Message` is a mutable mapping of strings to JSON values (a
`collections.UserDict` whose ``data`` is a plain `dict`); ``bytes(msg)``
is its compact JSON encoding as written to the wire (the client adds
the line terminator), ``str(msg)`` the same as text. Serialising refuses
what QMP cannot carry: values that are not JSON, keys that are not
strings (at any depth), NaN and infinities, and nesting deeper than the
encoder can go.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from typing import Any

__all__ = ("Message", "decode", "encode")

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"QMP message keys must be strings, not {key!r}")


def _check_nested_keys(value: object) -> None:
    """
    Raise `TypeError` for a key that is not a string anywhere inside
    `value` (JSON would quietly turn ``1`` into ``"1"``).

    Iterative, so depth costs no stack; only called on values the
    encoder has accepted, so there are no cycles.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise TypeError("QMP message keys must be strings at "
                                    f"every level, not {key!r}")
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def encode(value: Mapping[str, object]) -> bytes:
    """
    Any thread: the wire form of a message's contents, compact JSON in
    UTF-8 (without the line terminator).

    :raise TypeError: When a value is not JSON-serialisable or a key,
        at any depth, is not a string.
    :raise ValueError: For NaN, infinity, circular references, or
        nesting too deep to encode.
    """
    try:
        text = _encode(value)
    except TypeError as err:
        raise TypeError(f"QMP message is not JSON-serialisable: {err}"
                        ) from err
    except RecursionError:
        raise ValueError("QMP message is nested too deeply to encode"
                         ) from None
    _check_nested_keys(value)
    return text.encode("utf-8")


def _decode_stdlib(data: bytes) -> object:
    """`decode` with the standard library's decoder."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply to decode") from None


# Digits become "0", everything else a space: a run of 19 zeros then
# marks 19 digits in a row, perhaps an integer beyond 64 bits, which
# orjson would quietly turn into a float. (Five times faster than a
# regular expression.)
_DIGITS_ONLY = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20
                     for byte in range(256))
_LONG_RUN = b"0" * 19


def _decode_fast(data: bytes) -> object:
    """
    `decode` with orjson, which parses several times faster. What it
    refuses (NaN and Infinity, lone surrogates, nesting past 1,024,
    malformed input), and any input with a run of 19 digits or more
    (an integer beyond 64 bits, which it would make a float), goes to
    the standard decoder, which accepts it or raises its own error: the
    result is always exactly what ``json.loads`` gives.
    """
    if _LONG_RUN not in data.translate(_DIGITS_ONLY):
        try:
            return _orjson_loads(data)
        except _OrjsonError:
            pass
    return _decode_stdlib(data)


try:
    from orjson import JSONDecodeError as _OrjsonError
    from orjson import loads as _orjson_loads
except ImportError:
    #: Any thread: the JSON value in `data` (bytes in UTF-8, surrounding
    #: whitespace allowed), with orjson when installed (``pip install
    #: qmp_sync[speed]``), else the standard library's decoder; the
    #: result is the same either way. Raises `ValueError` when `data` is
    #: not valid JSON, or is nested too deeply to decode.
    decode = _decode_stdlib
else:
    decode = _decode_fast


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
    def adopt(cls, obj: dict[str, object]) -> Message:
        """
        A message whose ``data`` is `obj` itself: no copy and no checks,
        for dicts fresh from a JSON decoder (whose keys are strings).
        The caller gives `obj` up.
        """
        msg = cls.__new__(cls)
        msg.data = obj
        return msg

    @staticmethod
    def _parse(data: bytes) -> dict[str, object]:
        try:
            obj = decode(data)
        except ValueError as err:
            raise ValueError(f"not valid JSON: {err}") from err
        if not isinstance(obj, dict):
            raise ValueError(
                f"a QMP message is a JSON object, not {type(obj).__name__}")
        return obj

    def __bytes__(self) -> bytes:
        """
        The wire form: compact JSON, UTF-8.

        :raise TypeError: When a value is not JSON-serialisable or a key
            at any depth is not a string.
        :raise ValueError: For NaN, infinity, circular references or
            nesting too deep to encode.
        """
        return encode(self.data)

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
