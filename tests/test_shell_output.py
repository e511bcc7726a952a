"""
What the shell prints and how: ``--version`` of every entry point, the
layout of ``help`` (columns, wrapping at spaces), and JSON in colour on
a terminal only. The pure layout functions are tested directly; the
programs on a pty (pexpect) against real QEMU.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from peers import QEMU, program

import qmp_sync
from qmp_sync.shell import main
from qmp_sync.shell.output import (
    PALETTE,
    colour_wanted,
    columns,
    highlight_json,
    json_tokens,
    terminal_width,
    wrap_line,
)
from qmp_sync.shell.schema import Schema

# Upper bound of any single wait in these tests.
BOUND = 10.0
PROMPT = "(QEMU) "
ENTER = "\r"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Readline's switches of the terminal's modes (bracketed paste).
TERMINAL_MODES = re.compile(r"\x1b\[\?[0-9]+[hl]")


def strip_ansi(text: str) -> str:
    """`text` without its colour escapes."""
    return ANSI.sub("", text)





# ----------------------------------------------------------------------
# --version.

@pytest.mark.parametrize("entry, name", [
    ("qmp-shell", "qmp-shell"),
    ("qmp-shell-wrap", "qmp-shell-wrap"),
    ("-m qmp_sync.shell", "qmp-shell"),
])
def test_version(entry: str, name: str) -> None:
    """Every entry point prints its name and the package's version on
    --version, and exits 0."""
    command = ([sys.executable, *entry.split()] if entry.startswith("-m")
               else [program(entry)])
    done = subprocess.run([*command, "--version"], capture_output=True,
                          text=True, timeout=BOUND,
                          stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, f"{name} {qmp_sync.__version__}\n", "")


# ----------------------------------------------------------------------
# The JSON tokenizer and colours.

AWKWARD = {
    'quote"in key': 'ends with a backslash\\',
    "\\": '\\"',
    "uni": "é ☃ 𝄞 \u2028 \x00 \t\n",
    "numbers": [0, -1, 1.5, -1.5e10, 1e-7, 12345678901234567890],
    "literals": [True, False, None],
    "nested": {"a": [{"b": [[], {}]}, ""], "": {"": ""}},
    "looks like true": "null, 1, false:",
}
RAW_SAMPLES = [
    '{"a\\"": "\\\\", "b": -1.5e10, "c": [1, -2.25E+3, 0.5e-2]}',
    '[true,false,null,{"k":"v"},[]]',
    '"just a string with \\\\\\" inside"',
    '{"x": "\\u00e9\\ud834\\udd1e"}',
]


def dumped(value: object) -> list[str]:
    """`value` in every layout the shell prints: compact, indented,
    with and without non-ASCII text escaped."""
    return [json.dumps(value, indent=indent, ensure_ascii=ascii_only)
            for indent in (None, 4) for ascii_only in (True, False)]


@pytest.mark.parametrize("text", [*dumped(AWKWARD), *RAW_SAMPLES])
def test_tokens_round_trip(text: str) -> None:
    """The tokens of JSON text put together are the text; each token is
    a whole JSON string, number or literal, and what is left between
    them is punctuation and whitespace only."""
    tokens = list(json_tokens(text))
    assert "".join(token.text for token in tokens) == text
    for kind, piece in tokens:
        if kind in ("key", "string"):
            assert isinstance(json.loads(piece), str)
        elif kind == "number":
            assert isinstance(json.loads(piece), (int, float))
        elif kind == "literal":
            assert piece in ("true", "false", "null")
        else:
            assert kind == "plain"
            assert set(piece) <= set("{}[],: \n"), piece


def test_keys_and_values_are_told_apart() -> None:
    """Keys are the object keys, in order, at every depth; strings that
    look like keys or literals stay strings."""
    text = json.dumps(AWKWARD)
    tokens = list(json_tokens(text))
    keys = [json.loads(t.text) for t in tokens if t.kind == "key"]
    assert keys == ['quote"in key', "\\", "uni", "numbers", "literals",
                    "nested", "a", "b", "", "", "looks like true"]
    strings = [json.loads(t.text) for t in tokens if t.kind == "string"]
    assert strings == [AWKWARD['quote"in key'], '\\"', AWKWARD["uni"],
                       "", "", "null, 1, false:"]
    numbers = [json.loads(t.text) for t in tokens if t.kind == "number"]
    assert numbers == AWKWARD["numbers"]
    assert [t.text for t in tokens if t.kind == "literal"] == [
        "true", "false", "null"]


@pytest.mark.parametrize("text", [*dumped(AWKWARD), *RAW_SAMPLES])
def test_highlight_strips_back_to_the_json(text: str) -> None:
    """Coloured JSON, its escapes removed, is the JSON unchanged."""
    coloured = highlight_json(text)
    assert coloured != text
    assert strip_ansi(coloured) == text


def test_each_kind_has_its_own_colour() -> None:
    """Keys, strings, numbers and literals each get a colour of their
    own."""
    coloured = highlight_json('{"k": ["s", 1, true, false, null]}')
    assert f'{PALETTE["key"]}"k"' in coloured
    assert f'{PALETTE["string"]}"s"' in coloured
    assert f'{PALETTE["number"]}1' in coloured
    for literal in ("true", "false", "null"):
        assert f'{PALETTE["literal"]}{literal}' in coloured
    assert len(set(PALETTE.values())) == len(PALETTE) == 4


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal (no file descriptor)."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, environ, wanted", [
    (FakeTerminal(), {"TERM": "xterm"}, True),
    (FakeTerminal(), {}, True),
    (FakeTerminal(), {"TERM": "xterm", "NO_COLOR": ""}, True),
    (FakeTerminal(), {"TERM": "xterm", "NO_COLOR": "1"}, False),
    (FakeTerminal(), {"TERM": "dumb"}, False),
    (io.StringIO(), {"TERM": "xterm"}, False),
])
def test_colour_wanted(stream: io.StringIO, environ: dict[str, str],
                       wanted: bool) -> None:
    """Colour only on a terminal, not with NO_COLOR set (non-empty),
    not on TERM=dumb."""
    assert colour_wanted(stream, environ) is wanted


def test_width_of_what_is_not_a_terminal() -> None:
    """Output that is not a terminal (or cannot say its size) is 80
    columns wide."""
    assert terminal_width(io.StringIO()) == 80
    assert terminal_width(FakeTerminal()) == 80


# ----------------------------------------------------------------------
# Columns and wrapping.

NAMES = sorted(
    ["a", "query-status", "x-blockdev-reopen", "block-dirty-bitmap-add",
     "qmp_capabilities", "cont", "stop", "human-monitor-command",
     "transaction", "query-cpu-model-expansion", "q", "device_add",
     "x-query-virtio-queue-element", "query-named-block-nodes"] +
    [f"cmd-{index}" for index in range(40)])


def column_major(lines: list[str]) -> list[str]:
    """The names in `lines`, read down each column then across (a
    column is the names that start at the same offset)."""
    by_offset: dict[int, list[str]] = {}
    for line in lines:
        for match in re.finditer(r"\S+", line):
            by_offset.setdefault(match.start(), []).append(match.group())
    return [name for offset in sorted(by_offset)
            for name in by_offset[offset]]


@pytest.mark.parametrize("width", [20, 40, 60, 80, 160, 1000])
def test_columns_fit_and_read_down(width: int) -> None:
    """Names are laid out in columns that fit the width (a name wider
    than it alone on its line), whole, each once, in order down each
    column then across; a wider terminal takes fewer lines."""
    lines = columns(NAMES, width)
    assert all(len(line) <= width or len(line.split()) == 1
               for line in lines)
    assert column_major(lines) == NAMES
    if width >= 60:
        assert len(lines) < len(columns(NAMES, width // 2))
    if width == 1000:
        assert len(lines) == 1


def test_columns_with_names_wider_than_the_line() -> None:
    """A name wider than the line gets a line of its own, unsplit."""
    assert columns(["a-very-long-name", "b"], 5) == ["a-very-long-name",
                                                     "b"]
    assert columns([], 80) == []


@pytest.mark.parametrize("width", [10, 30, 60])
def test_wrapping_only_at_spaces(width: int) -> None:
    """A line is wrapped at spaces only (never inside a word, nor at a
    hyphen), further lines indented deeper; a short line is left as it
    is."""
    line = ("  with driver=qcow2: backing, data-file, "
            "x-a-very-long-hyphenated-member-name-indeed, "
            "discard-no-unref, cache.direct, encrypt.key-secret")
    lines = wrap_line(line, width)
    assert lines[0].startswith("  with")
    assert all(x.startswith("      ") for x in lines[1:])
    assert " ".join(" ".join(lines).split()) == " ".join(line.split())
    for wrapped in lines:
        assert len(wrapped) <= width or len(wrapped.split()) == 1
    assert wrap_line("  a  b", width) == ["  a  b"]


# ----------------------------------------------------------------------
# On a terminal, against QEMU.

@contextlib.contextmanager
def spawned(tmp_path: Path, args: list[str], columns: int = 200,
            command: str | None = None, env: dict[str, str] | None = None
            ) -> Iterator[pexpect.spawn]:
    """``qmp-shell ARGS`` (or `command`, run by /bin/sh) on a pty
    `columns` wide, with colour allowed unless `env` says otherwise;
    ended, forcibly if need be, when the block is left."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    environ = {key: value for key, value in os.environ.items()
               if key not in ("QMP_SHELL_HISTORY", "QMP_SOCKET", "INPUTRC",
                              "NO_COLOR", "COLUMNS")}
    environ.update(TERM="xterm", HOME=str(home))
    environ.update(env or {})
    if command is None:
        executable, argv = program("qmp-shell"), ["--history", "", *args]
    else:
        executable, argv = "/bin/sh", ["-c", command]
    child = pexpect.spawn(executable, argv, env=environ, encoding="utf-8",
                          dimensions=(24, columns), timeout=BOUND)
    try:
        yield child
    finally:
        child.close(force=True)


