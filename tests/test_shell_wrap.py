"""
qmp-shell-wrap on `QEMUMachine`, run in-process through
``wrap_main(argv)`` with a script on stdin: what QEMU prints reaches
the user, on a failed start and after a session, and ``-l`` logs the
session.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import pytest
from peers import QEMU_ARGS, Run, qemu_binary

from qmp_sync.shell import cli, wrap_main


@pytest.fixture
def wrap(monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Run ``wrap_main(argv)`` with `lines` as its stdin."""

    def run(argv: Sequence[str], *lines: str) -> Run:
        script = "".join(f"{line}\n" for line in lines)
        monkeypatch.setattr(sys, "stdin", io.StringIO(script))
        status = wrap_main(["--history", "", *argv])
        out, err = capsys.readouterr()
        return Run(status, out, err)

    return run


def noisy_qemu(tmp_path: Path) -> str:
    """A QEMU binary stand-in that says something on stderr, then
    becomes QEMU with the arguments it was given."""
    script = tmp_path / "noisy-qemu"
    script.write_text("#!/bin/sh\necho 'hello from QEMU' >&2\n"
                      f'exec {qemu_binary()} "$@"\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.qemu
def test_a_refused_command_line_is_reported_with_what_qemu_said(
        wrap: Callable[..., Run]) -> None:
    """QEMU refusing its arguments: its exit status and its own message,
    then status 3."""
    run = wrap(["--", qemu_binary(), *QEMU_ARGS, "-no-such-option"],
               "query-status")
    assert run.status == cli.EXIT_CONNECTION
    assert run.err.startswith(
        "Error: QEMU exited (status 1) before its monitor answered; it "
        "said:\n")
    assert "-no-such-option: invalid option" in run.err
    assert run.out == ""


def test_a_missing_binary_is_one_line(wrap: Callable[..., Run],
                                      tmp_path: Path) -> None:
    """A QEMU binary that does not exist: one line naming it, status 3."""
    missing = str(tmp_path / "no-qemu")
    run = wrap(["--", missing, *QEMU_ARGS])
    assert run.status == cli.EXIT_CONNECTION
    assert run.err == (f"Error: cannot run {missing}: No such file or "
                       "directory\n")


@pytest.mark.qemu
def test_what_qemu_printed_is_shown_after_the_session(
        wrap: Callable[..., Run], tmp_path: Path) -> None:
    """QEMU's output goes to stderr once the session is over, never
    into the replies."""
    run = wrap(["--", noisy_qemu(tmp_path), *QEMU_ARGS], "query-status")
    assert run.status == 0, run.err
    assert run.replies == [{"return": {"status": "running",
                                       "singlestep": False,
                                       "running": True}}]
    assert run.err == "qmp-shell-wrap: QEMU said:\nhello from QEMU\n"


@pytest.mark.qemu
def test_logfile_has_the_wrapped_session(wrap: Callable[..., Run],
                                         tmp_path: Path) -> None:
    """-l FILE logs the session with the QEMU it started: greeting,
    commands, replies, and the closing quit."""
    log = tmp_path / "qmp.log"
    run = wrap(["-l", str(log), "--", qemu_binary(), *QEMU_ARGS],
               "query-name")
    assert run.status == 0, run.err
    assert run.replies == [{"return": {}}]
    text = log.read_text()
    assert '<-- {"QMP":' in text
    assert '--> {"execute":"query-name"' in text
    assert '--> {"execute":"quit"' in text
