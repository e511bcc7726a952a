"""
Test rig: async tests, a thread-leak check, and real QEMU.

- ``async def`` tests run in a fresh event loop, each bounded by
  ``ASYNC_TEST_TIMEOUT`` on top of pytest-timeout's global limit.
- Every test must leave no thread behind, except the shared loop
  thread of the blocking client, which lives as long as the process
  (and there is only ever one).
- The ``qemu`` fixture starts a guest-less ``qemu-system-x86_64`` whose
  QMP monitor listens on a unix socket the fixture created and bound
  itself, so it accepts connections from the first instant, and kills
  it by pid at teardown. Before the test gets it, the fixture waits on
  that socket until QEMU reports "running": QEMU announces its own start
  with a RESUME event, and a test connecting earlier would receive it
  (sometimes before the greeting) and count an event it did not cause.
  A QEMU that garbles that first connection (a start-up race in QEMU)
  is restarted (see ``start_qemu_monitors``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import BlockingPeer, FakeQMP
from typing_extensions import Self

ASYNC_TEST_TIMEOUT = 30.0
STARTUP_TIMEOUT = 10.0  # QEMU answers in well under a second
STARTUP_ATTEMPTS = 3
STARTUP_RACES: list[str] = []  # QEMU restarts, reported at the end
QEMU_BINARY = "qemu-system-x86_64"
QEMU_ARGS = ("-machine", "none", "-nodefaults", "-display", "none")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests with asyncio.run, under a deadline."""
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}

    async def bounded() -> None:
        try:
            await asyncio.wait_for(func(**kwargs), ASYNC_TEST_TIMEOUT)
        finally:
            await FakeQMP.close_all()

    asyncio.run(bounded())
    return True


LOOP_THREAD_NAME = "qmp_sync loop"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """List the QEMU starts that hit the start-up race, and were
    started again."""
    if STARTUP_RACES:
        terminalreporter.section("QEMU start-up races (QEMU restarted)")
        for race in STARTUP_RACES:
            terminalreporter.write_line(race)


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    """Fail a test that leaves a thread running (the one shared loop
    thread excepted), or that made a second loop thread."""
    before = set(threading.enumerate())
    yield
    loop_threads = [t for t in threading.enumerate()
                    if t.name == LOOP_THREAD_NAME and t.is_alive()]
    assert len(loop_threads) <= 1, loop_threads
    leaked = [t for t in threading.enumerate()
              if t not in before and t.is_alive()
              and t.name != LOOP_THREAD_NAME]
    for thread in leaked:
        thread.join(timeout=2.0)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


