"""qmp-shell and qmp-shell-wrap on a real terminal (a pty, driven with
pexpect): against real QEMU, and against a fake monitor for a command
that never gets its reply."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import signal
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from peers import (
    QEMU,
    QEMU_ARGS,
    GuestAgent,
    pid_exists,
    program,
    qemu_binary,
)

from qmp_sync import QMPSyncClient
from qmp_sync.fake_server import FakeQMPServer

# Upper bound of any single wait in these tests.
BOUND = 10.0
PROMPT = "(QEMU) "
TRANS_PROMPT = "TRANS> "
CTRL_C = "\x03"
CTRL_P = "\x10"
ENTER = "\r"
STATUS_REPLY = '"status": "running"'






@contextlib.contextmanager
def spawned(tmp_path: Path, name: str, args: list[str],
            columns: int = 200) -> Iterator[pexpect.spawn]:
    """Run console script `name` on a pty `columns` wide; everything it
    prints is kept in ``child.logfile_read`` (a StringIO). It is ended,
    forcibly if need be, when the block is left."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items()
           if key not in ("QMP_SHELL_HISTORY", "QMP_SOCKET", "INPUTRC")}
    env.update(TERM="xterm", HOME=str(home), NO_COLOR="1")
    child = pexpect.spawn(program(name), args, env=env, encoding="utf-8",
                          dimensions=(24, columns), timeout=BOUND)
    child.logfile_read = io.StringIO()
    try:
        yield child
    finally:
        child.close(force=True)


def shell(tmp_path: Path, *args: str, columns: int = 200
          ) -> contextlib.AbstractContextManager[pexpect.spawn]:
    """``qmp-shell ARGS`` on a pty (pass ``--history`` in `args`)."""
    return spawned(tmp_path, "qmp-shell", list(args), columns)


def output(child: pexpect.spawn) -> str:
    """Everything the child has printed so far."""
    return child.logfile_read.getvalue()  # type: ignore[no-any-return]


def exit_status(child: pexpect.spawn) -> int:
    """Wait (bounded) for the child to close the terminal and exit;
    its exit status."""
    child.expect(pexpect.EOF)
    # pexpect's own wait() has no timeout: wait for the exit on a pidfd
    # (readable once the process has exited), then reap it.
    try:
        pidfd = os.pidfd_open(child.pid)
    except ProcessLookupError:
        pass  # at EOF pexpect asks isalive(), which may have reaped it
    else:
        try:
            exited, _, _ = select.select([pidfd], [], [], BOUND)
        finally:
            os.close(pidfd)
        if not exited:
            pytest.fail("the program closed its terminal but did not exit")
    child.wait()
    assert child.signalstatus is None, output(child)
    return child.exitstatus  # type: ignore[no-any-return]


def at_prompt(child: pexpect.spawn) -> None:
    child.expect_exact(PROMPT)


def leave(child: pexpect.spawn) -> int:
    """At the next prompt, Ctrl-D; the exit status."""
    at_prompt(child)
    child.sendeof()
    return exit_status(child)


# ----------------------------------------------------------------------
# qmp-shell against real QEMU.

def test_command_and_reply(qemu: QEMU, tmp_path: Path) -> None:
    """A command prints its reply as JSON; Ctrl-D exits with status 0."""
    with shell(tmp_path, "--history", "", qemu.path) as child:
        child.expect_exact("Connected to QEMU 7.2.")
        child.expect_exact("(QMP)")
        at_prompt(child)
        child.send("query-status" + ENTER)
        child.expect(r'\{"return": \{[^\r\n]*"status": "running"')
        assert leave(child) == 0, output(child)
        assert "Traceback" not in output(child)


