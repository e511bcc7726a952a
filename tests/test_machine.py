"""
`qmp_sync.machine.QEMUMachine` against real QEMU: launch and shutdown
in every way, failures at launch, an iotests-style block job, and a
script written for QEMU's own ``QEMUMachine`` run unchanged through
``qmp_sync.compat``.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from peers import blocked_in_call, pid_exists, poll_until, qemu_binary

from qmp_sync import ExecInterruptedError, ExecuteError
from qmp_sync.machine import (
    AbnormalShutdown,
    QEMUMachine,
    QEMUMachineError,
    VMLaunchFailure,
)

pytestmark = pytest.mark.qemu

BOUND = 10.0
GUESTLESS = ("-machine", "none", "-nodefaults")


def machine(tmp_path: Path, *args: str) -> QEMUMachine:
    return QEMUMachine(qemu_binary(), args=[*GUESTLESS, *args],
                       base_temp_dir=str(tmp_path))


def test_launch_query_and_graceful_shutdown(tmp_path: Path) -> None:
    """launch() connects the monitor; qmp() returns the whole reply,
    cmd() the value; shutdown() quits QEMU (status 0), reaps it, and
    removes its temporary directory; the log stays readable."""
    vm = machine(tmp_path)
    vm.launch()
    pid = vm.get_pid()
    assert pid is not None and vm.is_running()
    temp_dir = vm.temp_dir
    assert os.path.isdir(temp_dir)
    assert vm.qmp("query-status")["return"]["running"] is True
    assert vm.cmd("query-status")["status"] == "running"  # type: ignore
    with pytest.raises(ExecuteError) as info:
        vm.cmd("no-such-command")
    assert info.value.error_class == "CommandNotFound"
    reply = vm.qmp("no-such-command")
    assert reply["error"]["class"] == "CommandNotFound"
    vm.shutdown()
    assert vm.exitcode() == 0
    assert not vm.is_running() and vm.get_pid() is None
    assert not pid_exists(pid)
    assert not os.path.exists(temp_dir)
    assert vm.get_log() is not None
    vm.shutdown()  # again: nothing to do


def test_hard_shutdown_and_context_manager(tmp_path: Path) -> None:
    """kill() stops QEMU with SIGTERM and raises nothing; leaving the
    with block shuts down too; six launches leave no process and no
    file."""
    pids = []
    for _ in range(5):
        with machine(tmp_path) as vm:
            vm.launch()
            pids.append(vm.get_pid())
        assert vm.exitcode() == 0
    vm = machine(tmp_path)
    vm.launch()
    pids.append(vm.get_pid())
    vm.kill()
    # QEMU handles SIGTERM: it says so and exits 0.
    assert vm.exitcode() == 0
    assert "terminating on signal 15" in (vm.get_log() or "")
    assert all(pid is not None and not pid_exists(pid) for pid in pids)
    assert list(tmp_path.iterdir()) == []


def test_qemu_killed_from_outside(tmp_path: Path) -> None:
    """After an external SIGKILL, a waiting event_wait fails, and
    shutdown() reaps QEMU and raises AbnormalShutdown naming the
    status."""
    vm = machine(tmp_path)
    vm.launch()
    pid = vm.get_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(AbnormalShutdown, match="-9"):
        vm.shutdown()
    assert vm.exitcode() == -signal.SIGKILL
    assert not pid_exists(pid)


def test_refused_argument_is_a_launch_failure(tmp_path: Path) -> None:
    """An argument QEMU refuses is a VMLaunchFailure from launch(),
    carrying the exit status and what QEMU said; nothing is left."""
    vm = machine(tmp_path, "-no-such-option")
    with pytest.raises(VMLaunchFailure) as info:
        vm.launch()
    assert info.value.exitcode == 1
    assert "no-such-option" in info.value.output
    assert "no-such-option" in str(info.value)
    assert not vm.is_running()
    assert list(tmp_path.iterdir()) == []


def test_missing_binary_is_a_launch_failure(tmp_path: Path) -> None:
    vm = QEMUMachine(str(tmp_path / "no-qemu"), base_temp_dir=str(tmp_path))
    with pytest.raises(VMLaunchFailure) as info:
        vm.launch()
    assert info.value.exitcode is None


def test_iotests_style_block_job(tmp_path: Path) -> None:
    """A mirror job between two null-co nodes, waited for with
    event_wait(match=...), as iotests do; events for other jobs stay
    queued."""
    with machine(tmp_path) as vm:
        vm.launch()
        for node in ("src", "tgt"):
            vm.cmd("blockdev-add", driver="null-co", node_name=node,
                   size=1 << 20)
        vm.cmd("blockdev-mirror", job_id="job0", device="src",
               target="tgt", sync="full")
        ready = vm.event_wait("BLOCK_JOB_READY",
                              match={"data": {"device": "job0"}},
                              timeout=BOUND)
        assert ready is not None and ready["data"]["device"] == "job0"
        vm.cmd("block-job-complete", device="job0")
        done = vm.event_wait("BLOCK_JOB_COMPLETED",
                             match={"data": {"device": "job0"}},
                             timeout=BOUND)
        assert done is not None and "error" not in done["data"]
        assert vm.event_wait("NEVER", timeout=0) is None
        names = {event["event"] for event in vm.get_qmp_events()}
        assert "JOB_STATUS_CHANGE" in names


# Written for QEMU's in-tree qemu.machine.QEMUMachine (and qemu.qmp), as
# an iotest would use it; nothing of qmp_sync is named.
MACHINE_SCRIPT = '''
import sys

from qemu.machine import QEMUMachine
from qemu.qmp import ExecuteError

vm = QEMUMachine(sys.argv[1], base_temp_dir=sys.argv[2])
vm.add_args("-machine", "none", "-nodefaults")
vm.launch()
result = vm.qmp("query-status")
assert result["return"]["running"] is True, result
vm.qmp("stop")
event = vm.event_wait("STOP", timeout=10)
assert event is not None and event["event"] == "STOP", event
vm.cmd("cont")
try:
    vm.cmd("no-such-command")
except ExecuteError:
    pass
else:
    raise AssertionError("no ExecuteError")
vm.shutdown()
assert vm.exitcode() == 0, vm.exitcode()
print("MACHINE OK")
'''


def test_script_for_qemus_machine_runs_through_compat(tmp_path: Path) -> None:
    """A script written against QEMU's QEMUMachine API runs unchanged
    with ``python -m qmp_sync.compat`` (no QEMU tree here, so
    qmp_sync.machine stands in for qemu.machine)."""
    script = tmp_path / "iotest_like.py"
    script.write_text(MACHINE_SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    child = subprocess.run(
        [sys.executable, "-m", "qmp_sync.compat", str(script),
         qemu_binary(), str(work)],
        capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["MACHINE", "OK"]
    assert list(work.iterdir()) == []


def test_ctrl_c_during_launch_leaves_no_qemu(tmp_path: Path) -> None:
    """Ctrl-C while launch() waits for the monitor (QEMU held back by a
    wrapper) ends the program with KeyboardInterrupt and leaves neither
    the wrapper nor QEMU running."""
    child = subprocess.Popen(
        [sys.executable, "-c", f'''
import signal
from qmp_sync.machine import QEMUMachine
signal.signal(signal.SIGINT, signal.default_int_handler)
vm = QEMUMachine({qemu_binary()!r}, args=["-machine", "none"],
                 wrapper=["sh", "-c", 'sleep 30; exec "$@"', "sh"],
                 base_temp_dir={str(tmp_path)!r})
vm.launch()
'''], stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{child.pid}/task/{child.pid}/children")
    launched: list[int] = []

    def started() -> bool:
        launched[:] = [int(pid) for pid in children.read_text().split()]
        return bool(launched)

    assert poll_until(started), "the child never started its QEMU"
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=BOUND * 2)
    assert "KeyboardInterrupt" in stderr
    # The wrapper, and its own child (sleep) with its process group, are
    # gone once the kernel has reaped them (polled, bounded).
    def group() -> str:
        return subprocess.run(["pgrep", "-g", str(launched[0])],
                              capture_output=True, text=True,
                              check=False).stdout

    poll_until(lambda: not group()
               and all(not pid_exists(pid) for pid in launched))
    assert group() == "", group()
    assert all(not pid_exists(pid) for pid in launched)
    assert list(tmp_path.iterdir()) == []


def open_fds() -> set[str]:
    """This process's open file descriptors."""
    return set(os.listdir("/proc/self/fd"))


