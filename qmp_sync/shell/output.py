"""
How the shell lays out what it prints: JSON in colour on a terminal,
command names in columns, help text wrapped to the terminal's width.
Pure: it formats text and asks a stream what it is, never writes.

The colouring uses no third-party library (pygments would do it): the
package's runtime dependencies are the standard library and at most
typing-extensions (API.md), and the text to colour is JSON that
`json.dumps` has just written, so a tokenizer of a few lines that need
not recover from bad input is all it takes.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple, TextIO

__all__ = ("DEFAULT_WIDTH", "PALETTE", "RESET", "Token", "colour_wanted",
           "columns", "highlight_json", "json_tokens", "terminal_columns",
           "terminal_width", "wrap_line")

#: The width used when the output is not a terminal.
DEFAULT_WIDTH = 80
#: Spaces between two columns of `columns`.
COLUMN_GAP = 2
#: How much deeper than its first line a wrapped line goes on.
HANGING_INDENT = 4

#: The SGR escape that starts each kind of token's colour.
PALETTE: Mapping[str, str] = {
    "key": "\x1b[1;34m",      # bold blue
    "string": "\x1b[32m",     # green
    "number": "\x1b[36m",     # cyan
    "literal": "\x1b[35m",    # magenta: true, false, null
}
#: The escape that ends a colour.
RESET = "\x1b[0m"

# A string may hold escaped quotes and backslashes (``"a\\"`` ends
# after the second backslash), raw non-ASCII text and newlines (never
# from json.dumps, but harmless). A string followed by a colon is a key.
_TOKEN = re.compile(r"""
      (?P<string> "(?:[^"\\]|\\.)*" ) (?P<key> (?=\s*:) )?
    | (?P<number> -?\d+(?:\.\d+)?(?:[eE][-+]?\d+)? )
    | (?P<literal> \b(?:true|false|null)\b )
""", re.VERBOSE | re.DOTALL)


class Token(NamedTuple):
    """A piece of JSON text: `kind` is ``key``, ``string``, ``number``,
    ``literal`` or ``plain`` (punctuation, whitespace, anything else)."""

    kind: str
    text: str


def json_tokens(text: str) -> Iterator[Token]:
    """
    The tokens of JSON `text`, in order; joined, their texts are `text`
    exactly, whatever it holds. Any thread (pure).
    """
    end = 0
    for match in _TOKEN.finditer(text):
        if match.start() > end:
            yield Token("plain", text[end:match.start()])
        kind = match.lastgroup
        if match.group("key") is not None:
            kind = "key"
        assert kind is not None
        yield Token(kind, match.group(kind if kind != "key" else "string"))
        end = match.end()
    if end < len(text):
        yield Token("plain", text[end:])


def highlight_json(text: str, palette: Mapping[str, str] = PALETTE) -> str:
    """JSON `text` with each key, string, number and literal in its
    colour from `palette`; removing the escapes gives `text` back. Any
    thread (pure)."""
    return "".join(
        f"{palette[token.kind]}{token.text}{RESET}"
        if token.kind in palette else token.text
        for token in json_tokens(text))


def colour_wanted(stream: TextIO,
                  environ: Mapping[str, str] = os.environ) -> bool:
    """
    Whether output to `stream` may be coloured: it is a terminal, the
    user did not ask for no colour (``NO_COLOR`` set and not empty, as
    no-color.org has it) and the terminal is not ``TERM=dumb``. Any
    thread.
    """
    return (_is_terminal(stream) and not environ.get("NO_COLOR")
            and environ.get("TERM") != "dumb")


def terminal_width(stream: TextIO) -> int:
    """The columns of the terminal `stream` writes to, or
    `DEFAULT_WIDTH` when it is not a terminal. Any thread."""
    return terminal_columns(stream) or DEFAULT_WIDTH


def terminal_columns(stream: TextIO) -> int:
    """The columns of the terminal `stream` writes to, or 0 when that is
    unknown (not a terminal, or a pty nobody sized). Any thread."""
    if not _is_terminal(stream):
        return 0
    try:
        return max(os.get_terminal_size(stream.fileno()).columns, 0)
    except (OSError, ValueError):
        return 0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except ValueError:
        # A closed stream: nothing to colour or measure.
        return False


def columns(names: Sequence[str], width: int) -> list[str]:
    """
    The lines of `names` laid out in as many columns as fit in `width`
    characters, in order down each column then across, each column as
    wide as its longest name (as ``ls`` does). A name longer than
    `width` gets a line of its own, unsplit. Any thread (pure).
    """
    if not names:
        return []
    for count in range(len(names), 0, -1):
        table = _split_columns(names, count)
        widths = [max(len(name) for name in column) for column in table]
        if sum(widths) + COLUMN_GAP * (len(widths) - 1) <= width:
            break
    return [_row(table, widths, row) for row in range(len(table[0]))]


def _split_columns(names: Sequence[str], count: int) -> list[Sequence[str]]:
    """`names` cut into at most `count` columns of equal height (the
    last one shorter)."""
    height = -(-len(names) // count)
    return [names[start:start + height]
            for start in range(0, len(names), height)]


def _row(table: list[Sequence[str]], widths: list[int], row: int) -> str:
    cells = [f"{column[row]:<{width + COLUMN_GAP}}"
             for column, width in zip(table, widths) if row < len(column)]
    return "".join(cells).rstrip()


def wrap_line(line: str, width: int) -> list[str]:
    """
    `line` wrapped to `width` characters at spaces only (never inside a
    word or at a hyphen: a word longer than the line stays whole), each
    further line indented `HANGING_INDENT` deeper than the first. Any
    thread (pure).
    """
    if len(line) <= width:
        return [line]
    indent = line[:len(line) - len(line.lstrip(" "))]
    return textwrap.wrap(
        line, width, subsequent_indent=indent + " " * HANGING_INDENT,
        break_long_words=False, break_on_hyphens=False)
