"""qmp_sync.shell.syntax: the lines typed into qmp-shell, as requests."""

from __future__ import annotations

import re

import pytest

from qmp_sync.error import QMPError
from qmp_sync.shell.syntax import (
    Command,
    CommandLineError,
    Help,
    LineParser,
    RawMessage,
    Request,
    parse_arguments,
    parse_value,
    split_line,
)


def feed_all(parser: LineParser, lines: list[str]) -> list[Request | None]:
    """What `parser` returns for each of `lines`, in order."""
    return [parser.feed(line) for line in lines]


# Values

@pytest.mark.parametrize("text, expected", [
    ("42", 42),
    ("-7", -7),
    ("0", 0),
    ("1.5", 1.5),
    ("-0.25", -0.25),
    ("1e3", 1000.0),
    ("2E-2", 0.02),
    ("0x10", "0x10"),
    ("007", "007"),
    ("1_000", "1_000"),
    (".5", ".5"),
    ("1.", "1."),
    ("inf", "inf"),
    ("nan", "nan"),
    ("true", True),
    ("True", True),
    ("false", False),
    ("False", False),
    ("null", None),
    ("None", None),
    ("TRUE", "TRUE"),
    ('"a b"', "a b"),
    ("'a b'", "a b"),
    ('"\\u00e9"', "\u00e9"),
    ('"tab\\there"', "tab\there"),
    ('"\\x41"', "A"),
    ("{}", {}),
    ("[]", []),
    ('{"a": [1, null, true]}', {"a": [1, None, True]}),
    ("{'a': None, 'b': True}", {"a": None, "b": True}),
    ("{'a': null}", {"a": None}),
    ("[true, false, null]", [True, False, None]),
    ("[1, (2, 3)]", [1, [2, 3]]),
    ("[-1, 2.5e1]", [-1, 25.0]),
    ("/tmp/x.img", "/tmp/x.img"),
    ("virtio-net-pci", "virtio-net-pci"),
    ("", ""),
    ("a=b", "a=b"),
])
def test_parse_value(text: str, expected: object) -> None:
    """A typed value reads as JSON, a literal, a keyword, number or text."""
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text, error", [
    ("{bad}", "not JSON or a Python literal: '{bad}'"),
    ("[1, 2", "not JSON or a Python literal: '[1, 2'"),
    ("{1, 2}", "set {1, 2} is not a JSON value, in '{1, 2}'"),
    ("[set()]", "set set() is not a JSON value"),
    ("[b'x']", "bytes b'x' is not a JSON value"),
    ("[1j]", "complex 1j is not a JSON value"),
    ("{1: 'a'}", "object key 1 is not a string, in \"{1: 'a'}\""),
    ("[NaN]", "nan is not a JSON number, in '[NaN]'"),
    ("[1e999]", "inf is not a JSON number"),
    ("1e999", "number out of range: '1e999'"),
    ('"abc"x', "not a JSON or Python string literal: '\"abc\"x'"),
    ("'abc'x", "not a Python string literal: \"'abc'x\""),
    ("'a' + 'b'", "not a Python string literal"),
])
def test_parse_value_errors(text: str, error: str) -> None:
    """A value that is not a valid literal or not JSON says why."""
    with pytest.raises(CommandLineError, match=re.escape(error)):
        parse_value(text)


def test_command_line_error_is_a_qmp_error() -> None:
    """CommandLineError derives from the package's root exception."""
    assert issubclass(CommandLineError, QMPError)


# Tokenizing

@pytest.mark.parametrize("line, tokens", [
    ("", []),
    ("   ", []),
    ("query-status", ["query-status"]),
    ("  a   b\tc  ", ["a", "b", "c"]),
    ('x name="a b"', ["x", 'name="a b"']),
    ("x name='a b' c=1", ["x", "name='a b'", "c=1"]),
    ('x data={"a": 1, "b": 2}', ["x", 'data={"a": 1, "b": 2}']),
    ("x l=[1, 2] y", ["x", "l=[1, 2]", "y"]),
    ('x d={"a": [1, {"b": [2 ]}]} e=3',
     ["x", 'd={"a": [1, {"b": [2 ]}]}', "e=3"]),
    ('x s="say \\"hi there\\""', ["x", 's="say \\"hi there\\""']),
    ("x s='it\\'s here'", ["x", "s='it\\'s here'"]),
    ('x d={"k": "} ]"}', ["x", 'd={"k": "} ]"}']),
    ("x s='{ ['", ["x", "s='{ ['"]),
    ("transaction( abort )", ["transaction(", "abort", ")"]),
    ("f(a b)", ["f(a", "b)"]),
])
def test_split_line(line: str, tokens: list[str]) -> None:
    """Whitespace splits, except inside quotes and brackets."""
    assert split_line(line) == tokens