def run_at_prompt(child: pexpect.spawn, line: str) -> list[str]:
    """Type `line` at the prompt; the lines printed before the next
    prompt (the echo of `line` left out)."""
    child.expect_exact(PROMPT)
    child.send(line + ENTER)
    child.expect_exact(PROMPT)
    printed = TERMINAL_MODES.sub("", child.before).split("\r\n")
    assert printed[0].endswith(line), printed
    return [x for x in printed[1:] if x]


def leave(child: pexpect.spawn) -> None:
    """Ctrl-D at the prompt; wait (bounded) for the end of output."""
    child.sendeof()
    child.expect(pexpect.EOF)


def test_reply_in_colour_on_a_terminal(qemu: QEMU, tmp_path: Path) -> None:
    """At a terminal a reply is coloured: keys, strings and literals
    each in their colour; without the escapes it is the same JSON."""
    with spawned(tmp_path, [qemu.path]) as child:
        (line,) = run_at_prompt(child, "query-status")
        assert f'{PALETTE["key"]}"return"' in line
        assert f'{PALETTE["string"]}"running"' in line
        assert f'{PALETTE["literal"]}true' in line
        plain = strip_ansi(line)
        assert plain == json.dumps(json.loads(plain))
        assert json.loads(plain)["return"]["status"] == "running"
        leave(child)


