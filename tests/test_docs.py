"""
The Python examples of README.rst and docs/*.rst, run as a reader would
run them, against a real QEMU.

Every ``.. code-block:: python`` is a self-contained program (one that
needs a QEMU starts it itself) and runs in a fresh interpreter, in an
empty directory, with warnings as errors; it passes when it exits with
status 0, prints no traceback or warning, and each comment on a
``print(...)`` shows what that call printed (``...`` standing for any
text), so that the comments cannot drift from QEMU's answers.

A block that defines ``test_...`` functions is a pytest test file of a
user's: it is written to a directory of its own and run by pytest,
where the plugin's fixtures come in through its entry point, and every
test in it must pass (none skipped).

Shell sessions (``console`` blocks, literal ``::`` blocks) and output
(``text`` blocks) are not run, and Python code in one of them fails
`test_no_hidden_python`. A Python block may be left out only by an RST
comment right above it, ``.. not-run: REASON``, which the test report
shows as a skip with that reason; no block uses one today.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.rst", *sorted((ROOT / "docs").glob("*.rst"))]
#: Longest run of one example, in seconds (each takes about one).
EXAMPLE_TIMEOUT = 60.0

#: What NegotiationError says when QEMU 7.2 greeted twice a client that
#: connected while it was starting.
QEMU_GREETED_TWICE = "the server greeted again instead of answering"

DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. code-block::\s*(?P<lang>\S*)")
NOT_RUN = re.compile(r"^\s*\.\. not-run:\s*(?P<reason>.*\S)")
# A paragraph ending in "::" starts a literal block (a directive such as
# ".. note::" does not).
LITERAL = re.compile(r"^(?!\s*\.\. )(?P<indent>\s*)\S.*::\s*$")
# Lines that give away Python code in a block not marked as Python.
PYTHON_LINE = re.compile(
    r"^\s*(import \w|from [\w.]+ import |def \w|async def |class \w"
    r"|with .*:$|print\()")


@dataclass
class Block:
    """One code block: where it is, its language and its text."""

    path: Path
    line: int
    lang: str
    code: str
    #: The line number of the code's first line.
    first_line: int
    not_run: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def body(lines: list[str], start: int, indent: str
         ) -> tuple[str, int, int]:
    """The block that starts at `start` (the line after its directive or
    "::" line): every following line that is blank or indented deeper
    than `indent`. Returns the text, dedented, the index of its first
    line and the index of the first line after it."""
    end = start
    while end < len(lines):
        line = lines[end]
        if line.strip() and not (line.startswith(indent)
                                 and line[len(indent):][:1].isspace()):
            break
        end += 1
    # Directive options (":caption: ...") and blank lines come first.
    while start < end and (not lines[start].strip()
                           or lines[start].strip().startswith(":")):
        start += 1
    content = "\n".join(lines[start:end])
    return textwrap.dedent(content).rstrip("\n") + "\n", start, end


def blocks(path: Path) -> list[Block]:
    """The code blocks of one document, directives and literal blocks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        directive = DIRECTIVE.match(line)
        literal = LITERAL.match(line)
        if directive or literal:
            match = directive or literal
            assert match is not None
            lang = directive["lang"] if directive else "::"
            above = [text for text in lines[:index] if text.strip()]
            skip = NOT_RUN.match(above[-1]) if above else None
            code, first, end = body(lines, index + 1, match["indent"])
            found.append(Block(path, index + 1, lang or "::", code,
                               first + 1, skip["reason"] if skip else None))
            index = end
        else:
            index += 1
    return found


ALL_BLOCKS = [block for path in DOCUMENTS for block in blocks(path)]
PYTHON = [block for block in ALL_BLOCKS if block.lang == "python"]


# Runs example.py with print() recording what each of its calls printed,
# and where; the record goes to printed.json, also when the example
# fails.
RECORDER = """\
import builtins, io, json, runpy, sys

EXAMPLE = sys.argv[1]
printed = []
real_print = builtins.print

def recording_print(*args, **kwargs):
    frame = sys._getframe(1)
    if frame.f_code.co_filename == EXAMPLE and kwargs.get("file") is None:
        text = io.StringIO()
        real_print(*args, **dict(kwargs, file=text))
        printed.append((frame.f_lineno, text.getvalue()))
    real_print(*args, **kwargs)

builtins.print = recording_print
sys.argv = [EXAMPLE]
try:
    runpy.run_path(EXAMPLE, run_name="__main__")
finally:
    with open("printed.json", "w") as out:
        json.dump(printed, out)
"""


def promised_output(code: str) -> dict[tuple[int, int], str]:
    """The output an example promises: for each ``print(...)`` statement
    with a comment on one of its lines, its first and last line and the
    comment (of a statement with several, the last)."""
    comments = {token.start[0]: token.string[1:].strip()
                for token in tokenize.generate_tokens(
                    io.StringIO(code).readline)
                if token.type == tokenize.COMMENT}
    promised = {}
    for node in ast.walk(ast.parse(code)):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)
                and node.value.func.id == "print"):
            last = node.end_lineno or node.lineno
            lines = [comments[row] for row in range(node.lineno, last + 1)
                     if row in comments]
            if lines:
                promised[node.lineno, last] = lines[-1]
    return promised