def test_error_reply_is_one_line(qemu: QEMU, tmp_path: Path) -> None:
    """An error reply is one Error line; the session goes on; status 1."""
    with shell(tmp_path, "--history", "", qemu.path) as child:
        at_prompt(child)
        child.send("qom-get path=/machine property=no-such-thing" + ENTER)
        child.expect(r"Error: GenericError: [^\r\n]*no-such-thing[^\r\n]*"
                     r"\r\n")
        at_prompt(child)
        child.send("query-status" + ENTER)
        child.expect_exact(STATUS_REPLY)
        assert leave(child) == 1, output(child)
        assert "Traceback" not in output(child)


def test_tab_completes_a_command_name(qemu: QEMU, tmp_path: Path) -> None:
    """Tab completes a unique command name."""
    with shell(tmp_path, "--history", "", qemu.path) as child:
        at_prompt(child)
        child.send("query-statu\t")
        child.expect_exact("status ")
        child.send(ENTER)
        child.expect_exact(STATUS_REPLY)
        assert leave(child) == 0, output(child)


def test_guest_agent(qemu_ga: GuestAgent, tmp_path: Path) -> None:
    """-N with a real qemu-ga: no greeting, completion from the command
    list guest-info gives, a reply."""
    with shell(tmp_path, "--history", "", "-N", qemu_ga.path) as child:
        child.expect_exact("Connected to the server, without a greeting")
        at_prompt(child)
        child.send("guest-pi\t")
        child.expect_exact("ng ")
        child.send(ENTER)
        child.expect_exact('{"return": {}}')
        assert leave(child) == 0, output(child)


def test_tab_completes_an_argument_name(qemu: QEMU, tmp_path: Path) -> None:
    """Tab completes an argument name of the command typed."""
    with shell(tmp_path, "--history", "", qemu.path) as child:
        at_prompt(child)
        child.send("human-monitor-command comm\t")
        child.expect_exact("command-line=")
        child.send('"info status"' + ENTER)
        child.expect_exact("VM status: running")
        assert leave(child) == 0, output(child)


def test_event_at_idle_prompt_keeps_the_line(qemu2: QEMU,
                                             tmp_path: Path) -> None:
    """An event shows at once at the prompt; the typed line survives."""
    with shell(tmp_path, "--history", "", qemu2.paths[0]) as child:
        at_prompt(child)
        child.send("query-")
        child.expect_exact("query-")
        with QMPSyncClient(qemu2.paths[1]) as client:
            client.connect(timeout=BOUND)
            client.execute("stop", timeout=BOUND)
            child.expect(r'\{[^\r\n]*"event": "STOP"[^\r\n]*\}\r\n')
            child.expect_exact(PROMPT + "query-")
            child.send("status" + ENTER)
            child.expect_exact('"status": "paused"')
            assert leave(child) == 0, output(child)


def test_event_above_a_line_that_wraps(qemu2: QEMU,
                                       tmp_path: Path) -> None:
    """A line longer than the terminal is wide is erased whole, from
    the row of its prompt, before an event is printed above it; and
    redrawn whole, wherever the cursor was in it."""
    line = 'human-monitor-command command-line="info status"'
    with shell(tmp_path, "--history", "", qemu2.paths[0],
               columns=40) as child:
        at_prompt(child)
        child.send(line)
        child.expect_exact(line[-10:])
        with QMPSyncClient(qemu2.paths[1]) as client:
            client.connect(timeout=BOUND)
            # Cursor at the end, on the second row: up one row, clear.
            client.execute("stop", timeout=BOUND)
            child.expect_exact('\r\x1b[1A\x1b[J{"timestamp"')
            child.expect_exact('"event": "STOP"')
            child.expect_exact(line[-10:])
            # Cursor at the start (Ctrl-A), on the prompt's row: clear
            # from there, which takes the second row too.
            child.send("\x01")
            client.execute("cont", timeout=BOUND)
            child.expect_exact('\r\x1b[J{"timestamp"')
            child.expect_exact('"event": "RESUME"')
            child.expect_exact(line[-10:])
        child.send(ENTER)
        child.expect_exact("VM status: running")
        assert leave(child) == 0, output(child)