@pytest.mark.parametrize("line, error", [
    ("x name='abc", "unterminated quote in \"name='abc\""),
    ('x name="a b', "unterminated quote in 'name=\"a b'"),
    ("x s='abc\\'", "unterminated quote in \"s='abc\\\\'\""),
    ('x data={"a": 1', "unclosed '{' in 'data={\"a\": 1'"),
    ("x l=[[1]", "unclosed '[' in 'l=[[1]'"),
    ("x a=}", "unexpected '}' in 'a=}'"),
    ("x a=]b c", "unexpected ']' in 'a=]b'"),
    ("x a={1]", "unexpected ']' in 'a={1]'"),
])
def test_split_line_errors(line: str, error: str) -> None:
    """Unbalanced quotes and brackets are errors naming the token."""
    with pytest.raises(CommandLineError, match=re.escape(error)):
        split_line(line)


# Arguments

@pytest.mark.parametrize("tokens, arguments", [
    ([], {}),
    (["a=1"], {"a": 1}),
    (["a=x=y"], {"a": "x=y"}),
    (["a="], {"a": ""}),
    (["a.b=1", "c=2"], {"a": {"b": 1}, "c": 2}),
    (["a.b=1", "a.c=2"], {"a": {"b": 1, "c": 2}}),
    (["a.b.c=1", "a.b.d=2", "a.e=3", "f=4"],
     {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "f": 4}),
    (["a.b=1", "c.d=2", "a.e=3"], {"a": {"b": 1, "e": 3}, "c": {"d": 2}}),
    (['data={"x": 1}', "node-name=disk0"],
     {"data": {"x": 1}, "node-name": "disk0"}),
])
def test_parse_arguments(tokens: list[str], arguments: object) -> None:
    """key=value tokens make an object; dotted keys nest and merge."""
    assert parse_arguments(tokens) == arguments


def test_parse_arguments_keeps_key_order() -> None:
    """Keys come out in the order they were first given."""
    assert list(parse_arguments(["z=1", "a.b=2", "m=3", "a.c=4"])) == [
        "z", "a", "m"]


# Lines

@pytest.mark.parametrize("line, request_", [
    ("query-status", Command("query-status", {})),
    ("  query-status  \n", Command("query-status", {})),
    ("blockdev-del node-name=disk0", Command("blockdev-del",
                                             {"node-name": "disk0"})),
    ("device_add driver=virtio-net-pci addr=0x3 id=net0",
     Command("device_add",
             {"driver": "virtio-net-pci", "addr": "0x3", "id": "net0"})),
    ("cmd a.b=1 c=2", Command("cmd", {"a": {"b": 1}, "c": 2})),
    ("blockdev-add driver=qcow2 node-name=d0 file.driver=file "
     "file.filename=/tmp/d.img cache.direct=true cache.no-flush=false",
     Command("blockdev-add", {
         "driver": "qcow2", "node-name": "d0",
         "file": {"driver": "file", "filename": "/tmp/d.img"},
         "cache": {"direct": True, "no-flush": False}})),
    ("cmd a.b.c.d=1 a.b.e=2 a.f=3",
     Command("cmd", {"a": {"b": {"c": {"d": 1}, "e": 2}, "f": 3}})),
    ('cmd data={"a": [1, 2]} s="x y"',
     Command("cmd", {"data": {"a": [1, 2]}, "s": "x y"})),
    ('{"execute": "query-status", "id": 7}',
     RawMessage({"execute": "query-status", "id": 7})),
    ('  {"exec": 1}', RawMessage({"exec": 1})),
    ("help", Help(None)),
    ("help query-status", Help("query-status")),
    ("transaction( abort abort )", Command("transaction", {"actions": [
        {"type": "abort", "data": {}}, {"type": "abort", "data": {}}]})),
    ("transaction( block-dirty-bitmap-add node=drive0 name=b1 "
     "block-dirty-bitmap-clear node=drive0 name=b0 )",
     Command("transaction", {"actions": [
         {"type": "block-dirty-bitmap-add",
          "data": {"node": "drive0", "name": "b1"}},
         {"type": "block-dirty-bitmap-clear",
          "data": {"node": "drive0", "name": "b0"}}]})),
    ("transaction( )", Command("transaction", {"actions": []})),
    ("transaction( abort ) completion-mode=grouped",
     Command("transaction", {
         "actions": [{"type": "abort", "data": {}}],
         "properties": {"completion-mode": "grouped"}})),
])
def test_one_line(line: str, request_: Request) -> None:
    """A complete line gives its request and leaves no state behind."""
    parser = LineParser()
    assert parser.feed(line) == request_
    assert not parser.in_transaction


