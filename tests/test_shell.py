"""
qmp-shell and qmp-shell-wrap run in-process through ``main(argv)``
with a script on stdin (the scripting mode), against real QEMU; and
completion, checks and help read from QEMU's own schema.

The terminal (readline, live events, history) is tested through a real
pseudo-terminal in test_shell_pty.py.
"""

from __future__ import annotations

import io
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable

import pytest
from peers import QEMU, QEMU_ARGS, GuestAgent, Run, qemu_binary

from qmp_sync import QMPSyncClient
from qmp_sync.machine import QEMUMachine
from qmp_sync.shell import cli, main, wrap_main
from qmp_sync.shell.completion import complete_hmp, complete_qmp
from qmp_sync.shell.schema import HumanCommands, Schema

Entry = Callable[[Sequence[str]], int]





@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
          tmp_path: Path) -> Callable[..., Run]:
    """Run ``main(argv)`` (or `entry`) with `lines` as its stdin."""
    monkeypatch.setenv("HOME", str(tmp_path))

    def run(argv: Sequence[str], *lines: str, entry: Entry = main) -> Run:
        script = "".join(f"{line}\n" for line in lines)
        monkeypatch.setattr(sys, "stdin", io.StringIO(script))
        status = entry(list(argv))
        out, err = capsys.readouterr()
        return Run(status, out, err)

    return run


# ----------------------------------------------------------------------
# Scripting mode against QEMU.

def test_script_prints_each_reply_and_event_as_a_json_line(
        qemu: QEMU, shell: Callable[..., Run]) -> None:
    """Without a terminal, each reply and each event is one line of
    JSON (events have "event"), in the order they came; status 0."""
    run = shell([qemu.path], "query-status", "stop", "cont",
                "query-status")
    assert run.status == 0, run.err
    messages = run.messages
    assert messages[0]["return"]["status"] == "running"  # type: ignore
    events = [m["event"] for m in messages if "event" in m]
    assert events == ["STOP", "RESUME"]
    replies = [m for m in messages if "event" not in m]
    assert len(replies) == 4
    assert all(set(m) == {"return"} for m in replies)
    # QEMU sends STOP before the reply to `stop`.
    assert messages.index({"return": {}}) > [
        "event" in m for m in messages].index(True)
    assert run.err == ""


def test_script_error_reply_and_exit_status(
        qemu: QEMU, shell: Callable[..., Run]) -> None:
    """An error reply is printed as its JSON line, the script goes on,
    and the exit status says that a command failed."""
    run = shell([qemu.path], "qom-get path=/machine property=no-such",
                "query-status")
    assert run.status == cli.EXIT_FAILED
    error, reply = run.messages
    assert error["error"]["class"] == "GenericError"  # type: ignore
    assert reply["return"]["running"] is True  # type: ignore


def test_unknown_names_get_suggestions_and_nothing_is_sent(
        qemu: QEMU, shell: Callable[..., Run], tmp_path: Path) -> None:
    """A misspelt command or argument is refused with a suggestion,
    before anything is sent; a malformed line says what is wrong."""
    log = tmp_path / "log"
    run = shell(["-l", str(log), qemu.path], "qeury-status",
                "human-monitor-command comand-line=x",
                "query-status foo=1", "query-status a=",
                "blockdev-add driver=raw file.drivr=null-co",
                "cmd a.b=1 a=2", "query-status")
    assert run.status == cli.EXIT_FAILED
    assert run.err.splitlines() == [
        "Error: unknown command 'qeury-status' (did you mean "
        "'query-status' or 'query-stats'?)",
        "Error: human-monitor-command has no argument 'comand-line' "
        "(did you mean 'command-line'?)",
        "Error: query-status takes no arguments, not 'foo'",
        "Error: query-status takes no arguments, not 'a'",
        "Error: blockdev-add has no argument 'file.drivr' (did you mean "
        "'file.driver'?)",
        "Error: key 'a' cannot be both a value and an object",
    ]
    assert len(run.messages) == 1
    sent = log.read_text()
    assert "qeury" not in sent and "comand-line" not in sent
    assert sent.count('"execute":"query-status"') == 1


