"""
The pytest plugin ``qmp_sync.testing``, tried as a user would: a test
file of theirs, run by pytest in a subprocess (so the plugin comes in
through its entry point), passing and failing as it should.
"""

from __future__ import annotations

import pytest
from conftest import qemu_binary

pytest_plugins = ["pytester"]

USER_TESTS = '''
from qmp_sync import ExecuteError
import pytest


def test_status(qemu_machine):
    vm = qemu_machine()
    assert vm.qmp("query-status")["return"]["running"] is True


def test_two_machines_and_args(qemu_machine):
    first = qemu_machine()
    second = qemu_machine("-name", "second")
    assert second.cmd("query-name") == {"name": "second"}
    first.cmd("stop")
    assert first.event_wait("STOP", timeout=10)["event"] == "STOP"


def test_fails_as_it_should(qemu_machine):
    vm = qemu_machine()
    vm.cmd("no-such-command")
'''


def test_qemu_machine_fixture(pytester: pytest.Pytester) -> None:
    """Machines launch, work, and are killed at teardown (no QEMU left
    running); a failing test fails; -m "not qemu" leaves them out."""
    pytester.makepyfile(USER_TESTS)
    pytester.makeini(f"[pytest]\nqmp_sync_qemu = {qemu_binary()}\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*ExecuteError: The command no-such-command has not been found"])
    deselected = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-m", "not qemu")
    deselected.assert_outcomes(deselected=3)


def test_missing_qemu_skips_or_fails(pytester: pytest.Pytester) -> None:
    """Without a QEMU binary the tests are skipped with the reason; with
    qmp_sync_require_qemu they fail instead."""
    pytester.makepyfile(USER_TESTS)
    pytester.makeini("[pytest]\nqmp_sync_qemu = /no/such/qemu\n")
    skipped = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    skipped.assert_outcomes(skipped=3)
    skipped.stdout.fnmatch_lines(["*QEMU binary '/no/such/qemu' not found*"])
    pytester.makeini("[pytest]\nqmp_sync_qemu = /no/such/qemu\n"
                     "qmp_sync_require_qemu = true\n")
    failed = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    failed.assert_outcomes(errors=3)