def test_twenty_launches_leave_nothing(tmp_path: Path) -> None:
    """Twenty launches, shut down in turn gracefully, hard, after quit
    and after an external SIGKILL, leave no process, no open file
    descriptor, no socket and no temporary file."""
    fds = open_fds()
    pids = []
    for round_ in range(20):
        vm = machine(tmp_path)
        vm.launch()
        pid = vm.get_pid()
        assert pid is not None
        pids.append(pid)
        way = round_ % 4
        if way == 0:
            vm.shutdown()
        elif way == 1:
            vm.shutdown(hard=True)
        elif way == 2:
            assert vm.cmd("quit") == {}
            vm.shutdown()  # QEMU quit by itself: only reaped here
            assert vm.exitcode() == 0
        else:
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(AbnormalShutdown):
                vm.shutdown()
        assert not vm.is_running()
    assert not [pid for pid in pids if pid_exists(pid)]
    assert list(tmp_path.iterdir()) == []
    assert open_fds() <= fds


def fdsets(vm: QEMUMachine) -> dict[int, list[str]]:
    """QEMU's fdsets: id -> the opaque strings of their fds."""
    return {fdset["fdset-id"]: [fd.get("opaque", "") for fd in fdset["fds"]]
            for fdset in vm.cmd("query-fdsets")}  # type: ignore[union-attr]