def test_dotted_keys_do_not_swallow_later_arguments(
        qemu: QEMU, shell: Callable[..., Run]) -> None:
    """``file.driver=null-co file.size=4096 read-only=true``: the
    dotted keys build ``file``, and ``read-only`` stays at the top."""
    run = shell(["-v", qemu.path],
                "blockdev-add driver=raw node-name=r0 file.driver=null-co "
                "file.size=4096 read-only=true",
                "query-named-block-nodes")
    assert run.status == 0, run.err
    sent, added, _, nodes = run.messages
    assert sent["arguments"] == {  # the -v echo
        "driver": "raw", "node-name": "r0", "read-only": True,
        "file": {"driver": "null-co", "size": 4096}}
    assert added == {"return": {}}
    node = next(n for n in nodes["return"]  # type: ignore
                if n["node-name"] == "r0")
    assert node["ro"] is True


def test_one_line_transaction_with_two_actions(
        qemu: QEMU, shell: Callable[..., Run]) -> None:
    """Two actions on one ``transaction( ... )`` line both happen; a
    multi-line one works too."""
    run = shell([qemu.path], "blockdev-add driver=null-co node-name=n0",
                "transaction( block-dirty-bitmap-add node=n0 name=b1 "
                "block-dirty-bitmap-add node=n0 name=b2 )",
                "transaction(", "block-dirty-bitmap-remove node=n0 name=b1",
                ")", "query-named-block-nodes")
    assert run.status == 0, run.err
    *replies, nodes = run.messages
    assert replies == [{"return": {}}] * 3
    node = next(n for n in nodes["return"]  # type: ignore
                if n["node-name"] == "n0")
    assert [b["name"] for b in node["dirty-bitmaps"]] == ["b2"]


def test_unknown_transaction_action_gets_a_suggestion(
        qemu: QEMU, shell: Callable[..., Run]) -> None:
    """A misspelt action is refused before the transaction is sent."""
    run = shell([qemu.path], "transaction( abortt )")
    assert run.status == cli.EXIT_FAILED
    assert run.err == ("Error: unknown transaction action 'abortt' (did "
                       "you mean 'abort'?)\n")
    assert run.out == ""


def test_raw_json_lines_are_sent_as_they_are(
        qemu: QEMU, shell: Callable[..., Run]) -> None:
    """A JSON line is sent unchanged; the reply keeps its id."""
    run = shell([qemu.path],
                '{"execute": "query-status", "id": "mine"}',
                '{"execute": "no-such-command"}')
    assert run.status == cli.EXIT_FAILED
    first, second = run.messages
    assert first["id"] == "mine" and first["return"]["running"]  # type: ignore
    assert second["error"]["class"] == "CommandNotFound"  # type: ignore


def test_pretty_and_verbose(qemu: QEMU, shell: Callable[..., Run]) -> None:
    """-v echoes what is sent; -p indents the JSON."""
    run = shell(["-v", "-p", qemu.path], "query-status")
    assert run.status == 0
    assert run.out.startswith('{\n    "execute": "query-status"\n}\n')
    assert '\n    "return": {\n        "status": "running"' in run.out


def test_logfile_has_every_message(qemu: QEMU, shell: Callable[..., Run],
                                   tmp_path: Path) -> None:
    """-l FILE logs every message sent and received: the greeting, the
    negotiation, commands, replies and events."""
    log = tmp_path / "qmp.log"
    run = shell(["-l", str(log), qemu.path], "stop")
    assert run.status == 0
    lines = log.read_text().splitlines()
    assert any('<-- {"QMP":' in line for line in lines)
    assert any('--> {"execute":"qmp_capabilities"' in line for line in lines)
    assert any('--> {"execute":"stop"' in line for line in lines)
    assert any('<-- {"timestamp"' in line and '"STOP"' in line
               for line in lines)
    assert sum('<-- {"return":{}' in line for line in lines) >= 2


