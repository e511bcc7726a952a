"""
Tab completion for the shell: what may come next, given the line typed
so far. Pure: it reads the line and a schema, and never talks to the
server.

Words are whitespace-separated (``-``, ``.`` and ``=`` are part of a
word), and each candidate is the whole word: a command name ends with
a space, an argument name with ``=`` (or ``.`` for a nested object).
"""

from __future__ import annotations

from collections.abc import Mapping

from .schema import HumanCommands, Schema
from .syntax import CommandLineError, parse_arguments, split_line

__all__ = ("complete_hmp", "complete_qmp")

TRANSACTION = "transaction("


def _tokens(text: str) -> list[str] | None:
    """The words of `text`, or None while a quote or bracket is open
    (there is nothing sensible to complete inside one)."""
    try:
        return split_line(text)
    except CommandLineError:
        return None


def _given(tokens: list[str]) -> dict[str, object]:
    """The arguments among `tokens` that already parse, for choosing a
    union's variant; malformed ones are skipped."""
    given: dict[str, object] = {}
    for token in tokens:
        try:
            for key, value in parse_arguments([token]).items():
                given.setdefault(key, value)
        except CommandLineError:
            pass
    return given


def complete_qmp(schema: Schema, before: str, word: str,
                 in_transaction: bool = False) -> list[str]:
    """
    The completions of `word` in QMP mode.

    :param before: The line up to the start of `word`.
    :param in_transaction: Whether earlier lines opened a
        ``transaction(`` (so this line holds actions).
    """
    tokens = _tokens(before)
    if tokens is None or word.startswith(("{", "[", '"', "'")):
        return []
    if not in_transaction and not tokens:
        names = [*schema.commands, "help", TRANSACTION]
        return [f"{n} " for n in names if n.startswith(word)]
    if not in_transaction and tokens[0] == "help":
        if len(tokens) > 1:
            return []
        return [f"{n} " for n in schema.commands if n.startswith(word)]
    if in_transaction or tokens[0] == TRANSACTION:
        return _complete_action(schema, tokens, word)
    return _complete_argument(schema, tokens[0], tokens[1:], word)


def _complete_action(schema: Schema, tokens: list[str],
                     word: str) -> list[str]:
    """Inside a transaction: an action type, an argument of the action
    being typed, or the closing parenthesis."""
    if tokens and tokens[0] == TRANSACTION:
        tokens = tokens[1:]
    bare = [i for i, t in enumerate(tokens) if "=" not in t]
    found = []
    if "=" not in word:
        found = [f"{t} " for t in [*schema.action_types(), ")"]
                 if t.startswith(word)]
    if bare:
        start = bare[-1]
        found += _complete_argument(schema, tokens[start],
                                    tokens[start + 1:], word)
    return found


def _complete_argument(schema: Schema, command: str, tokens: list[str],
                       word: str) -> list[str]:
    """An argument name (``name=``, ``name.``) or, after ``=``, one of
    the values it can take."""
    given = _given(tokens)
    key, equals, value = word.partition("=")
    if equals:
        *path, leaf = key.split(".")
        return [f"{key}={v} "
                for v in schema.values(command, leaf, given, path)
                if v.startswith(value)]
    *path, stem = word.split(".")
    prefix = "".join(f"{p}." for p in path)
    nested: Mapping[str, object] = given
    for part in path:
        inner = nested.get(part)
        nested = inner if isinstance(inner, Mapping) else {}
    found = []
    for arg in schema.arguments(command, given, path):
        if not arg.name.startswith(stem) or arg.name in nested:
            continue
        if arg.type != "object":
            found.append(f"{prefix}{arg.name}=")
        if arg.type == "object" or "object" in arg.type.split(" or "):
            found.append(f"{prefix}{arg.name}.")
    return found


def complete_hmp(commands: HumanCommands, before: str,
                 word: str) -> list[str]:
    """The completions of `word` in human monitor mode: a command, or
    the topic of ``info`` / ``help``."""
    words = before.split()
    if not words:
        return [f"{n} " for n in commands.commands if n.startswith(word)]
    if len(words) == 1 and words[0] == "info":
        return [f"{t} " for t in commands.info_topics if t.startswith(word)]
    if len(words) == 1 and words[0] in ("help", "?"):
        return [f"{n} " for n in commands.commands if n.startswith(word)]
    return []