def test_pretty_reply_in_colour(qemu: QEMU, tmp_path: Path) -> None:
    """With -p the indented reply is coloured, and unchanged without
    the escapes."""
    with spawned(tmp_path, ["-p", qemu.path]) as child:
        lines = run_at_prompt(child, "query-status")
        assert any(PALETTE["key"] in line for line in lines)
        plain = strip_ansi("\n".join(lines))
        assert plain == json.dumps(json.loads(plain), indent=4)
        leave(child)


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_no_colour_when_asked(qemu: QEMU, tmp_path: Path,
                              env: dict[str, str]) -> None:
    """NO_COLOR (non-empty) or TERM=dumb: no escape codes in replies."""
    with spawned(tmp_path, [qemu.path], env=env) as child:
        (line,) = run_at_prompt(child, "query-status")
        assert "\x1b" not in line
        assert json.loads(line)["return"]["status"] == "running"
        leave(child)


def test_no_colour_in_a_script_on_a_terminal(qemu: QEMU,
                                             tmp_path: Path) -> None:
    """A script piped in is scripting mode: its JSON has no escape codes
    even when stdout is a terminal."""
    script = f"printf 'query-status\\nstop\\n' | {program('qmp-shell')} " \
             f"{qemu.path}"
    with spawned(tmp_path, [], command=script) as child:
        child.expect(pexpect.EOF)
        text = child.before
    assert "\x1b" not in text
    messages = [json.loads(line) for line in text.splitlines() if line]
    assert messages[0]["return"]["status"] == "running"
    assert {"return": {}} in messages
    assert any(m.get("event") == "STOP" for m in messages)