def test_hmp_mode(qemu: QEMU, shell: Callable[..., Run]) -> None:
    """-H sends lines to the human monitor and prints its text."""
    run = shell(["-H", qemu.path], "info status", "stop", "info status",
                "cpu 5")
    assert run.out.splitlines()[0] == "VM status: running"
    assert "VM status: paused" in run.out
    assert run.err.startswith("Error: GenericError:")
    assert run.status == cli.EXIT_FAILED


def test_skip_negotiation(qemu: QEMU, shell: Callable[..., Run]) -> None:
    """-N leaves negotiation to the user (as qemu-ga needs)."""
    run = shell(["-N", qemu.path], "query-status", "qmp_capabilities",
                "query-status")
    assert run.status == cli.EXIT_FAILED
    refused, negotiated, status = run.messages
    assert refused["error"]["class"] == "CommandNotFound"  # type: ignore
    assert negotiated == {"return": {}}
    assert status["return"]["running"] is True  # type: ignore


def test_guest_agent(qemu_ga: GuestAgent,
                     shell: Callable[..., Run]) -> None:
    """-N talks to a real qemu-ga, which neither greets nor negotiates;
    its commands are checked against the list guest-info gives."""
    run = shell(["-N", qemu_ga.path], "guest-ping", "guest-sync id=42",
                "guest-pnig")
    assert run.messages == [{"return": {}}, {"return": 42}]
    assert run.err == ("Error: unknown command 'guest-pnig' (did you mean "
                       "'guest-ping'?)\n")
    assert run.status == cli.EXIT_FAILED