@pytest.mark.parametrize("line", [
    "", "   ", "\n", "# a comment", "   # indented comment x=1",
])
def test_nothing_to_send(line: str) -> None:
    """Blank lines and comments give nothing."""
    parser = LineParser()
    assert parser.feed(line) is None
    assert not parser.in_transaction


def test_multi_line_transaction() -> None:
    """transaction( on its own line gathers the actions until )."""
    parser = LineParser()
    assert parser.feed("transaction(") is None
    assert parser.in_transaction
    assert parser.feed("block-dirty-bitmap-add node=drive0") is None
    assert parser.feed("  name=b1 granularity=65536") is None
    assert parser.feed("") is None
    assert parser.feed("# comments are fine here too") is None
    assert parser.feed("abort") is None
    assert parser.in_transaction
    assert parser.feed(")") == Command("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "drive0", "name": "b1", "granularity": 65536}},
        {"type": "abort", "data": {}}]})
    assert not parser.in_transaction


@pytest.mark.parametrize("lines, arguments", [
    (["transaction(", "abort", ")"],
     {"actions": [{"type": "abort", "data": {}}]}),
    (["transaction( abort", "abort )"],
     {"actions": [{"type": "abort", "data": {}},
                  {"type": "abort", "data": {}}]}),
    (["transaction(", "x a.b=1 c=2", "y )"],
     {"actions": [{"type": "x", "data": {"a": {"b": 1}, "c": 2}},
                  {"type": "y", "data": {}}]}),
    (["transaction(", "abort", ") completion-mode=grouped"],
     {"actions": [{"type": "abort", "data": {}}],
      "properties": {"completion-mode": "grouped"}}),
    (["transaction(", "abort ) completion-mode=grouped"],
     {"actions": [{"type": "abort", "data": {}}],
      "properties": {"completion-mode": "grouped"}}),
    (["transaction(", ")"], {"actions": []}),
])
def test_transaction_lines(lines: list[str],
                           arguments: dict[str, object]) -> None:
    """Actions may span lines; ) ends them and may carry properties."""
    parser = LineParser()
    results = feed_all(parser, lines)
    assert results[:-1] == [None] * (len(lines) - 1)
    assert results[-1] == Command("transaction", arguments)
    assert not parser.in_transaction


def test_reset_abandons_a_transaction() -> None:
    """reset() forgets an open transaction and its actions."""
    parser = LineParser()
    parser.feed("transaction( abort")
    was_open = parser.in_transaction
    parser.reset()
    assert was_open and not parser.in_transaction
    assert parser.feed("query-status") == Command("query-status", {})
    with pytest.raises(CommandLineError, match="outside a transaction"):
        parser.feed(")")


def test_reset_without_transaction() -> None:
    """reset() is harmless when no transaction is open."""
    parser = LineParser()
    parser.reset()
    assert not parser.in_transaction