def test_transactions(qemu: QEMU, tmp_path: Path) -> None:
    """A transaction runs its actions, on one line or over several."""
    with shell(tmp_path, "--history", "", qemu.path) as child:
        at_prompt(child)
        child.send("blockdev-add driver=null-co node-name=n0" + ENTER)
        child.expect_exact('{"return": {}}')
        at_prompt(child)
        child.send("transaction( block-dirty-bitmap-add node=n0 name=b1 "
                   "block-dirty-bitmap-add node=n0 name=b2 )" + ENTER)
        child.expect_exact('{"return": {}}')
        at_prompt(child)
        child.send("transaction(" + ENTER)
        child.expect_exact(TRANS_PROMPT)
        child.send("block-dirty-bitmap-remove node=n0 name=b1" + ENTER)
        child.expect_exact(TRANS_PROMPT)
        child.send(")" + ENTER)
        child.expect_exact('{"return": {}}')
        at_prompt(child)
        child.send("query-named-block-nodes" + ENTER)
        child.expect(r'\{"return": \[[^\r\n]*\]\}\r\n')
        reply = json.loads(child.after)
        assert leave(child) == 0, output(child)
    (node,) = [n for n in reply["return"] if n["node-name"] == "n0"]
    assert [b["name"] for b in node["dirty-bitmaps"]] == ["b2"]


def test_human_monitor_mode(qemu: QEMU, tmp_path: Path) -> None:
    """With -H a line goes to the human monitor and its text is shown."""
    with shell(tmp_path, "-H", "--history", "", qemu.path) as child:
        child.expect_exact("(human monitor via QMP)")
        at_prompt(child)
        child.send("info status" + ENTER)
        child.expect_exact("VM status: running\r\n")
        assert leave(child) == 0, output(child)


def test_history_across_sessions(qemu: QEMU, tmp_path: Path) -> None:
    """Lines saved in the history file come back with Ctrl-P next time."""
    history = tmp_path / "history"
    with shell(tmp_path, "--history", str(history), qemu.path) as child:
        at_prompt(child)
        child.send("query-status" + ENTER)
        child.expect_exact(STATUS_REPLY)
        assert leave(child) == 0, output(child)
    assert "query-status" in history.read_text()
    with shell(tmp_path, "--history", str(history), qemu.path) as child:
        at_prompt(child)
        child.send(CTRL_P)
        child.expect_exact("query-status")
        child.send(ENTER)
        child.expect_exact(STATUS_REPLY)
        assert leave(child) == 0, output(child)


def test_ctrl_c_drops_the_line(qemu: QEMU, tmp_path: Path) -> None:
    """Ctrl-C at the prompt drops the half-typed line."""
    with shell(tmp_path, "--history", "", qemu.path) as child:
        at_prompt(child)
        child.send("bogus-stuff")
        child.expect_exact("bogus-stuff")
        child.send(CTRL_C)
        at_prompt(child)
        child.send("query-status" + ENTER)
        child.expect(r'\{"return": \{[^\r\n]*"status": "running"')
        assert leave(child) == 0, output(child)
    text = output(child)
    assert "Error" not in text and "Traceback" not in text, text


def test_connection_lost(qemu: QEMU, tmp_path: Path) -> None:
    """QEMU dying under the prompt is reported, with exit status 3."""
    with shell(tmp_path, "--history", "", qemu.path) as child:
        at_prompt(child)
        qemu.kill()
        child.expect_exact("Error: the connection to QEMU was lost")
        assert exit_status(child) == 3, output(child)
        assert "Traceback" not in output(child)


def test_quit(qemu: QEMU, tmp_path: Path) -> None:
    """'quit' shows its reply and SHUTDOWN, then 'QEMU has quit.'; status 0."""
    with shell(tmp_path, "--history", "", qemu.path) as child:
        at_prompt(child)
        child.send("quit" + ENTER)
        child.expect_exact("QEMU has quit.")
        assert exit_status(child) == 0, output(child)
    text = output(child)
    assert '{"return": {}}' in text, text
    assert '"event": "SHUTDOWN"' in text, text
    assert "Error" not in text and "Traceback" not in text, text
    qemu.wait(BOUND)


