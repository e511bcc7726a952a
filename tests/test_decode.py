"""
The JSON decoder: with orjson installed (the ``speed`` extra) it must
give exactly what the standard library gives, for everything a server
can send, malformed input included.
"""

from __future__ import annotations

import json

import pytest

from qmp_sync import message

orjson = pytest.importorskip("orjson", reason="the speed extra is not "
                             "installed (the plain-install pass)")

DEEP = 5_000

AWKWARD = [
    b'{"return": {"status": "running", "running": true}, "id": 1}',
    b'{"a": 1}\n', b' \t{"a": 1} \r\n', b"{}", b"[]", b"null", b"true",
    b"0", b"-0", b"-0.0", b"1.0", b"1e2", b"1E+2", b"1e-2",
    b"0.30000000000000004", b"0.1000000000000000055511151231257827",
    b"5e-324", b"1.7976931348623157e308", b"1e400", b"-1e400",
    b"1e-400", b"123456789012345678901234567890.5",
    b"9223372036854775807", b"9223372036854775808",
    b"18446744073709551615", b"18446744073709551616",
    b"-9223372036854775808", b"-9223372036854775809",
    b"1" * 500,
    b"NaN", b"Infinity", b"-Infinity", b'{"x": NaN}', b'[Infinity]',
    b'"\\ud800"', b'"\\udc00x"', b'"\\ud83d\\ude00"', b'"\\u0000"',
    b'"\\/\\b\\f\\n\\r\\t\\"\\\\"', '"é€😀"'.encode(),
    b'{"a": 1, "a": 2}', b'{"a": {"b": 1}, "a": [1]}',
    b'{"\\u0061": 1, "a": 2}',
    b"[" * 500 + b"]" * 500, b"[" * DEEP + b"]" * DEEP,
    b'{"a":' * 2_000 + b"1" + b"}" * 2_000,
    # Malformed: every one of these is an error for both.
    b"", b" ", b"{", b'{"a": 1', b'{"a": 1}}', b"{} x", b"[1,]",
    b'{"a": 1,}', b"01", b"1.", b"-", b".5", b"+1", b"0x10", b"nan",
    b"inf", b"True", b"None", b"'a'", b'{"a": "\x01"}', b'"\t"',
    b'{"a": "\xff"}', b'"\xc3"', b'"\xed\xa0\x80"', b"\x00",
    b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16"),
    '{"a": 1}'.encode("utf-32-le"), b"{1: 2}", b'{"a" 1}',
    b'"\\x41"', b'"\\u12"', b'"\\ud800\\u"', b"[" * DEEP,
]


def outcome(decode: object, data: bytes) -> tuple[str, str]:
    """What decoding `data` gives: ("ok", a repr that tells types and
    signs apart) or ("error", the exception's type)."""
    assert callable(decode)
    try:
        value = decode(data)
    except ValueError as err:
        return ("error", type(err).__name__)
    except RecursionError:
        return ("error", "RecursionError")
    return ("ok", exact(value))


def exact(value: object) -> str:
    """A text for `value` in which 1 and 1.0 and True, 0.0 and -0.0, and
    key order all differ (repr does that, and NaN's is stable)."""
    text = repr(value)
    return text if len(text) < 10_000 else f"{hash(text)}:{len(text)}"


def stdlib(data: bytes) -> object:
    """The reference: json.loads, its RecursionError reported as our
    decoder reports it."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


@pytest.mark.parametrize("data", AWKWARD)
def test_fast_decoder_is_exactly_the_standard_one(data: bytes) -> None:
    """The installed decoder (orjson with its fall-back) and json.loads
    agree on the value, or both refuse the input."""
    assert message.decode is not message._decode_stdlib
    assert outcome(message.decode, data) == outcome(stdlib, data)


def test_a_malformed_line_is_one_value_error() -> None:
    """Whatever refuses the input, the caller sees one ValueError."""
    with pytest.raises(ValueError):
        message.decode(b"{")
    with pytest.raises(ValueError, match="nested too deeply"):
        message.decode(b"[" * 100_000 + b"]" * 100_000)
