"""QMPClient against a real, guest-less QEMU: QEMU's own behaviour."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from peers import QEMU, qemu_binary, start_qemu

from qmp_sync import ConnectError, ExecuteError, QMPClient, Runstate

EVENT_TIMEOUT = 10.0


async def connected(qemu: QEMU) -> QMPClient:
    client = QMPClient("qemu")
    await client.connect(qemu.path)
    return client


async def test_greeting_negotiation_and_version(qemu: QEMU) -> None:
    """QEMU greets with its version; 'oob' is offered and negotiated;
    query-version agrees with the binary's --version."""
    client = await connected(qemu)
    greeting = client.greeting
    assert greeting is not None
    version = greeting["QMP"]["version"]  # type: ignore[index]
    assert "oob" in greeting["QMP"]["capabilities"]  # type: ignore[index]
    assert client.oob_enabled
    reply = await client.execute("query-version")
    assert reply == version
    banner = subprocess.run([qemu_binary(), "--version"], check=True,
                            capture_output=True, text=True).stdout
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", banner)
    assert found is not None
    assert tuple(int(n) for n in found.groups()) == (
        version["qemu"]["major"], version["qemu"]["minor"],
        version["qemu"]["micro"])
    await client.disconnect()


async def test_query_status_stop_cont_events(qemu: QEMU) -> None:
    """stop/cont change query-status and emit STOP/RESUME events with
    timestamps, seen by the default and by named listeners."""
    client = await connected(qemu)
    assert (await client.execute("query-status"))["running"] is True  # type: ignore[index]
    with client.listener(("STOP", "RESUME")) as listener:
        assert await client.execute("stop") == {}
        status = await client.execute("query-status")
        assert status["status"] == "paused"  # type: ignore[index]
        assert await client.execute("cont") == {}
        stop = await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
        resume = await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
    assert (stop["event"], resume["event"]) == ("STOP", "RESUME")
    assert set(stop["timestamp"]) == {"seconds", "microseconds"}  # type: ignore[arg-type]
    assert [e["event"] for e in client.events.clear()] == ["STOP", "RESUME"]
    await client.disconnect()


async def test_error_reply(qemu: QEMU) -> None:
    """QEMU's error replies become ExecuteError with class and desc; the
    session goes on."""
    client = await connected(qemu)
    with pytest.raises(ExecuteError) as info:
        await client.execute("no-such-command")
    assert info.value.error_class == "CommandNotFound"
    assert str(info.value) == "The command no-such-command has not been found"
    with pytest.raises(ExecuteError) as info:
        await client.execute("query-status", {"bogus": 1})
    assert info.value.error_class == "GenericError"
    assert "bogus" in str(info.value)
    assert await client.execute("query-name") == {}
    await client.disconnect()


async def test_query_qmp_schema_large_reply(qemu: QEMU) -> None:
    """query-qmp-schema, a reply of a few hundred KiB, arrives whole."""
    client = await connected(qemu)
    schema = await client.execute("query-qmp-schema")
    assert isinstance(schema, list)
    assert len(json.dumps(schema)) > 150_000
    commands = {e["name"] for e in schema if e["meta-type"] == "command"}
    assert {"query-status", "stop", "cont", "getfd"} <= commands
    await client.disconnect()


async def test_concurrent_commands_reach_their_callers(qemu: QEMU) -> None:
    """Many commands in flight at once: each caller gets its own reply."""
    client = await connected(qemu)

    async def probe(n: int) -> None:
        with pytest.raises(ExecuteError, match=f"command nope-{n} has not"):
            await client.execute(f"nope-{n}")

    await asyncio.gather(*(probe(n) for n in range(100)))
    await client.disconnect()


async def test_oob_command(qemu: QEMU) -> None:
    """exec-oob runs commands that allow it; QEMU refuses the others."""
    client = await connected(qemu)
    instances = await client.execute("query-yank", oob=True)
    assert {"type": "chardev", "id": "qmp0"} in instances  # type: ignore[operator]
    with pytest.raises(ExecuteError, match="does not support OOB"):
        await client.execute("query-status", oob=True)
    await client.disconnect()


async def test_getfd_with_passed_fd(qemu: QEMU, tmp_path: Path) -> None:
    """send_fd_scm passes an fd that getfd names and closefd closes."""
    client = await connected(qemu)
    with open(tmp_path / "f", "wb") as passed:
        client.send_fd_scm(passed.fileno())
        assert await client.execute("getfd", {"fdname": "mine"}) == {}
    assert await client.execute("closefd", {"fdname": "mine"}) == {}
    with pytest.raises(ExecuteError, match="mine"):
        await client.execute("closefd", {"fdname": "mine"})
    with pytest.raises(ExecuteError, match="No file descriptor"):
        await client.execute("getfd", {"fdname": "none-passed"})
    await client.disconnect()


@pytest.mark.qemu
async def test_qemu_connects_to_us(tmp_path: Path) -> None:
    """start_server + accept: QEMU is the socket client (server=off)."""
    path = str(tmp_path / "listen.sock")
    client = QMPClient("server")
    await client.start_server(path)
    proc = start_qemu("-chardev", f"socket,id=mon,path={path},server=off",
                      "-mon", "chardev=mon,mode=control")
    try:
        await asyncio.wait_for(client.accept(), 30)
        assert client.runstate is Runstate.RUNNING
        assert (await client.execute("query-status"))["running"] is True  # type: ignore[index]
        await client.execute("quit")
        while client.runstate is Runstate.RUNNING:
            await client.runstate_changed()
        await client.disconnect()
        assert await asyncio.get_running_loop().run_in_executor(
            None, proc.wait, 30) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.qemu
async def test_qemu_on_a_socketpair() -> None:
    """open_with_socket on one end of a socketpair, QEMU on the other."""
    mine, theirs = socket.socketpair()
    proc = start_qemu("-chardev", f"socket,id=mon,fd={theirs.fileno()}",
                      "-mon", "chardev=mon,mode=control",
                      pass_fds=(theirs.fileno(),))
    theirs.close()
    client = QMPClient()
    try:
        await client.open_with_socket(mine)
        assert await client.execute("query-name") == {}
        await client.disconnect()
    finally:
        proc.kill()
        proc.wait()


async def test_quit_ends_the_session_cleanly(qemu: QEMU) -> None:
    """After 'quit' QEMU hangs up; disconnect() returns without error."""
    client = await connected(qemu)
    assert await client.execute("quit") == {}
    while client.runstate is Runstate.RUNNING:
        await client.runstate_changed()
    await client.disconnect()
    assert client.runstate is Runstate.IDLE
    assert await asyncio.get_running_loop().run_in_executor(
        None, qemu.wait, 30) == 0


async def test_killed_qemu_interrupts_and_reconnect_fails_clearly(
        qemu: QEMU) -> None:
    """SIGKILLed QEMU: the session ends, disconnect() returns to IDLE
    without an error (whether the kernel reported an end of stream or a
    reset), and connecting again is a ConnectError, not a hang."""
    client = await connected(qemu)
    await client.execute("stop")
    os.kill(qemu.pid, signal.SIGKILL)
    while client.runstate is Runstate.RUNNING:
        await client.runstate_changed()
    await client.disconnect()
    assert client.runstate is Runstate.IDLE
    with pytest.raises(ConnectError):
        await client.connect(qemu.path)
    assert client.runstate is Runstate.IDLE
    assert os.path.exists(qemu.path)
