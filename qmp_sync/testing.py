"""
qmp_sync's pytest plugin: fixtures for tests that need a QEMU.

Installing qmp_sync registers it (entry point ``pytest11``); it does
nothing until a test asks for one of its fixtures.

``qemu_machine``
    A factory: ``qemu_machine(*extra_args, **kwargs)`` launches a
    guest-less QEMU (``-machine none -nodefaults`` plus `extra_args`) as
    a `qmp_sync.machine.QEMUMachine` (`kwargs` go to its constructor)
    and returns it; every machine it made is killed at teardown. The
    binary is the ``qmp_sync_qemu`` ini option, else ``$QMP_SYNC_QEMU``,
    else ``qemu-system-x86_64`` on PATH. Without one the test is
    skipped, saying why, unless the ini option ``qmp_sync_require_qemu``
    is true (a CI that must run these tests): then it fails.

Every test using the fixture gets the ``qemu`` marker, so ``pytest -m
"not qemu"`` leaves them out.

``fake_qmp_server``
    A running `qmp_sync.fake_server.FakeQMPServer` on a unix socket for
    unit tests of code that talks QMP, closed at teardown: connect to
    its ``address`` (or take ``socketpair()``); script it with
    ``reply(command, value)`` (or ``error={"class": ..., "desc": ...}``,
    or a function of the arguments), ``emit(event, data)``,
    ``fault(command, kind)`` and ``greeting``; check what it got with
    ``commands``, ``arguments(command)``, ``assert_received(command,
    arguments, times=)``, ``wait_for(command)`` or ``received``. No QEMU
    needed. For example::

        def test_my_tool(fake_qmp_server):
            fake_qmp_server.reply("query-status", {"running": True})
            with QMPSyncClient(fake_qmp_server.address) as client:
                client.connect()
                assert my_tool_is_running(client)
            fake_qmp_server.assert_received("query-status", times=1)

Threads: fixtures run in pytest's thread.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from .fake_server import FakeQMPServer
from .machine import QEMUMachine

__all__ = ("GUESTLESS_ARGS", "fake_qmp_server", "find_qemu", "qemu_binary",
           "qemu_machine", "qemu_name")

#: The arguments of a guest-less QEMU.
GUESTLESS_ARGS = ("-machine", "none", "-nodefaults")
#: The binary used when nothing else is configured.
DEFAULT_QEMU = "qemu-system-x86_64"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare the plugin's ini options."""
    parser.addini("qmp_sync_qemu", "the QEMU binary of the qemu_machine "
                  "fixture (default: $QMP_SYNC_QEMU, else "
                  f"{DEFAULT_QEMU} on PATH)")
    parser.addini("qmp_sync_require_qemu", "fail tests that need QEMU "
                  "when it is missing, instead of skipping them",
                  type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    """Declare the ``qemu`` marker."""
    config.addinivalue_line("markers",
                            "qemu: needs a real QEMU (qemu_machine)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses ``qemu_machine`` with ``qemu``."""
    for item in items:
        if "qemu_machine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.qemu)


def qemu_name(configured: str = "") -> str:
    """The QEMU binary asked for: `configured`, else ``$QMP_SYNC_QEMU``,
    else ``qemu-system-x86_64``."""
    return (configured or os.environ.get("QMP_SYNC_QEMU", "")
            or DEFAULT_QEMU)


def find_qemu(configured: str = "") -> str | None:
    """The path of the QEMU binary asked for (see `qemu_name`); None
    when that is not an executable."""
    return shutil.which(qemu_name(configured))


def qemu_binary(config: pytest.Config) -> str:
    """
    The QEMU binary to launch, as configured (see the module docstring).
    Skips the test when there is none, or fails it when the ini option
    ``qmp_sync_require_qemu`` is true.
    """
    configured = qemu_name(str(config.getini("qmp_sync_qemu") or ""))
    found = shutil.which(configured)
    if found is None:
        reason = (f"QEMU binary {configured!r} not found (set the "
                  "qmp_sync_qemu ini option or $QMP_SYNC_QEMU)")
        if config.getini("qmp_sync_require_qemu"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


@pytest.fixture
def qemu_machine(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Callable[..., QEMUMachine]]:
    """A factory of launched guest-less QEMUs, killed at teardown (see
    the module docstring)."""
    binary = qemu_binary(request.config)
    machines: list[QEMUMachine] = []

    def launch(*extra_args: str, **kwargs: Any) -> QEMUMachine:
        kwargs.setdefault("base_temp_dir",
                          str(tmp_path_factory.mktemp("qemu")))
        vm = QEMUMachine(binary, args=[*GUESTLESS_ARGS, *extra_args],
                         **kwargs)
        machines.append(vm)
        vm.launch()
        return vm

    yield launch
    for vm in machines:
        vm.kill()


@pytest.fixture
def fake_qmp_server() -> Iterator[FakeQMPServer]:
    """A running fake QMP server, closed at teardown (see the module
    docstring)."""
    with FakeQMPServer() as server:
        yield server