def check_output(block: Block, printed: list[tuple[int, str]]) -> None:
    """Each comment on a ``print(...)`` shows what that call prints (the
    first time it runs), ``...`` standing for any text."""
    for (first, last), comment in promised_output(block.code).items():
        texts = [text.strip() for line, text in printed
                 if first <= line <= last]
        where = (f"{block.path.relative_to(ROOT)}:"
                 f"{block.first_line + first - 1}")
        assert texts, f"{where}: the print() never ran"
        pattern = ".*".join(re.escape(part) for part in comment.split("..."))
        assert re.fullmatch(pattern, texts[0], re.DOTALL), (
            f"{where}: the comment says {comment!r}, but it printed "
            f"{texts[0]!r}")


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `argv` in `cwd` in a process group of its own, bounded by
    EXAMPLE_TIMEOUT; then kill whatever is left of the group, so that an
    example that fails half-way leaves no QEMU behind. (Its output goes
    to files: a QEMU left running would hold a pipe open.)"""
    out_path, err_path = cwd / "stdout.txt", cwd / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err, \
            subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err,
                             start_new_session=True) as process:
        try:
            process.wait(EXAMPLE_TIMEOUT)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(argv, process.returncode,
                                       out_path.read_text(),
                                       err_path.read_text())


def is_test_file(code: str) -> bool:
    return re.search(r"^def test_\w+\(", code, re.MULTILINE) is not None


def test_documents_have_examples() -> None:
    """The documents are where this test expects them, with examples."""
    assert (ROOT / "README.rst").is_file()
    assert len(DOCUMENTS) > 10, "docs/*.rst is missing"
    assert len(PYTHON) > 10
    assert any(is_test_file(block.code) for block in PYTHON)


def test_no_hidden_python() -> None:
    """Python code is always in a ``.. code-block:: python`` (which this
    test runs), never in a literal block or another language's."""
    hidden = [block.where for block in ALL_BLOCKS
              if block.lang != "python"
              and any(PYTHON_LINE.match(line)
                      for line in block.code.splitlines())]
    assert not hidden, ("Python code outside a '.. code-block:: python' "
                        f"(so never run): {hidden}")


def test_blocks_are_found(tmp_path: Path) -> None:
    """The parser finds directives with options, literal blocks and the
    not-run marker, and ends a block where its indentation ends."""
    document = tmp_path / "sample.rst"
    document.write_text(textwrap.dedent("""\
        Title
        =====

        Run this:

        .. code-block:: python
           :caption: one

            print(1)

            print(2)
        Not indented: the block ended.

        .. not-run: it needs a guest

        .. code-block:: python

            print(3)

        A shell session::

            $ qmp-shell /tmp/qmp.sock
        """))
    found = [(block.line, block.first_line, block.lang, block.code,
              block.not_run) for block in blocks(document)]
    assert found == [
        (6, 9, "python", "print(1)\n\nprint(2)\n", None),
        (16, 18, "python", "print(3)\n", "it needs a guest"),
        (20, 22, "::", "$ qmp-shell /tmp/qmp.sock\n", None),
    ]


def test_output_comments_are_checked() -> None:
    """A comment on a print() must match what it printed, "..." matching
    anything; a print() with a comment that never ran fails too."""
    code = textwrap.dedent("""\
        print({"a": 1, "b": 2})   # {'a': 1, ...}
        print("x",
              "y")                # x y
        # A comment on a line of its own promises nothing.
        print("z")
        """)
    printed = [(1, "{'a': 1, 'b': 2}\n"), (2, "x y\n"), (5, "z\n")]
    check_output(Block(ROOT / "README.rst", 1, "python", code, 10), printed)
    wrong = Block(ROOT / "README.rst", 1, "python",
                  code.replace("# x y", "# x z"), 10)
    with pytest.raises(AssertionError,
                       match=r"README\.rst:11: the comment says 'x z'"):
        check_output(wrong, printed)
    with pytest.raises(AssertionError,
                       match=r"README\.rst:10: the print\(\) never ran"):
        check_output(wrong, printed[1:])


@pytest.mark.qemu
@pytest.mark.timeout(EXAMPLE_TIMEOUT + 30)
@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_example(block: Block, tmp_path: Path) -> None:
    """The example runs to its end, cleanly (a test file: its tests
    pass)."""
    if block.not_run is not None:
        pytest.skip(f"{block.where}: not run: {block.not_run}")
    if is_test_file(block.code):
        (tmp_path / "test_example.py").write_text(block.code)
        (tmp_path / "pytest.ini").write_text(
            "[pytest]\nfilterwarnings = error\n"
            "qmp_sync_require_qemu = true\n")
        result = run([sys.executable, "-m", "pytest", "-q",
                      "-p", "no:cacheprovider", "test_example.py"],
                     tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{block.where}:\n{output}"
        # pytest -q ends with a summary such as "2 passed in 0.51s".
        summary = result.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"\d+ passed in .*", summary), output
        return
    example = tmp_path / "example.py"
    example.write_text(block.code)
    (tmp_path / "recorder.py").write_text(RECORDER)
    argv = [sys.executable, "-W", "error", "recorder.py", str(example)]
    result = run(argv, tmp_path)
    if result.returncode != 0 and QEMU_GREETED_TWICE in result.stderr:
        # QEMU 7.2's rare start-up race (see docs/errors.rst), not the
        # example's fault: once more.
        result = run(argv, tmp_path)
    report = (f"{block.where} exited with {result.returncode}\n"
              f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}")
    assert result.returncode == 0, report
    assert not re.search(r"Traceback|Warning|Exception ignored",
                         result.stderr), report
    printed = json.loads((tmp_path / "printed.json").read_text())
    check_output(block, [(line, text) for line, text in printed])
