"""
The compatibility switch: code written for ``qemu.qmp`` runs unchanged
on qmp_sync, in child processes (the switch changes ``sys.modules``),
against real QEMU.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from peers import QEMU

BOUND = 30.0

# Written for qemu.qmp (0.0.x) and nothing else: its legacy class, its
# asyncio client, and the names such code imports.
SCRIPT = '''
import asyncio
import sys

from qemu.qmp import (ConnectError, EventListener, ExecInterruptedError,
                      ExecuteError, Message, QMPClient, QMPError, Runstate,
                      SocketAddrT, StateError)
from qemu.qmp.legacy import (QEMUMonitorProtocol, QMPBadPortError,
                             QMPMessage, QMPObject, QMPReturnValue)
from qemu.qmp.protocol import ConnectError as ProtocolConnectError
from qemu.qmp.qmp_client import ExecuteError as ClientExecuteError

path = sys.argv[1]
assert ProtocolConnectError is ConnectError
assert ClientExecuteError is ExecuteError

with QEMUMonitorProtocol(path) as vm:
    greeting = vm.connect()
    assert "QMP" in greeting, greeting
    assert vm.cmd("query-status")["running"] is True
    reply = vm.cmd_obj({"execute": "stop"})
    assert reply == {"return": {}}, reply
    event = vm.pull_event(wait=10)
    assert event["event"] == "STOP", event
    try:
        vm.cmd("no-such-command")
    except ExecuteError as err:
        assert err.error_class == "CommandNotFound"
    else:
        raise AssertionError("no ExecuteError")
    vm.cmd("cont")


async def main() -> None:
    client = QMPClient("compat")
    await client.connect(path)
    assert client.runstate is Runstate.RUNNING
    with client.listener("RESUME") as listener:
        await client.execute("stop")
        await client.execute("cont")
        event = await asyncio.wait_for(listener.get(), 10)
        assert event["event"] == "RESUME"
    await client.disconnect()

asyncio.run(main())
import qemu.qmp, qmp_sync
assert qemu.qmp is qmp_sync
print("COMPAT OK")
'''


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True,
                          text=True, timeout=BOUND, check=False)


def test_script_for_qemu_qmp_runs_on_qmp_sync(qemu: QEMU,
                                             tmp_path: Path) -> None:
    """``python -m qmp_sync.compat SCRIPT ARGS`` runs a script written
    for qemu.qmp (legacy and asyncio clients) against real QEMU."""
    script = tmp_path / "uses_qemu_qmp.py"
    script.write_text(SCRIPT)
    child = run("-m", "qmp_sync.compat", str(script), qemu.path)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["COMPAT", "OK"], child.stdout


def test_install_as_a_call() -> None:
    """install() maps qemu.qmp and its submodules onto qmp_sync's, keeps
    the rest of the qemu namespace importable, and may be called
    twice."""
    child = run("-c", textwrap.dedent('''
        import qmp_sync.compat
        qmp_sync.compat.install()
        qmp_sync.compat.install()
        import qemu.qmp.legacy, qemu.qmp.qmp_client, qmp_sync.legacy
        assert qemu.qmp.legacy is qmp_sync.legacy
        from qemu.qmp.legacy import QEMUMonitorProtocol
        assert QEMUMonitorProtocol.__module__ == "qmp_sync.legacy"
        try:
            import qemu.qmp.models
        except ImportError:
            pass
        else:
            raise AssertionError("qemu.qmp.models should not exist")
        print("OK")
    '''))
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "OK"


def test_refuses_when_the_real_qemu_qmp_is_imported() -> None:
    """With another qemu.qmp imported already, install() raises a
    QMPError that says so and what to do; nothing is changed."""
    child = run("-c", textwrap.dedent('''
        import sys, types
        real = types.ModuleType("qemu.qmp")
        real.__file__ = "/elsewhere/qemu/qmp/__init__.py"
        sys.modules["qemu.qmp"] = real
        import qmp_sync.compat
        from qmp_sync import QMPError
        try:
            qmp_sync.compat.install()
        except QMPError as err:
            print(err)
        assert sys.modules["qemu.qmp"] is real
    '''))
    assert child.returncode == 0, child.stderr
    assert "qemu.qmp is imported already" in child.stdout
    assert "/elsewhere/qemu/qmp/__init__.py" in child.stdout
    assert "python -m qmp_sync.compat" in child.stdout


def test_usage_without_a_script() -> None:
    child = run("-m", "qmp_sync.compat")
    assert child.returncode == 2
    assert "usage: python -m qmp_sync.compat SCRIPT" in child.stderr
