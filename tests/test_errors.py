"""
Errors as users meet them: each says what happened, to what, and what
to do. Against real QEMU.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from pathlib import Path

import pytest
from peers import QEMU, blocked_in_call

from qmp_sync import (
    ConnectError,
    ExecInterruptedError,
    QMPSyncClient,
    Runstate,
    StateError,
)
from qmp_sync.legacy import QEMUMonitorProtocol
from qmp_sync.qmp_client import GreetingError

BOUND = 10.0


def test_monitor_held_by_another_client(qemu: QEMU) -> None:
    """A second client of a monitor that another client holds is not
    greeted (QEMU serves one at a time): connect() ends after
    greeting_timeout with a ConnectError that says another client
    probably holds the monitor (it used to hang for ever); the first
    client goes on."""
    with QMPSyncClient(qemu.path) as first:
        first.connect(timeout=BOUND)
        second = QMPSyncClient(qemu.path, greeting_timeout=0.5)
        with pytest.raises(ConnectError) as info:
            second.connect(timeout=BOUND)
        assert isinstance(info.value.exc, GreetingError)
        assert "another client probably holds this monitor" in str(
            info.value)
        assert "greeting_timeout" in str(info.value)
        assert second.runstate is Runstate.IDLE
        assert first.execute("query-status")["running"] is True  # type: ignore
    # Once the first has left, the second is greeted.
    second.connect(timeout=BOUND)
    second.close()


def test_greeting_timeout_is_checked() -> None:
    with pytest.raises(ValueError, match="greeting_timeout"):
        QMPSyncClient(greeting_timeout=float("nan"))


def test_connection_errors_name_the_address(tmp_path: Path) -> None:
    """A missing socket names its path; a HOST:PORT string given as a
    path gets a hint with the tuple to pass; a refused TCP connection
    names host and port."""
    missing = str(tmp_path / "nope.sock")
    with pytest.raises(ConnectError) as info:
        QMPSyncClient(missing).connect()
    assert missing in str(info.value)
    assert isinstance(info.value.exc, FileNotFoundError)
    with pytest.raises(ConnectError) as info:
        QMPSyncClient("localhost:4444").connect()
    assert "('localhost', 4444)" in str(info.value)
    assert isinstance(info.value.exc, FileNotFoundError)
    with pytest.raises(ConnectError) as info:
        QMPSyncClient(("127.0.0.1", 1)).connect()
    assert "127.0.0.1" in str(info.value)
    assert isinstance(info.value.exc, ConnectionRefusedError)


def test_calls_after_qemu_died_say_the_connection_was_lost(
        qemu: QEMU, pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """After QEMU is killed: a waiting event_wait and the next execute
    raise StateError (what QEMU's own machine code catches there) that
    names the class called, says the connection to the server was lost
    and why, and chains the cause; close() then returns to IDLE."""
    client = QMPSyncClient(qemu.path)
    client.connect(timeout=BOUND)
    waiting = pool.submit(client.event_wait, "NEVER", BOUND)
    os.kill(qemu.pid, signal.SIGKILL)
    qemu.wait(BOUND)
    with pytest.raises(StateError) as waited:
        waiting.result(BOUND)
    with pytest.raises(StateError) as executed:
        client.execute("query-status")
    for error in (waited.value, executed.value):
        text = str(error)
        assert text.startswith("QMPSyncClient lost its connection to the "
                               "server: the server closed the connection")
        assert "call close()" in text
        assert "QMPClient" not in text
        assert error.__cause__ is not None
    client.close()
    assert client.runstate is Runstate.IDLE
    with pytest.raises(StateError, match="disconnected and idle"):
        client.execute("query-status")


def test_command_in_flight_when_qemu_dies(qemu: QEMU) -> None:
    """The command in flight ends with ExecInterruptedError naming it
    and what ended the session."""
    client = QMPSyncClient(qemu.path)
    client.connect(timeout=BOUND)
    os.kill(qemu.pid, signal.SIGSTOP)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.execute, "query-status", timeout=BOUND)
        blocked_in_call(running)  # type: ignore[arg-type]
        # A barrier: the loop runs this after it has sent the command.
        with client.listen():
            pass
        os.kill(qemu.pid, signal.SIGKILL)
        with pytest.raises(ExecInterruptedError) as info:
            running.result(BOUND)
    assert "'query-status' was interrupted" in str(info.value)
    assert "closed the connection" in str(info.value)
    client.close()


def test_legacy_calls_after_qemu_died(qemu: QEMU) -> None:
    """The legacy class raises the same StateError, which code written
    for qemu.qmp.legacy catches as qemu.qmp's StateError."""
    with QEMUMonitorProtocol(qemu.path) as legacy:
        legacy.connect()
        os.kill(qemu.pid, signal.SIGKILL)
        qemu.wait(BOUND)
        with pytest.raises(StateError, match="lost its connection"):
            legacy.pull_event(wait=BOUND)
        with pytest.raises(StateError, match="lost its connection"):
            legacy.cmd("query-status")
