"""
The pytest plugin ``qmp_sync.testing``, tried as a user would: a test
file of theirs, run by pytest in a subprocess (so the plugin comes in
through its entry point), passing and failing as it should.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket

import pytest
from peers import poll_until, qemu_binary

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


@pytest.mark.qemu
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


FAKE_USER_TESTS = '''
import pytest
from qmp_sync import ExecuteError, ExecInterruptedError, QMPSyncClient
from qmp_sync.fake_server import FakeQMPServer, make_greeting


def test_replies_events_and_received(fake_qmp_server):
    fake_qmp_server.reply("query-status", {"running": True})
    fake_qmp_server.reply("add", lambda args: args["a"] + args["b"])
    fake_qmp_server.reply("broken", error={"class": "GenericError",
                                          "desc": "it broke"})
    with QMPSyncClient(fake_qmp_server.address) as client:
        client.connect(timeout=10)
        assert client.execute("query-status") == {"running": True}
        assert client.execute("add", {"a": 2, "b": 3}) == 5
        with pytest.raises(ExecuteError, match="it broke"):
            client.execute("broken")
        with pytest.raises(ExecuteError, match="has not been found"):
            client.execute("unknown")
        fake_qmp_server.emit("STOP")
        assert client.event_wait("STOP", timeout=10)["event"] == "STOP"
    assert [c["execute"] for c in fake_qmp_server.received] == [
        "qmp_capabilities", "query-status", "add", "broken", "unknown"]


@pytest.mark.parametrize("kind", ["hang-up", "garbage", "partial"])
def test_faults_end_the_session(fake_qmp_server, kind):
    fake_qmp_server.fault("query-status", kind)
    client = QMPSyncClient(fake_qmp_server.address)
    client.connect(timeout=10)
    with pytest.raises(ExecInterruptedError):
        client.execute("query-status", timeout=10)
    try:
        client.close()
    except Exception:
        pass


def test_stall_is_a_timeout(fake_qmp_server):
    fake_qmp_server.fault("query-status", "stall")
    with QMPSyncClient(fake_qmp_server.address) as client:
        client.connect(timeout=10)
        with pytest.raises(TimeoutError):
            client.execute("query-status", timeout=0.2)


def test_oversized_line_is_over_the_limit(fake_qmp_server):
    fake_qmp_server.fault("query-status", "oversized")
    client = QMPSyncClient(fake_qmp_server.address)
    client.connect(timeout=10)
    with pytest.raises(ExecInterruptedError, match="read limit"):
        client.execute("query-status", timeout=10)
    with pytest.raises(Exception, match="read limit"):
        client.close()


def test_no_greeting_as_qemu_ga(fake_qmp_server):
    fake_qmp_server.greeting = None
    fake_qmp_server.reply("guest-ping")
    with QMPSyncClient(fake_qmp_server.address) as client:
        client.connect(negotiate=False, timeout=10)
        assert client.execute("guest-ping") == {}


def test_greeting_without_oob(fake_qmp_server):
    fake_qmp_server.greeting = make_greeting(capabilities=())
    with QMPSyncClient(fake_qmp_server.address) as client:
        client.connect(timeout=10)
    assert fake_qmp_server.received[0] == {
        "execute": "qmp_capabilities", "id": fake_qmp_server.received[0]["id"]}


def test_commands_before_negotiation_are_refused_as_qemu_does(
        fake_qmp_server):
    fake_qmp_server.reply("query-status", {"running": True})
    with QMPSyncClient(fake_qmp_server.address) as client:
        client.connect(negotiate=False, timeout=10)
        with pytest.raises(ExecuteError, match="Expecting capabilities"):
            client.execute("query-status")
        client.execute("qmp_capabilities")
        assert client.execute("query-status") == {"running": True}
        with pytest.raises(ExecuteError, match="already complete"):
            client.execute("qmp_capabilities")


def test_tcp_and_socketpair():
    with FakeQMPServer(tcp=True) as server:
        assert server.address[0] == "127.0.0.1"
        server.reply("query-name", {"name": "tcp"})
        with QMPSyncClient(server.address) as client:
            client.connect(timeout=10)
            assert client.execute("query-name") == {"name": "tcp"}
        server.reply("query-name", {"name": "pair"})
        with QMPSyncClient() as client:
            client.open_with_socket(server.socketpair(), timeout=10)
            assert client.execute("query-name") == {"name": "pair"}
            server.emit("STOP")
            assert client.event_wait("STOP", timeout=10)


def test_assertion_helpers(fake_qmp_server):
    fake_qmp_server.reply("blockdev-add")
    with QMPSyncClient(fake_qmp_server.address) as client:
        client.connect(timeout=10)
        client.execute("blockdev-add", {"driver": "null-co",
                                        "node-name": "n0"})
        client.execute("blockdev-add", {"driver": "null-co",
                                        "node-name": "n1"})
    server = fake_qmp_server
    assert server.commands == ["qmp_capabilities", "blockdev-add",
                               "blockdev-add"]
    assert [args["node-name"] for args in server.arguments("blockdev-add")
            ] == ["n0", "n1"]
    server.assert_received("blockdev-add", times=2)
    server.assert_received("blockdev-add", {"driver": "null-co",
                                            "node-name": "n1"}, times=1)
    assert server.wait_for("blockdev-add", timeout=1)["arguments"][
        "node-name"] == "n0"
    with pytest.raises(AssertionError, match="received: qmp_capabilities"):
        server.assert_received("blockdev-del")
    with pytest.raises(AssertionError, match="2 times, not 1"):
        server.assert_received("blockdev-add", times=1)
    with pytest.raises(TimeoutError, match="blockdev-del not received"):
        server.wait_for("blockdev-del", timeout=0.05)


def test_a_reply_function_that_raises_is_a_generic_error(fake_qmp_server):
    fake_qmp_server.reply("add", lambda args: args["a"] + args["b"])
    with QMPSyncClient(fake_qmp_server.address) as client:
        client.connect(timeout=10)
        with pytest.raises(ExecuteError, match="raised KeyError: 'b'"):
            client.execute("add", {"a": 1})
        assert client.execute("add", {"a": 1, "b": 2}) == 3


def test_a_failing_assertion_fails_the_test(fake_qmp_server):
    fake_qmp_server.assert_received("query-status")
'''


def test_fake_qmp_server_fixture(pytester: pytest.Pytester) -> None:
    """A user's unit tests drive the fake server: canned values, errors
    and functions, events on demand, what it received, each fault,
    greeting variants (none as qemu-ga, no oob), negotiation enforced
    as QEMU does, TCP and socketpairs, and the assertion helpers (one
    of which fails its test, as it should); no QEMU involved."""
    pytester.makepyfile(FAKE_USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           "-m", "not qemu")
    result.assert_outcomes(passed=12, failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: query-status was not "
                                 "received; the server received: "
                                 "nothing*"])


def test_fake_server_refuses_unknown_faults() -> None:
    from qmp_sync.fake_server import FakeQMPServer
    with FakeQMPServer() as server, pytest.raises(ValueError,
                                                  match="unknown fault"):
        server.fault("x", "explode")


def test_fake_server_reads_a_json_stream_as_qemu_does() -> None:
    """The fake server takes JSON values as QEMU does: cut anywhere,
    with or without newlines between them; something that is not JSON,
    or not an object, is answered with QEMU's GenericError and the
    connection goes on."""
    from qmp_sync.fake_server import FakeQMPServer

    with FakeQMPServer() as server, \
            socket.socket(socket.AF_UNIX) as sock:
        server.reply("query-status", {"running": True})
        sock.settimeout(10)
        sock.connect(str(server.address))
        with sock.makefile("rb") as replies:
            assert b'"QMP"' in replies.readline()
            stream = (b'{"execute": "qmp_capabilities", "id": 1}'
                      b'{"execute": "query-status", "arguments": {"a": '
                      b'true, "b": null, "c": -12.5e3, "d": "\\u00e9\\""}, '
                      b'"id": 2}\n{this is not json\n[1, 2]\n'
                      b'{"execute": "query-status", "id": 3}')
            for offset in range(len(stream)):  # one byte at a time
                sock.sendall(stream[offset:offset + 1])
            answers = [json.loads(replies.readline()) for _ in range(5)]
    assert answers[0] == {"return": {}, "id": 1}
    assert answers[1] == {"return": {"running": True}, "id": 2}
    assert answers[2]["error"]["class"] == "GenericError"
    assert "JSON parse error" in answers[2]["error"]["desc"]
    assert "must be a JSON object" in answers[3]["error"]["desc"]
    assert answers[4] == {"return": {"running": True}, "id": 3}
    assert server.arguments("query-status")[0] == {
        "a": True, "b": None, "c": -12.5e3, "d": 'é"'}


def test_fake_connection_reads_a_message_cut_anywhere(
        pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """However a read cuts a command (inside a number, an exponent, a
    word, an escape, a multi-byte character), the fake server waits for
    the rest and reads it whole."""
    from qmp_sync.fake_server import FakeConnection

    command = {"execute": "x", "arguments": {
        "n": -12.5e-3, "t": True, "f": False, "z": None, "i": 1234567,
        "s": 'a"b\\c', "u": "é€😀"}}
    wire = json.dumps(command, ensure_ascii=False).encode()
    for cut in range(1, len(wire)):
        with FakeConnection.socketpair() as server, \
                server.client_sock as client:
            client.sendall(wire[:cut])
            reading = pool.submit(server.recv)
            # Until the first part was read alone.
            poll_until(lambda server=server, reading=reading:
                       bool(server._pending) or reading.done())
            client.sendall(wire[cut:] + b"\n")
            assert reading.result(10) == command, cut