def test_help_describes_arguments(qemu: QEMU, tmp_path: Path) -> None:
    """'help COMMAND' lists its arguments: required or not, and types."""
    with shell(tmp_path, "--history", "", qemu.path) as child:
        at_prompt(child)
        child.send("help query-cpu-model-expansion" + ENTER)
        child.expect_exact(PROMPT)
        text = child.before
        child.sendeof()
        assert exit_status(child) == 0, output(child)
    assert re.search(r"type +required +enum \(static, full\)", text), text
    assert re.search(r"model +required", text), text


# ----------------------------------------------------------------------
# Ctrl-C while a command waits: a fake monitor that never answers.

def test_ctrl_c_while_a_command_waits(tmp_path: Path) -> None:
    """Ctrl-C while a command waits gives the prompt back; work goes on."""
    with FakeQMPServer() as fake:
        fake.reply("query-commands", [{"name": "slow"},
                                      {"name": "query-status"}])
        fake.fault("slow", "stall")
        fake.reply("query-status", {"status": "running",
                                    "singlestep": False, "running": True})
        with shell(tmp_path, "--history", "", str(fake.address)) as child:
            at_prompt(child)
            child.send("slow" + ENTER)
            fake.wait_for("slow", timeout=BOUND)
            child.send(CTRL_C)
            child.expect_exact("Error: interrupted")
            at_prompt(child)
            child.send("query-status" + ENTER)
            child.expect_exact(STATUS_REPLY)
            at_prompt(child)
            child.sendeof()
            # The interrupted command is not known to have worked.
            assert exit_status(child) == 1, output(child)
    assert fake.commands[0] == "qmp_capabilities"
    fake.assert_received("query-status", times=1)
    assert "Traceback" not in output(child)


# ----------------------------------------------------------------------
# qmp-shell-wrap.

@contextlib.contextmanager
def wrapped_qemu(tmp_path: Path) -> Iterator[tuple[pexpect.spawn, Path]]:
    """qmp-shell-wrap running a guest-less QEMU that writes its pid to
    the file yielded; a QEMU left behind is killed at the end."""
    pidfile = tmp_path / "qemu.pid"
    args = ["--history", "", "--", qemu_binary(), *QEMU_ARGS,
            "-pidfile", str(pidfile)]
    try:
        with spawned(tmp_path, "qmp-shell-wrap", args) as child:
            yield child, pidfile
    finally:
        with contextlib.suppress(OSError, ValueError):
            # QEMU runs in a session of its own: the pty's hangup does
            # not reach it.
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


@pytest.mark.qemu
def test_wrap_leaves_no_qemu_behind(tmp_path: Path) -> None:
    """qmp-shell-wrap ends and reaps its QEMU when the user leaves."""
    with wrapped_qemu(tmp_path) as (child, pidfile):
        at_prompt(child)
        child.send("query-status" + ENTER)
        child.expect_exact(STATUS_REPLY)
        at_prompt(child)
        pid = int(pidfile.read_text())
        assert pid_exists(pid)
        child.sendeof()
        assert exit_status(child) == 0, output(child)
        assert not pid_exists(pid)
        assert "did not quit" not in output(child)


@pytest.mark.qemu
def test_wrap_user_quits(tmp_path: Path) -> None:
    """qmp-shell-wrap exits with status 0 after the user's 'quit'."""
    with wrapped_qemu(tmp_path) as (child, pidfile):
        at_prompt(child)
        pid = int(pidfile.read_text())
        child.send("quit" + ENTER)
        child.expect_exact("QEMU has quit.")
        assert exit_status(child) == 0, output(child)
        assert not pid_exists(pid)
        text = output(child)
        assert "Error" not in text and "Traceback" not in text, text
