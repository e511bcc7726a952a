"""
The line syntax of ``qmp-shell``: what a user types, as QMP commands.

A line is a command name followed by ``key=value`` arguments, as in
``blockdev-del node-name=disk0``. A dotted key builds nested objects
(``cache.direct=true``); a value is JSON, a Python literal, a number, a
boolean, null, or else the text itself as a string. A line that starts
with ``{`` is a raw JSON message, sent as it is (one that starts with
``[`` is refused as such); ``help`` asks for help;
``transaction(`` ... ``)`` gathers actions, over one line or several,
into one ``transaction`` command.

`LineParser` turns lines into `Request` objects; the functions below it
are its steps. Nothing here does I/O: the shell reads, sends and prints.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import Union

from ..error import QMPError

__all__ = (
    "Command",
    "CommandLineError",
    "Help",
    "LineParser",
    "RawMessage",
    "Request",
    "parse_arguments",
    "parse_value",
    "split_line",
)


class CommandLineError(QMPError):
    """A line that cannot be turned into a command; str() says why."""


@dataclasses.dataclass(frozen=True)
class Command:
    """
    A QMP command to execute.

    :param name: The command, e.g. ``"query-status"``.
    :param arguments: Its arguments; may be empty.
    """

    name: str
    arguments: dict[str, object] = dataclasses.field(default_factory=dict)

    def message(self) -> dict[str, object]:
        """
        The QMP command message for this command.

        :return: ``{"execute": name, "arguments": {...}}``, without
            ``"arguments"`` when there are none.
        """
        message: dict[str, object] = {"execute": self.name}
        if self.arguments:
            message["arguments"] = dict(self.arguments)
        return message


@dataclasses.dataclass(frozen=True)
class RawMessage:
    """
    A line of raw JSON, to send as it is.

    :param message: The JSON object the user typed.
    """

    message: dict[str, object]


@dataclasses.dataclass(frozen=True)
class Help:
    """
    A request for help.

    :param topic: The command asked about, or None for help in general.
    """

    topic: str | None


#: What one line can ask the shell to do.
Request = Union[Command, RawMessage, Help]

_OPENING_BRACKETS = "{["
_OPENING_FOR = {"}": "{", "]": "["}
_QUOTES = "\"'"

_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_KEYWORDS: dict[str, object] = {
    "true": True, "True": True,
    "false": False, "False": False,
    "null": None, "None": None,
}
_JSON_NAMES = {"true": True, "false": False, "null": None}
_BAD_KEY_CHAR = re.compile(r"[\s\"'{}\[\]]")

_TRANSACTION_START = "transaction("
_TRANSACTION_END = ")"


# Tokenizing

def _word_at(line: str, start: int, index: int) -> str:
    """The text from `start` to the first whitespace after `index`."""
    end = index + 1
    while end < len(line) and not line[end].isspace():
        end += 1
    return line[start:end]


def split_line(line: str) -> list[str]:
    """
    Split a line into tokens at whitespace outside quotes and brackets.

    Quotes (``"`` or ``'``, where a backslash escapes the next character)
    and brackets (``{}`` and ``[]``, nested) keep their whitespace in
    the token; tokens keep their quotes and brackets as typed.
    Parentheses are ordinary characters.

    :param line: The line as typed.
    :return: The tokens, in order.
    :raise CommandLineError: On an unterminated quote, a bracket never
        closed, or a closing bracket that matches no opening one.
    """
    tokens: list[str] = []
    start: int | None = None
    quote: str | None = None
    open_brackets: list[str] = []
    index = 0
    while index < len(line):
        char = line[index]
        if quote is not None:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = None
        elif char.isspace() and not open_brackets:
            if start is not None:
                tokens.append(line[start:index])
                start = None
        else:
            if start is None:
                start = index
            if char in _QUOTES:
                quote = char
            elif char in _OPENING_BRACKETS:
                open_brackets.append(char)
            elif char in _OPENING_FOR:
                if (not open_brackets
                        or open_brackets[-1] != _OPENING_FOR[char]):
                    word = _word_at(line, start, index)
                    raise CommandLineError(
                        f"unexpected {char!r} in {word!r}")
                open_brackets.pop()
        index += 1
    if start is not None:
        rest = line[start:].rstrip()
        if quote is not None:
            raise CommandLineError(f"unterminated quote in {rest!r}")
        if open_brackets:
            raise CommandLineError(
                f"unclosed {open_brackets[-1]!r} in {rest!r}")
        tokens.append(rest)
    return tokens


# Values

class _JSONNames(ast.NodeTransformer):
    """Turns the bare names true, false and null into constants."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        """`node`, or a Constant when it is one of JSON's names."""
        if isinstance(node.ctx, ast.Load) and node.id in _JSON_NAMES:
            return ast.copy_location(
                ast.Constant(_JSON_NAMES[node.id]), node)
        return node


def _literal(text: str) -> object:
    """
    Evaluate a Python literal in which the bare names ``true``,
    ``false`` and ``null`` stand for True, False and None.

    :raise ValueError, SyntaxError, TypeError, MemoryError,
        RecursionError: When `text` is not such a literal.
    """
    tree = _JSONNames().visit(ast.parse(text, mode="eval"))
    return ast.literal_eval(tree)


def _as_json(value: object, text: str) -> object:
    """
    `value` as a JSON value: tuples become lists, the rest is checked.

    :param text: The text `value` came from, for error messages.
    :raise CommandLineError: When `value` holds something JSON cannot
        carry.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CommandLineError(
                f"{value!r} is not a JSON number, in {text!r}")
        return value
    if isinstance(value, (list, tuple)):
        return [_as_json(item, text) for item in value]
    if isinstance(value, dict):
        result: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CommandLineError(
                    f"object key {key!r} is not a string, in {text!r}")
            result[key] = _as_json(item, text)
        return result
    raise CommandLineError(
        f"{type(value).__name__} {value!r} is not a JSON value, "
        f"in {text!r}")


def _shortened(text: str, size: int = 60) -> str:
    """`text` quoted for an error line, cut to about `size` characters."""
    return repr(text) if len(text) <= size else f"{text[:size]!r}..."


def _parse_structure(text: str) -> object:
    """A ``{...}`` or ``[...]`` value: JSON, else a Python literal."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise CommandLineError(
            f"nested too deeply: {_shortened(text)}") from None
    except ValueError:
        try:
            value = _literal(text)
        except RecursionError:
            raise CommandLineError(
                f"nested too deeply: {_shortened(text)}") from None
        except (ValueError, SyntaxError, TypeError, MemoryError):
            raise CommandLineError(
                f"not JSON or a Python literal: {_shortened(text)}"
                ) from None
    try:
        return _as_json(value, text)
    except RecursionError:
        raise CommandLineError(
            f"nested too deeply: {_shortened(text)}") from None