@pytest.mark.parametrize("line, error", [
    ("x name='abc", "unterminated quote in \"name='abc\""),
    ('x data={"a": 1', "unclosed '{' in 'data={\"a\": 1'"),
    ("x a=}", "unexpected '}' in 'a=}'"),
    ("x foo", "expected key=value, got 'foo'"),
    ("x a=1 foo", "expected key=value, got 'foo'"),
    ("x .a=1", "malformed key '.a'"),
    ("x a.=1", "malformed key 'a.'"),
    ("x a..b=1", "malformed key 'a..b'"),
    ("x =1", "malformed key ''"),
    ("x 'a'=1", "malformed key \"'a'\""),
    ("x a{}=1", "malformed key 'a{}'"),
    ("x a=1 a=2", "key 'a' is given twice"),
    ("x a.b=1 a.b=2", "key 'a.b' is given twice"),
    ("x a=1 a.b=2", "key 'a' cannot be both a value and an object"),
    ("x a.b=2 a=1", "key 'a' cannot be both a value and an object"),
    ('x a={"x":1} a.y=2', "key 'a' cannot be both a value and an object"),
    ("x a.b.c=1 a.b=2", "key 'a.b' cannot be both a value and an object"),
    ("x a.b=1 a.b.c=2", "key 'a.b' cannot be both a value and an object"),
    ("x data={bad}",
     "bad value for 'data': not JSON or a Python literal: '{bad}'"),
    ("x s={1, 2}", "bad value for 's': set {1, 2} is not a JSON value"),
    ("x d={1: 2}", "bad value for 'd': object key 1 is not a string"),
    ("x a.b='x'y", "bad value for 'a.b': not a Python string literal"),
    ("{bad json}", "not valid JSON: Expecting property name"),
    ('{"a": 1} x', "not valid JSON: Extra data"),
    ("x [1, 2]", "expected key=value, got '[1, 2]'"),
    ("[1, 2]", "a raw message must be a JSON object, not list"),
    ("[1, 2", "not valid JSON: Expecting"),
    ("a=1", "expected a command name, got 'a=1'"),
    ("'quoted' a=1", "expected a command name, got \"'quoted'\""),
    (")", "')' outside a transaction"),
    (") a=1", "')' outside a transaction"),
    ("transaction( a=1", "expected an action name before 'a=1'"),
    ("transaction( abort transaction( )",
     "'transaction(' inside a transaction"),
    ("transaction( abort ) extra",
     "unexpected 'extra' after ')'; only key=value properties may follow"),
    ("transaction( abort ) p=1 p=2", "key 'p' is given twice"),
    ("transaction( x a=1 a=2 )", "key 'a' is given twice"),
    ("transaction( {} )", "expected an action name, got '{}'"),
    ("help a b", "help takes at most one command name, got 'a b'"),
])
def test_malformed_line(line: str, error: str) -> None:
    """A malformed line is an error saying why, and opens nothing."""
    parser = LineParser()
    with pytest.raises(CommandLineError, match=re.escape(error)):
        parser.feed(line)
    assert not parser.in_transaction


@pytest.mark.parametrize("line, error", [
    ("a=2", "key 'a' is given twice"),
    ("transaction(", "'transaction(' inside a transaction"),
    ("x a=1 a=2", "key 'a' is given twice"),
    ("b c={bad}", "bad value for 'c'"),
    ("b c='open", "unterminated quote"),
    ('{"execute": "x"}', "expected an action name, got"),
    ("b ) junk", "unexpected 'junk' after ')'"),
    ("b ) p=1 p.q=2", "key 'p' cannot be both a value and an object"),
])
def test_malformed_line_in_transaction(line: str, error: str) -> None:
    """A malformed line leaves the open transaction exactly as it was."""
    parser = LineParser()
    assert parser.feed("transaction( abort") is None
    assert parser.feed("x a=1") is None
    with pytest.raises(CommandLineError, match=re.escape(error)):
        parser.feed(line)
    assert parser.in_transaction
    # The arguments of the last action can still be added to, as before
    # the malformed line.
    assert parser.feed("b=2 )") == Command("transaction", {"actions": [
        {"type": "abort", "data": {}},
        {"type": "x", "data": {"a": 1, "b": 2}}]})
    assert not parser.in_transaction


def test_arguments_before_any_action() -> None:
    """key=value on the line after transaction( needs an action first."""
    parser = LineParser()
    assert parser.feed("transaction(") is None
    error = "expected an action name before 'a=1'"
    with pytest.raises(CommandLineError, match=re.escape(error)):
        parser.feed("a=1 abort")
    assert parser.in_transaction
    assert parser.feed(")") == Command("transaction", {"actions": []})


def test_help_inside_transaction_is_an_action() -> None:
    """Inside a transaction every bare token is an action name."""
    parser = LineParser()
    assert parser.feed("transaction(") is None
    assert parser.feed("help )") == Command("transaction", {"actions": [
        {"type": "help", "data": {}}]})


# Messages

@pytest.mark.parametrize("command, message", [
    (Command("query-status", {}), {"execute": "query-status"}),
    (Command("query-status"), {"execute": "query-status"}),
    (Command("blockdev-del", {"node-name": "d0"}),
     {"execute": "blockdev-del", "arguments": {"node-name": "d0"}}),
    (Command("x", {"a": {"b": [1, None]}}),
     {"execute": "x", "arguments": {"a": {"b": [1, None]}}}),
])
def test_command_message(command: Command, message: object) -> None:
    """message() is the execute message; no "arguments" when empty."""
    assert command.message() == message


def test_command_message_is_a_copy() -> None:
    """Changing the message does not change the command's arguments."""
    command = Command("x", {"a": 1})
    message = command.message()
    assert isinstance(message["arguments"], dict)
    message["arguments"]["b"] = 2
    assert command.arguments == {"a": 1}