def test_no_colour_in_a_script_to_a_stream_that_is_a_terminal(
        qemu: QEMU, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: stdin a script, stdout claiming to be a terminal:
    plain JSON lines."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    out = FakeTerminal()
    monkeypatch.setattr(sys, "stdin", io.StringIO("query-status\n"))
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["--history", "", qemu.path]) == 0
    assert "\x1b" not in out.getvalue()
    assert json.loads(out.getvalue())["return"]["running"] is True


def help_lines(qemu: QEMU, tmp_path: Path, width: int) -> list[str]:
    """What bare 'help' prints on a terminal `width` columns wide."""
    with spawned(tmp_path, [qemu.path], columns=width) as child:
        lines = run_at_prompt(child, "help")
        leave(child)
    return lines


def test_help_fills_the_terminal_in_columns(qemu: QEMU,
                                            tmp_path: Path) -> None:
    """Bare 'help' lays every command name out in columns as wide as
    the terminal (60, then 160 columns), names whole, sorted down the
    columns; the wider terminal takes fewer lines."""
    names = sorted(c["name"] for c in qemu.machine.cmd(  # type: ignore
        "query-commands"))
    narrow = help_lines(qemu, tmp_path, 60)
    wide = help_lines(qemu, tmp_path, 160)
    for lines, width in ((narrow, 60), (wide, 160)):
        assert all(len(line) <= width for line in lines)
        assert column_major(lines) == names
    assert len(wide) < len(narrow) <= len(names)
    assert max(len(line) for line in wide) > 120


def test_help_of_a_command_wraps_at_spaces(qemu: QEMU,
                                           tmp_path: Path) -> None:
    """'help blockdev-add' on a 60-column terminal: every line fits (but
    a single word wider than the line) and no word is cut."""
    schema = Schema(
        [c["name"] for c in qemu.machine.cmd(  # type: ignore
            "query-commands")],
        qemu.machine.cmd("query-qmp-schema"))  # type: ignore[arg-type]
    expected = ["blockdev-add", *schema.describe("blockdev-add")]
    with spawned(tmp_path, [qemu.path], columns=60) as child:
        lines = run_at_prompt(child, "help blockdev-add")
        leave(child)
    assert len(lines) > len(expected)
    for line in lines:
        assert len(line) <= 60 or len(line.split()) == 1, line
    assert " ".join(lines).split() == " ".join(expected).split()