def test_fds_passed_at_launch_and_later_land_in_qemu(tmp_path: Path
                                                     ) -> None:
    """add_fd() hands a file to QEMU at launch, in its fdset;
    send_fd_scm() passes one (or a file by name) to a running QEMU for
    add-fd and getfd."""
    data = tmp_path / "data"
    data.write_bytes(b"x" * 512)
    with open(data, "rb") as at_launch, open(data, "rb") as later:
        vm = machine(tmp_path)
        vm.add_fd(at_launch.fileno(), 1, "at-launch", "")
        vm.launch()
        try:
            assert fdsets(vm) == {1: ["at-launch"]}
            vm.send_fd_scm(later.fileno())
            vm.cmd("add-fd", fdset_id=2, opaque="later")
            assert fdsets(vm) == {1: ["at-launch"], 2: ["later"]}
            vm.send_fd_scm(file_path=str(data))
            vm.cmd("getfd", fdname="by-name")
            vm.cmd("closefd", fdname="by-name")  # it was there
            with pytest.raises(ExecuteError):
                vm.cmd("closefd", fdname="by-name")
            with pytest.raises(ValueError):
                vm.send_fd_scm()
        finally:
            vm.shutdown()


def test_console_socket(tmp_path: Path) -> None:
    """set_console() gives QEMU a serial console on a socket in the
    temporary directory; console_socket connects to it (QEMU reports the
    chardev connected) and is closed at shutdown."""
    vm = machine(tmp_path)
    with pytest.raises(QEMUMachineError):
        vm.console_socket  # noqa: B018 (a property that raises)
    vm.set_console()
    vm.launch()
    try:
        def console() -> str:
            chardevs = vm.cmd("query-chardev")
            assert isinstance(chardevs, list)
            return next(chardev["filename"] for chardev in chardevs
                        if chardev["label"] == "console")

        assert console().startswith("disconnected:unix:")
        sock = vm.console_socket
        assert vm.console_socket is sock
        poll_until(lambda: not console().startswith("disconnected:"))
        assert console().startswith("unix:"), console()
    finally:
        vm.shutdown()
    assert sock.fileno() == -1


@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_monitor_address_qemu_connects_to_us(tmp_path: Path, family: str
                                             ) -> None:
    """With monitor_address the machine listens and QEMU connects to it
    (QEMU's own QEMUMachine does the same); the socket file goes at
    shutdown."""
    if family == "unix":
        address: str | tuple[str, int] = str(tmp_path / "monitor.sock")
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            address = probe.getsockname()
    base = tmp_path / "base"
    base.mkdir()
    vm = QEMUMachine(qemu_binary(), args=GUESTLESS, base_temp_dir=str(base),
                     monitor_address=address)
    vm.launch()
    assert vm.cmd("query-status")["status"] == "running"  # type: ignore
    vm.shutdown()
    assert vm.exitcode() == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base"]


def test_qemu_dying_under_a_command_names_its_exit_status(
        tmp_path: Path, pool: concurrent.futures.ThreadPoolExecutor
        ) -> None:
    """A QEMU that dies while a command waits for its reply: the command
    ends with ExecInterruptedError naming QEMU's exit status."""
    vm = machine(tmp_path)
    vm.launch()
    pid = vm.get_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # it reads nothing: the command waits
    try:
        waiting = pool.submit(vm.cmd, "query-status")
        blocked_in_call(waiting)  # type: ignore[arg-type]
    finally:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(ExecInterruptedError, match="exit status -9"):
        waiting.result(BOUND)
    with pytest.raises(AbnormalShutdown):
        vm.shutdown()