def test_guest_agent_without_skip_negotiation(
        qemu_ga: GuestAgent, shell: Callable[..., Run],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without -N the shell waits for a greeting qemu-ga never sends,
    and then says what to try."""
    monkeypatch.setattr(cli, "CONNECT_TIMEOUT", 0.3)
    run = shell([qemu_ga.path], "guest-ping")
    assert run.status == cli.EXIT_CONNECTION
    assert run.err == (
        f"Error: {qemu_ga.path} sent no greeting within 0.3 s (is another "
        "client using this monitor? A guest agent needs -N.)\n")


def test_quit_as_the_last_line_exits_0(
        qemu: QEMU, shell: Callable[..., Run]) -> None:
    """`quit` as the last line exits 0, and QEMU is gone."""
    assert shell([qemu.path], "quit").status == 0
    qemu.wait(10)


def test_lost_connection_is_one_line_and_status_3(
        qemu2: QEMU, shell: Callable[..., Run]) -> None:
    """When QEMU goes away under a script, the shell says so in one line
    and exits 3."""
    with QMPSyncClient(qemu2.paths[1]) as other:
        other.connect()
        run = shell([qemu2.paths[0]], "quit", "query-status")
    assert run.status == cli.EXIT_CONNECTION
    assert run.err.startswith("Error: the connection to QEMU was lost")
    assert len(run.err.splitlines()) == 1
    assert "Traceback" not in run.err


# ----------------------------------------------------------------------
# Connecting.

def test_connection_failures(shell: Callable[..., Run],
                             tmp_path: Path) -> None:
    """No socket: one line and status 3; bad usage: argparse's 2."""
    run = shell([str(tmp_path / "nothing")], "query-status")
    assert run.status == cli.EXIT_CONNECTION
    assert run.err.startswith(f"Error: cannot connect to {tmp_path}")
    with pytest.raises(SystemExit) as exit_info:
        shell(["localhost:http"])
    assert exit_info.value.code == cli.EXIT_USAGE
    with pytest.raises(SystemExit):
        shell([])
    run = shell(["-l", str(tmp_path / "no" / "log"), "x"])
    assert run.status == cli.EXIT_USAGE
    assert "cannot open the log file" in run.err


def test_a_silent_server_times_out(shell: Callable[..., Run],
                                   tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that never greets (a monitor another client holds) gets
    a clear error instead of a hang."""
    monkeypatch.setattr(cli, "CONNECT_TIMEOUT", 0.3)
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        run = shell([path], "query-status")
    assert run.status == cli.EXIT_CONNECTION
    assert "sent no greeting within 0.3 s" in run.err


def test_ipv6_address(shell: Callable[..., Run],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``[::1]:PORT`` is an IPv6 address (QEMU's shell takes it for a
    path): the shell connects there over TCP."""
    monkeypatch.setattr(cli, "CONNECT_TIMEOUT", 0.3)
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError as err:
        listener.close()
        pytest.skip(f"no IPv6 loopback here: {err}")
    with listener:
        listener.listen(1)
        port = listener.getsockname()[1]
        run = shell([f"[::1]:{port}"], "query-status")
    assert "sent no greeting" in run.err


# ----------------------------------------------------------------------
# qmp-shell-wrap.

def processes_named(name: str) -> list[int]:
    """The pids of live processes whose command line has `name`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and name.encode() in (
                    entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass  # it ended meanwhile
    return found


@pytest.mark.qemu
def test_wrap_runs_the_shell_and_leaves_no_qemu(
        shell: Callable[..., Run], tmp_path: Path) -> None:
    """qmp-shell-wrap starts QEMU on a private monitor, runs the script,
    then has QEMU quit and reaps it."""
    name = f"wrapped-{tmp_path.name}"
    run = shell(["--", qemu_binary(), *QEMU_ARGS, "-name", name],
                "query-name", entry=wrap_main)
    assert run.status == 0, run.err
    # This shell may be in time to see QEMU's start-up RESUME.
    assert [m for m in run.messages if m.get("event") != "RESUME"] == [
        {"return": {"name": name}}]
    assert run.err == ""
    assert processes_named(name) == []


@pytest.mark.qemu
def test_wrap_reports_a_qemu_that_fails_to_start(
        shell: Callable[..., Run]) -> None:
    """A QEMU command line that QEMU refuses, or a missing binary: one
    line and status 3."""
    run = shell(["--", qemu_binary(), *QEMU_ARGS, "-no-such-option"],
                "query-status", entry=wrap_main)
    assert run.status == cli.EXIT_CONNECTION
    assert "QEMU exited (status 1) before its monitor answered" in run.err
    run = shell(["--", "/nonexistent/qemu"], entry=wrap_main)
    assert run.status == cli.EXIT_CONNECTION
    assert run.err.startswith("Error: cannot run /nonexistent/qemu")
    with pytest.raises(SystemExit):
        shell([], entry=wrap_main)


# ----------------------------------------------------------------------
# Completion, checks and help from QEMU's own schema.

@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Schema]:
    """QEMU's schema, as the shell reads it."""
    with QEMUMachine(qemu_binary(), args=QEMU_ARGS, base_temp_dir=str(
            tmp_path_factory.mktemp("schema"))) as vm:
        vm.launch()
        commands = vm.cmd("query-commands")
        entities = vm.cmd("query-qmp-schema")
    assert isinstance(commands, list) and isinstance(entities, list)
    yield Schema([c["name"] for c in commands], entities)


@pytest.mark.parametrize("before, word, expected", [
    ("", "query-statu", ["query-status "]),
    ("", "transac", ["transaction ", "transaction( "]),
    ("help ", "query-statu", ["query-status "]),
    ("help query-status ", "", []),
    ("human-monitor-command ", "", ["command-line=", "cpu-index="]),
    ("human-monitor-command command-line=x ", "", ["cpu-index="]),
    ("blockdev-add ", "driver=qco", ["driver=qcow ", "driver=qcow2 "]),
    ("blockdev-add ", "read-only=t", ["read-only=true "]),
    ("blockdev-add driver=qcow2 ", "backing", ["backing=", "backing."]),
    ("blockdev-add ", "backing", []),
    ("blockdev-add driver=raw ", "file.dri", ["file.driver="]),
    ("blockdev-add driver=raw file.driver=file ", "file.file",
     ["file.filename="]),
    ("transaction( ", "block-dirty-bitmap-ad",
     ["block-dirty-bitmap-add "]),
    ("transaction( block-dirty-bitmap-add ", "na", ["name="]),
    ("blockdev-add driver=raw ", "file.driver=null-", [
        "file.driver=null-aio ", "file.driver=null-co "]),
    ("blockdev-add driver=raw file.driver=null-co ", "file.read-only=f",
     ["file.read-only=false "]),
    ("blockdev-add ", "file.nosuch=", []),
    ("qom-get path=", '"x', []),
    ("qom-get path='/a ", "", []),
])
def test_qmp_completion(schema: Schema, before: str, word: str,
                        expected: list[str]) -> None:
    """Tab offers command names, argument names of the command being
    typed (the variant its tag selects, nested objects), and values."""
    assert complete_qmp(schema, before, word) == expected


def test_completion_inside_a_transaction(schema: Schema) -> None:
    """On a TRANS> line, action types, their arguments, and ``)``."""
    assert complete_qmp(schema, "", "ab", in_transaction=True) == ["abort "]
    assert complete_qmp(schema, "", ")", in_transaction=True) == [") "]
    assert "node=" in complete_qmp(schema, "block-dirty-bitmap-clear ", "",
                                   in_transaction=True)


@pytest.mark.parametrize("name, arguments, problem", [
    ("query-status", {}, None),
    ("device_add", {"driver": "e1000", "mac": "52:54:00:12:34:56"}, None),
    ("blockdev-add", {"driver": "qcow2", "backing": None}, None),
    ("qom-list", {"pth": "/"},
     "qom-list has no argument 'pth' (did you mean 'path'?)"),
    ("qom-list", {"zzz": "/"},
     "qom-list has no argument 'zzz'; 'help qom-list' lists them"),
    ("xyzzy", {}, "unknown command 'xyzzy'; 'help' lists them"),
    ("transaction", {"actions": [{"type": "abort", "data": {"x": 1}}]},
     "action abort takes no arguments, not 'x'"),
    # Nested objects are checked too, a union's variants leniently.
    ("blockdev-add", {"driver": "raw", "node-name": "n",
                      "file": {"driver": "null-co", "size": 4096}}, None),
    ("blockdev-add", {"driver": "raw", "file": {"drivr": "null-co"}},
     "blockdev-add has no argument 'file.drivr' (did you mean "
     "'file.driver'?)"),
    ("blockdev-add", {"driver": "qcow2", "file": {
        "driver": "raw", "file": {"driver": "file", "filname": "x"}}},
     "blockdev-add has no argument 'file.file.filname' (did you mean "
     "'file.file.filename'?)"),
    ("blockdev-add", {"driver": "qcow2", "file": "node0"}, None),
    ("qom-set", {"path": "/", "property": "p", "value": {"any": 1}}, None),
    ("transaction", {"actions": [], "properties": {"completion-mod": "x"}},
     "transaction has no argument 'properties.completion-mod' (did you "
     "mean 'properties.completion-mode'?)"),
])
def test_checks_before_sending(schema: Schema, name: str,
                               arguments: dict[str, object],
                               problem: str | None) -> None:
    """Misspelt names are caught; what the server takes passes (device
    properties included, which the schema does not list)."""
    assert schema.check(name, arguments) == problem


def test_help_lines(schema: Schema) -> None:
    """`help CMD` shows each argument, optional or not, with its type;
    for a union, what each tag value adds."""
    assert schema.describe("human-monitor-command") == [
        "  command-line  required  str",
        "  cpu-index     optional  int"]
    assert schema.describe("stop") == ["  (no arguments)"]
    lines = schema.describe("blockdev-add")
    assert lines[0].startswith("  driver ")
    assert "required  enum (blkdebug, blklogwrites," in lines[0]
    qcow2 = next(x for x in lines if x.startswith("  with driver=qcow2: "))
    assert "backing" in qcow2.split(": ")[1].split(", ")


def test_hmp_completion(qemu: QEMU) -> None:
    """In -H mode, tab offers the human monitor's commands and the
    topics of ``info``, read from its own help."""
    with QMPSyncClient(qemu.path) as client:
        client.connect()
        texts = [client.execute("human-monitor-command",
                                {"command-line": line})
                 for line in ("help", "info")]
    commands = HumanCommands(*texts)  # type: ignore[arg-type]
    assert complete_hmp(commands, "", "inf") == ["info "]
    assert complete_hmp(commands, "info ", "statu") == ["status "]
    assert "quit " in complete_hmp(commands, "", "q")
    assert complete_hmp(commands, "info status ", "") == []