def _python_string(text: str) -> str | None:
    """The str a Python string literal stands for, or None."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError,
            RecursionError):
        return None
    return value if isinstance(value, str) else None


def _parse_number(match: re.Match[str]) -> int | float:
    """A match of `_JSON_NUMBER` as an int or a finite float."""
    text = match.group()
    if match.group(2) is None and match.group(3) is None:
        try:
            return int(text)
        except ValueError:
            # Python refuses to convert integers of thousands of digits.
            raise CommandLineError(
                f"integer too long: {len(text)} digits") from None
    number = float(text)
    if not math.isfinite(number):
        raise CommandLineError(f"number out of range: {text!r}")
    return number


def parse_value(text: str) -> object:
    """
    The JSON value a typed value stands for.

    In order: empty text is the empty string; a text that starts with a
    quote is a string literal (JSON, or else Python); one that starts
    with ``{`` or ``[`` is JSON, or else a Python literal in which
    ``true``, ``false`` and ``null`` may be used; ``true``/``True``,
    ``false``/``False`` and ``null``/``None`` are booleans and null; a
    JSON number is an int or a float; anything else is the text itself.
    Hex numbers and numbers with leading zeros are therefore strings.

    :param text: One value, as typed.
    :return: A JSON value: dict, list, str, int, float, bool or None.
    :raise CommandLineError: When a quoted or bracketed text is not a
        valid literal, or holds something JSON cannot carry.
    """
    if not text:
        return ""
    first = text[0]
    if first == '"':
        try:
            value = json.loads(text)
        except ValueError:
            value = _python_string(text)
        if not isinstance(value, str):
            raise CommandLineError(
                f"not a JSON or Python string literal: {text!r}")
        return value
    if first == "'":
        value = _python_string(text)
        if value is None:
            raise CommandLineError(
                f"not a Python string literal: {text!r}")
        return value
    if first in _OPENING_BRACKETS:
        return _parse_structure(text)
    if text in _KEYWORDS:
        return _KEYWORDS[text]
    number = _JSON_NUMBER.fullmatch(text)
    if number:
        return _parse_number(number)
    return text


# Arguments

def _key_path(key: str) -> tuple[str, ...]:
    """
    The parts of a (possibly dotted) key.

    :raise CommandLineError: When a part is empty or the key holds
        quotes, brackets or whitespace.
    """
    if _BAD_KEY_CHAR.search(key):
        raise CommandLineError(
            f"malformed key {key!r}: no quotes, brackets or spaces "
            "allowed")
    path = tuple(key.split("."))
    if not all(path):
        raise CommandLineError(f"malformed key {key!r}")
    return path


def parse_arguments(tokens: Sequence[str]) -> dict[str, object]:
    """
    The arguments object that ``key=value`` tokens stand for.

    Each token splits at its first ``=``; the value is read by
    `parse_value`. A dotted key ``a.b.c=v`` sets ``v`` in nested objects,
    and dotted keys with a common prefix share its objects.

    :param tokens: The tokens, as from `split_line`.
    :return: The arguments, keys in the order given.
    :raise CommandLineError: On a token without ``=``, a malformed key,
        a key given twice, a key used both as a value and as an object,
        or a bad value (the message then names its key).
    """
    arguments: dict[str, object] = {}
    values: set[tuple[str, ...]] = set()
    objects: set[tuple[str, ...]] = set()
    for token in tokens:
        key, equals, text = token.partition("=")
        if not equals:
            raise CommandLineError(f"expected key=value, got {token!r}")
        path = _key_path(key)
        if path in values:
            raise CommandLineError(f"key {key!r} is given twice")
        if path in objects:
            raise CommandLineError(
                f"key {key!r} cannot be both a value and an object")
        for length in range(1, len(path)):
            if path[:length] in values:
                prefix = ".".join(path[:length])
                raise CommandLineError(
                    f"key {prefix!r} cannot be both a value and an object")
        try:
            value = parse_value(text)
        except CommandLineError as exc:
            raise CommandLineError(
                f"bad value for {key!r}: {exc}") from None
        target = arguments
        for length, part in enumerate(path[:-1], start=1):
            objects.add(path[:length])
            child = target.setdefault(part, {})
            assert isinstance(child, dict)
            target = child
        target[path[-1]] = value
        values.add(path)
    return arguments


# Lines

#: An action of a transaction in progress: its type and its argument
#: tokens, kept as typed so that later lines can add to them.
_Action = tuple[str, tuple[str, ...]]


def _check_name(token: str, what: str) -> None:
    """
    Refuse a token that cannot be a command or action name.

    :raise CommandLineError: When it has ``=`` or starts with a quote
        or a bracket.
    """
    if "=" in token or token[0] in _QUOTES + _OPENING_BRACKETS:
        raise CommandLineError(f"expected {what}, got {token!r}")


def _raw_message(line: str) -> RawMessage:
    """
    A line of raw JSON as a message.

    :raise CommandLineError: When it is not a JSON object.
    """
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise CommandLineError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise CommandLineError("not valid JSON: nested too deeply") \
            from None
    if not isinstance(message, dict):
        raise CommandLineError(
            "a raw message must be a JSON object, not "
            f"{type(message).__name__}")
    return RawMessage(message)


def _help(tokens: Sequence[str]) -> Help:
    """
    ``help`` or ``help CMD``.

    :raise CommandLineError: When more than one topic is given.
    """
    if len(tokens) > 2:
        raise CommandLineError(
            "help takes at most one command name, got "
            f"{' '.join(tokens[1:])!r}")
    return Help(tokens[1] if len(tokens) == 2 else None)


def _transaction_line(actions: tuple[_Action, ...], tokens: Sequence[str]
                      ) -> tuple[tuple[_Action, ...], Command | None]:
    """
    Add one line's tokens to a transaction in progress.

    :param actions: The actions so far.
    :param tokens: The line's tokens (without ``transaction(``).
    :return: The actions after this line, and the ``transaction``
        command when the line ends it (or None when it stays open).
    :raise CommandLineError: When the line is malformed; `actions` is
        left as it was.
    """
    pending = list(actions)
    end = None
    for index, token in enumerate(tokens):
        if token == _TRANSACTION_END:
            end = index
            break
        if "=" in token:
            if not pending:
                raise CommandLineError(
                    f"expected an action name before {token!r}")
            kind, action_tokens = pending[-1]
            pending[-1] = (kind, (*action_tokens, token))
        elif token == _TRANSACTION_START:
            raise CommandLineError(
                f"{_TRANSACTION_START!r} inside a transaction")
        else:
            _check_name(token, "an action name")
            pending.append((token, ()))
    # Reading every action's arguments now reports an error on the line
    # that made it, not on the line that happens to close the
    # transaction.
    parsed: list[object] = [
        {"type": kind, "data": parse_arguments(action_tokens)}
        for kind, action_tokens in pending
    ]
    if end is None:
        return tuple(pending), None
    trailing = tokens[end + 1:]
    for token in trailing:
        if "=" not in token:
            raise CommandLineError(
                f"unexpected {token!r} after {_TRANSACTION_END!r}; only "
                "key=value properties may follow")
    arguments: dict[str, object] = {"actions": parsed}
    if trailing:
        arguments["properties"] = parse_arguments(trailing)
    return (), Command("transaction", arguments)


class LineParser:
    """
    Turns the lines a user types, one by one, into requests.

    Stateful: between a line ``transaction(`` and the ``)`` that ends
    it, lines add actions to a transaction instead of making requests.
    A malformed line raises and leaves the parser as it was before it.
    """

    def __init__(self) -> None:
        # None when no transaction is open.
        self._actions: tuple[_Action, ...] | None = None

    @property
    def in_transaction(self) -> bool:
        """True between ``transaction(`` and the ``)`` that ends it."""
        return self._actions is not None

    def reset(self) -> None:
        """Abandon a transaction in progress, if there is one."""
        self._actions = None

    def feed(self, line: str) -> Request | None:
        """
        Read one line.

        :param line: The line as typed; a trailing newline is ignored.
        :return: What the line asks for, or None when there is nothing
            to send yet (a blank line, a ``#`` comment, or a transaction
            still open).
        :raise CommandLineError: When the line is malformed; the parser
            is then as it was before the line.
        """
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            return None
        if self._actions is not None:
            actions, command = _transaction_line(
                self._actions, split_line(stripped))
            self._actions = actions if command is None else None
            return command
        # A line of JSON that is not an object is still meant as raw
        # JSON; say so rather than that it is no command name.
        if stripped[0] in _OPENING_BRACKETS:
            return _raw_message(stripped)
        tokens = split_line(stripped)
        name = tokens[0]
        if name == "help":
            return _help(tokens)
        if name == _TRANSACTION_START:
            actions, command = _transaction_line((), tokens[1:])
            if command is None:
                self._actions = actions
            return command
        if name == _TRANSACTION_END:
            raise CommandLineError(
                f"{_TRANSACTION_END!r} outside a transaction")
        _check_name(name, "a command name")
        return Command(name, parse_arguments(tokens[1:]))