def test_ctrl_c_during_shutdown_leaves_no_qemu(tmp_path: Path) -> None:
    """Ctrl-C while shutdown() waits for a QEMU that does not quit (it
    is stopped) ends the program with KeyboardInterrupt, and QEMU is
    killed and reaped all the same."""
    child = subprocess.Popen(
        [sys.executable, "-c", f'''
import os, signal, sys
from qmp_sync.machine import QEMUMachine
signal.signal(signal.SIGINT, signal.default_int_handler)
vm = QEMUMachine({qemu_binary()!r}, args=["-machine", "none"],
                 base_temp_dir={str(tmp_path)!r})
vm.launch()
os.kill(vm.get_pid(), signal.SIGSTOP)
print(vm.get_pid(), flush=True)
vm.shutdown()
'''], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    pid = int(child.stdout.readline())  # bounded by pytest-timeout
    blocked = Path(f"/proc/{child.pid}/wchan")
    # Until it sleeps in shutdown().
    poll_until(lambda: blocked.read_text() not in ("", "0"))
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=BOUND * 2)
    assert "KeyboardInterrupt" in stderr
    assert not pid_exists(pid)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["dropped", "left at exit"])
def test_machine_never_shut_down_leaves_no_qemu(tmp_path: Path, how: str
                                               ) -> None:
    """A machine dropped, or still running when the program exits,
    without shutdown(): its QEMU (in a session of its own, so it would
    outlive the program) is killed and reaped, its temporary directory
    removed, and a ResourceWarning says so."""
    ending = "del vm; gc.collect(); print('COLLECTED')" \
        if how == "dropped" else ""
    child = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", "-c", f'''
import gc
from qmp_sync.machine import QEMUMachine
vm = QEMUMachine({qemu_binary()!r}, args=["-machine", "none"],
                 base_temp_dir={str(tmp_path)!r})
vm.launch()
print(vm.get_pid(), flush=True)
{ending}
'''], capture_output=True, text=True, timeout=BOUND * 3, check=False)
    assert child.returncode == 0, child.stderr
    pid = int(child.stdout.split()[0])
    assert not pid_exists(pid)
    assert list(tmp_path.iterdir()) == []
    assert child.stderr.count("was not shut down: its QEMU") == 1, \
        child.stderr


# A stand-in for QEMU 7.2's rare start-up race, which QEMU will not
# produce on demand: the first RACES starts greet twice and never answer
# the negotiation (as QEMU does then); later ones serve a session.
FAKE_QEMU = '''#!{python}
import os, re, signal, sys
from qmp_sync.fake_server import FakeConnection
import socket

count_file = {count_file!r}
starts = int(open(count_file).read()) + 1 if os.path.exists(count_file) else 1
with open(count_file, "w") as out:
    out.write(str(starts))
fd = int(re.search(r"fd=(\\d+)", " ".join(sys.argv)).group(1))
monitor = FakeConnection(socket.socket(fileno=fd), timeout=None)
if starts <= {races}:
    monitor.greet()
    monitor.greet()
    signal.pause()  # until the machine kills it
monitor.handshake()
while True:
    command = monitor.answer({{"status": "running"}})
    if command["execute"] == "quit":
        sys.exit(0)
'''


@pytest.mark.parametrize("races", [1, 3])
def test_start_up_race_is_launched_again(
        tmp_path: Path, races: int, caplog: pytest.LogCaptureFixture
        ) -> None:
    """A QEMU whose monitor greets twice at start-up is killed and
    launched again (logged), at most three times in all; then launch()
    gives up with a VMLaunchFailure that says why."""
    count_file = tmp_path / "starts"
    binary = tmp_path / "fake-qemu"
    binary.write_text(FAKE_QEMU.format(python=sys.executable, races=races,
                                       count_file=str(count_file)))
    binary.chmod(0o755)
    base = tmp_path / "base"
    base.mkdir()
    vm = QEMUMachine(str(binary), base_temp_dir=str(base))
    if races < 3:
        vm.launch()
        assert vm.cmd("query-status") == {"status": "running"}
        vm.shutdown()
        assert vm.exitcode() == 0
        assert count_file.read_text() == str(races + 1)
    else:
        with pytest.raises(VMLaunchFailure, match="failed 3 starts"):
            vm.launch()
        assert count_file.read_text() == "3"
        assert not vm.is_running()
    launched_again = [record for record in caplog.records
                      if "launching it again" in record.getMessage()]
    assert len(launched_again) == min(races, 2)
    assert list(base.iterdir()) == []
