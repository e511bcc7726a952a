"""
Test rig: async tests, a thread-leak check, and the QEMUs and peers the
tests use. Nothing here is imported by the tests (helpers live in
``peers.py``).

- ``async def`` tests run in a fresh event loop, each bounded by
  ``ASYNC_TEST_TIMEOUT`` on top of pytest-timeout's global limit.
- Every test must leave no thread behind, except the shared loop
  thread of the blocking client, which lives as long as the process
  (and there is only ever one).
- The QEMUs are launched by qmp_sync's own pytest plugin (the
  ``qemu_machine`` fixture of ``qmp_sync.testing``): the machine's
  monitor is a socketpair, and the tests' own clients connect to further
  monitors on unix sockets (``QEMU.paths``), which exist, and have
  missed QEMU's start-up ``RESUME``, by the time ``launch()`` returns.
  Tests using them carry the ``qemu`` marker; ``setup.cfg`` makes a
  missing QEMU a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from peers import QEMU, AsyncPeer, GuestAgent, monitor_args

from qmp_sync.fake_server import FakeConnection
from qmp_sync.machine import QEMUMachine

ASYNC_TEST_TIMEOUT = 30.0
#: Fixtures that need a QEMU (or its guest agent) besides the plugin's
#: (``schema`` is test_shell.py's, module-scoped).
QEMU_FIXTURES = ("qemu", "qemu2", "qemu_ga", "schema")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that use our QEMU fixtures with ``qemu`` (the
    plugin marks those that use ``qemu_machine`` directly)."""
    for item in items:
        if set(QEMU_FIXTURES) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.qemu)


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
            await AsyncPeer.close_all()

    asyncio.run(bounded())
    return True


LOOP_THREAD_NAME = "qmp_sync loop"


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


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    """Threads for blocking calls made while the test acts elsewhere."""
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        yield executor


@pytest.fixture
def peer() -> Iterator[FakeConnection]:
    """A scripted fake QMP server for the blocking clients; hung up
    after the test."""
    fake = FakeConnection.socketpair()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def qemu(qemu_machine: Callable[..., QEMUMachine], tmp_path: Path) -> QEMU:
    """A launched guest-less QEMU with one more QMP monitor, on a unix
    socket (``path``), for the test's own clients."""
    args, paths = monitor_args(tmp_path, 1)
    return QEMU(qemu_machine(*args), paths)


@pytest.fixture
def qemu2(qemu_machine: Callable[..., QEMUMachine], tmp_path: Path) -> QEMU:
    """As ``qemu``, with two monitors (``paths``)."""
    args, paths = monitor_args(tmp_path, 2)
    return QEMU(qemu_machine(*args), paths)


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