def qemu_binary() -> str:
    """The QEMU binary; its absence fails the test (never a skip)."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        pytest.fail(f"{QEMU_BINARY} is not installed: the README's test "
                    "command (tools/test.sh) installs it with apt-get")
    return path


class QEMU:
    """A running guest-less QEMU process and the QMP socket path; as a
    context manager, killed when the block is left."""

    def __init__(self, proc: subprocess.Popen[bytes], path: str):
        self.proc = proc
        self.path = path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def kill(self) -> None:
        """SIGKILL the process (by pid) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_qemu(*extra: str, pass_fds: tuple[int, ...] = ()
               ) -> subprocess.Popen[bytes]:
    """Start a guest-less QEMU with `extra` arguments."""
    return subprocess.Popen(
        [qemu_binary(), *QEMU_ARGS, *extra], pass_fds=pass_fds,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


class MultiQEMU(QEMU):
    """A guest-less QEMU with several QMP monitors (`paths`), each on a
    unix socket of its own; events go to every monitor."""

    def __init__(self, proc: subprocess.Popen[bytes], paths: list[str]):
        super().__init__(proc, paths[0])
        self.paths = paths


def start_qemu_monitors(directory: Path, count: int) -> MultiQEMU:
    """
    Start a guest-less QEMU with `count` QMP monitors listening on unix
    sockets in `directory`, and return it once it reports "running".

    The sockets are bound here and handed over as fds, so the probe
    may connect while QEMU is still setting its monitor up. QEMU 7.2
    then, rarely, greets that connection twice (the second greeting
    resets the monitor, and the probe's qmp_capabilities may be lost,
    so no answer ever comes): seen 3 times in some 90 runs of this suite,
    never in 2,000 starts outside it. Such a QEMU is killed and started
    afresh, at most STARTUP_ATTEMPTS times; each restart is listed at
    the end of the test run.
    """
    failures = []
    for _ in range(STARTUP_ATTEMPTS):
        instance = launch_qemu_monitors(directory, count)
        try:
            wait_until_running(instance.paths[0])
            return instance
        except StartupRace as race:
            failures.append(f"pid {instance.proc.pid}: {race}; its "
                            f"threads: {thread_states(instance.proc.pid)}")
            STARTUP_RACES.append(failures[-1])
            instance.kill()
        except BaseException:
            instance.kill()
            raise
    pytest.fail("QEMU garbled every start: " + "; ".join(failures))


def launch_qemu_monitors(directory: Path, count: int) -> MultiQEMU:
    """Start (without waiting) a guest-less QEMU with `count` QMP
    monitors on unix sockets in `directory`, bound here so that they
    accept connections from the first instant."""
    listeners, args, paths = [], [], []
    try:
        for index in range(count):
            path = directory / f"qmp{index}.sock"
            path.unlink(missing_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listeners.append(listener)
            listener.bind(str(path))
            listener.listen(4)
            paths.append(str(path))
            args += ["-chardev", f"socket,id=qmp{index},"
                     f"fd={listener.fileno()},server=on,wait=off",
                     "-mon", f"chardev=qmp{index},mode=control"]
        proc = start_qemu(*args, pass_fds=tuple(
            listener.fileno() for listener in listeners))
    finally:
        for listener in listeners:
            listener.close()
    return MultiQEMU(proc, paths)


class StartupRace(Exception):
    """QEMU's monitor greeted the probe twice, or did not answer within
    STARTUP_TIMEOUT."""


def wait_until_running(path: str) -> None:
    """
    Connect to the QMP monitor at `path` with a plain socket, wait until
    query-status says "running", and hang up (the monitor then takes
    the next client). QEMU sends its start-up RESUME before it sets that
    status, so a client connecting afterwards never sees that event.

    Raises StartupRace if QEMU greets twice or does not answer within
    STARTUP_TIMEOUT.
    """
    received: list[object] = []

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, \
            sock.makefile("rb") as lines:
        sock.settimeout(STARTUP_TIMEOUT)

        def answer(key: str) -> Any:
            while True:  # events (that start-up RESUME) are skipped
                try:
                    line = lines.readline()
                except TimeoutError:
                    raise StartupRace(f"no answer; it sent {received}"
                                      ) from None
                if not line:
                    pytest.fail(f"QEMU hung up while starting: {path}")
                message = json.loads(line)
                received.append(message)
                if key in message:
                    return message[key]
                if "QMP" in message:
                    raise StartupRace(f"it greeted twice: {received}")
                if "event" not in message:
                    pytest.fail(f"QEMU answered {message} while starting")

        sock.connect(path)
        answer("QMP")
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        answer("return")
        for _ in range(100):  # a few at most: QEMU answers once started
            sock.sendall(b'{"execute": "query-status"}\n')
            status = answer("return")["status"]
            if status == "running":
                return
    pytest.fail(f"QEMU stayed {status!r} instead of 'running'")


def thread_states(pid: int) -> list[str]:
    """Name, state and wait channel of each thread of process `pid`."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = dict(line.split(":\t", 1) for line in
                      (task / "status").read_text().splitlines()
                      if ":\t" in line)
        states.append(f"{status['Name']} {status['State']} "
                      f"{(task / 'wchan').read_text()}")
    return states


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """Threads for blocking calls made while the test acts elsewhere."""
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        yield executor


@pytest.fixture
def peer() -> Iterator[BlockingPeer]:
    """A scripted fake QMP server for the blocking clients; hung up
    after the test."""
    fake = BlockingPeer()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[QEMU]:
    """A guest-less QEMU whose QMP monitor listens on a unix socket."""
    with start_qemu_monitors(tmp_path, 1) as instance:
        yield instance


class GuestAgent(QEMU):
    """A qemu-ga process serving its protocol on the unix socket `path`
    (on the host: its commands answer about this machine)."""


@pytest.fixture
def qemu_ga(tmp_path: Path) -> Iterator[GuestAgent]:
    """
    A guest agent listening on a unix socket bound here, handed over
    by systemd's socket activation protocol (fd 3, LISTEN_FDS,
    LISTEN_PID), so it accepts connections from the first instant.
    """
    binary = shutil.which("qemu-ga", path=f"{os.environ['PATH']}:/usr/sbin")
    if binary is None:
        pytest.fail("qemu-ga is not installed: the README's test command "
                    "(tools/test.sh) installs it with apt-get")
    path = str(tmp_path / "qga.sock")
    state = tmp_path / "qga-state"
    state.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(4)
        # The listener arrives as stdin; the shell moves it to fd 3 and
        # keeps its own pid for qemu-ga, which must match LISTEN_PID.
        proc = subprocess.Popen(
            ["sh", "-c", 'exec 3<&0 </dev/null; LISTEN_PID=$$ LISTEN_FDS=1 '
             'exec "$0" -m unix-listen -p "$1" -t "$2"',
             binary, path, str(state)],
            stdin=listener.fileno(), stdout=subprocess.DEVNULL)
    with GuestAgent(proc, path) as agent:
        yield agent


@pytest.fixture
def qemu2(tmp_path: Path) -> Iterator[MultiQEMU]:
    """A guest-less QEMU with two QMP monitors (``paths``)."""
    with start_qemu_monitors(tmp_path, 2) as instance:
        yield instance

