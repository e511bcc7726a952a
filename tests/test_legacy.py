"""
The legacy drop-in `QEMUMonitorProtocol`: driven the way QEMU's own
``QEMUMachine`` (iotests) drives ``qemu.qmp.legacy``, against real QEMU;
the original's bugs that it fixes; and what the original cannot do.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from peers import QEMU, start_qemu

from qmp_sync import ConnectError, ExecuteError, QMPError, Runstate
from qmp_sync.fake_server import DEFAULT_GREETING as GREETING
from qmp_sync.fake_server import FakeConnection
from qmp_sync.legacy import QEMUMonitorProtocol, QMPBadPortError

#: Longest wait for QEMU to start and connect, in seconds.
QEMU_TIMEOUT = 30.0
#: Longest wait for an event, in seconds (the legacy ``wait`` argument).
EVENT_WAIT = 5.0
#: Longest wait for a call running in a worker thread, in seconds.
WAIT = 10.0


def is_plain(value: object) -> bool:
    """True for JSON data made of built-in types only, as ``json.loads``
    returns it (no `Message`, no other dict or list subclass)."""
    if type(value) is dict:
        return all(type(key) is str and is_plain(item)
                   for key, item in value.items())
    if type(value) is list:
        return all(is_plain(item) for item in value)
    return value is None or type(value) in (str, int, float, bool)


def assert_greeting(greeting: object) -> None:
    """`greeting` is QEMU's greeting as a plain dict."""
    assert type(greeting) is dict
    assert is_plain(greeting)
    version = greeting["QMP"]["version"]["qemu"]
    assert set(version) == {"major", "minor", "micro"}
    assert all(type(number) is int for number in version.values())


@contextlib.contextmanager
def qemu_connecting_to(path: str) -> Iterator[subprocess.Popen[bytes]]:
    """QEMU as the client of the unix socket at `path`, as QEMUMachine
    starts it for a monitor in server mode; killed at the end."""
    proc = start_qemu("-chardev", f"socket,id=mon,path={path}",
                      "-mon", "chardev=mon,mode=control")
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=QEMU_TIMEOUT)


def connect_to_peer(client: QEMUMonitorProtocol, peer: FakeConnection,
                    pool: ThreadPoolExecutor) -> None:
    """Connect `client` to `peer`, which greets and answers
    qmp_capabilities meanwhile."""
    peer.greet()
    connecting = pool.submit(client.connect)
    negotiation = peer.answer()
    assert negotiation["execute"] == "qmp_capabilities"
    assert connecting.result(timeout=WAIT) == GREETING


@pytest.fixture
def peer_client(peer: FakeConnection, pool: ThreadPoolExecutor
                ) -> Iterator[QEMUMonitorProtocol]:
    """A legacy client connected to `peer`."""
    client = QEMUMonitorProtocol(peer.client_sock)
    try:
        connect_to_peer(client, peer, pool)
        yield client
    finally:
        client.close()


@pytest.fixture
def legacy(qemu: QEMU, pool: ThreadPoolExecutor
           ) -> Iterator[QEMUMonitorProtocol]:
    """A legacy client connected to a real QEMU by socket path."""
    client = QEMUMonitorProtocol(qemu.path)
    try:
        client.connect()
        yield client
    finally:
        client.close()


# ----------------------------------------------------------------------
# Driven as QEMUMachine drives it, against real QEMU.


@pytest.mark.qemu
def test_server_mode_like_qemumachine(tmp_path: Path) -> None:
    """Server mode: listen, QEMU connects, accept() returns the greeting
    as a plain dict; commands work; 'quit' then close() is a clean
    shutdown (QEMUMachine.shutdown)."""
    path = str(tmp_path / "monitor.sock")
    client = QEMUMonitorProtocol(path, server=True, nickname="vm0")
    try:
        with qemu_connecting_to(path) as proc:
            greeting = client.accept(QEMU_TIMEOUT)
            assert_greeting(greeting)
            status = client.cmd("query-status")
            assert status["status"] == "running"  # type: ignore[index]
            assert client.cmd("quit") == {}
            client.close()
            assert client.runstate is Runstate.IDLE
            assert proc.wait(timeout=QEMU_TIMEOUT) == 0
    finally:
        client.close()


@pytest.mark.qemu
def test_socket_mode_like_qemumachine() -> None:
    """Socket mode: one end of a socketpair given to QEMU, the other to
    the client; connect() returns the greeting and commands work."""
    ours, theirs = socket.socketpair()
    client = QEMUMonitorProtocol(ours)
    try:
        proc = start_qemu("-chardev", f"socket,id=mon,fd={theirs.fileno()}",
                          "-mon", "chardev=mon,mode=control",
                          pass_fds=(theirs.fileno(),))
    finally:
        theirs.close()
    try:
        assert_greeting(client.connect())
        assert client.cmd_raw("query-name") == {"return": {}}
        assert client.cmd("quit") == {}
        client.close()
        assert proc.wait(timeout=QEMU_TIMEOUT) == 0
    finally:
        client.close()
        ours.close()
        proc.kill()
        proc.wait(timeout=QEMU_TIMEOUT)


def test_path_mode_connect_returns_greeting(qemu: QEMU) -> None:
    """connect() to a socket path returns the greeting as a plain dict
    that agrees with query-version."""
    client = QEMUMonitorProtocol(qemu.path)
    try:
        greeting = client.connect()
        assert_greeting(greeting)
        assert greeting is not None
        assert client.cmd("query-version") == greeting["QMP"]["version"]
    finally:
        client.close()


def test_connect_without_negotiation_returns_none(
        peer: FakeConnection, pool: ThreadPoolExecutor) -> None:
    """connect(negotiate=False) to a server that neither greets nor
    negotiates (qemu-ga) returns None, sends no qmp_capabilities, and
    commands work."""
    client = QEMUMonitorProtocol(peer.client_sock)
    try:
        assert client.connect(negotiate=False) is None
        pinging = pool.submit(client.cmd, "guest-ping")
        assert peer.answer()["execute"] == "guest-ping"
        assert pinging.result(timeout=WAIT) == {}
        assert [msg["execute"] for msg in peer.received] == ["guest-ping"]
    finally:
        client.close()


def test_connect_without_negotiation_to_qemu_then_negotiate_by_hand(
        qemu: QEMU) -> None:
    """After connect(negotiate=False) to QEMU, which greets anyway, the
    caller can negotiate by hand with cmd_obj, and close() is clean."""
    client = QEMUMonitorProtocol(qemu.path)
    try:
        client.connect(negotiate=False)
        assert client.cmd_obj({"execute": "qmp_capabilities"}) == {
            "return": {}}
        assert client.cmd("query-status")["running"] is True  # type: ignore[index]
    finally:
        client.close()


def test_connect_without_negotiation_to_qemu_always_returns_none(
        qemu: QEMU) -> None:
    """connect(negotiate=False) returns None, as documented and as the
    original does, however fast QEMU's greeting arrives."""
    returned = []
    for _ in range(30):
        client = QEMUMonitorProtocol(qemu.path)
        try:
            returned.append(client.connect(negotiate=False))
            # QEMU has accepted this connection once it answers, so the
            # next one does not queue behind a dead one.
            assert client.cmd_obj({"execute": "qmp_capabilities"}) == {
                "return": {}}
        finally:
            client.close()
    assert returned == [None] * 30


def test_connect_to_a_full_backlog_is_not_a_dead_session(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    """connect() to a unix socket whose listen backlog is full (a server
    not accepting yet) either fails with ConnectError or waits for room,
    like a blocking connect; it never returns an unconnected session."""
    path = str(tmp_path / "busy.sock")
    client = QEMUMonitorProtocol(path)
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket(socket.AF_UNIX))
        listener.bind(path)
        listener.listen(0)
        queued = stack.enter_context(socket.socket(socket.AF_UNIX))
        queued.connect(path)  # the one connection the backlog holds
        stack.callback(client.close)
        connecting = pool.submit(client.connect, negotiate=False)
        # A refusal (or a wrong success) comes at once; a connect that
        # waits for room, like a blocking one, is still running after.
        concurrent.futures.wait([connecting], timeout=2.0)
        if connecting.done():
            with pytest.raises(ConnectError):
                connecting.result()
            assert client.runstate is Runstate.IDLE
            return
        # Make room (take the queued connection): the waiting connect
        # completes.
        stack.enter_context(listener.accept()[0])
        assert connecting.result(timeout=WAIT) is None
        # A unix connect() that succeeded has queued its connection.
        listener.setblocking(False)
        server = stack.enter_context(listener.accept()[0])
        server.settimeout(WAIT)
        pinging = pool.submit(client.cmd, "guest-ping")
        command = json.loads(
            stack.enter_context(server.makefile("rb")).readline())
        assert command["execute"] == "guest-ping"
        server.sendall(json.dumps(
            {"return": {}, "id": command["id"]}).encode() + b"\n")
        assert pinging.result(timeout=WAIT) == {}


def test_cmd_raw_cmd_obj_and_cmd(legacy: QEMUMonitorProtocol) -> None:
    """cmd_raw/cmd_obj return the whole reply as a plain dict, without
    the private id but with the caller's own, and error replies too
    (not raised); cmd returns the return value or raises ExecuteError."""
    reply = legacy.cmd_raw("query-status")
    assert list(reply) == ["return"]
    status = reply["return"]
    assert status["status"] == "running"
    assert is_plain(reply)
    assert legacy.cmd_obj({"execute": "query-status"}) == {"return": status}
    assert legacy.cmd_raw("human-monitor-command",
                          {"command-line": "info status"}) == {
        "return": "VM status: running\r\n"}
    own = {"execute": "query-name", "id": "mine"}
    assert legacy.cmd_obj(own) == {"return": {}, "id": "mine"}
    assert own == {"execute": "query-name", "id": "mine"}
    error = legacy.cmd_raw("nonexistent")
    assert error == {"error": {
        "class": "CommandNotFound",
        "desc": "The command nonexistent has not been found"}}
    assert is_plain(error)
    assert legacy.cmd_obj({"execute": "nonexistent"}) == error

    result = legacy.cmd("query-status")
    assert result == status
    assert is_plain(result)
    with pytest.raises(ExecuteError) as info:
        legacy.cmd("nonexistent")
    assert info.value.error_class == "CommandNotFound"
    assert str(info.value) == "The command nonexistent has not been found"
    assert legacy.cmd("human-monitor-command",
                      **{"command-line": "info status"}) == (
        "VM status: running\r\n")
    assert legacy.cmd("query-name") == {}


def test_events_pull_get_and_clear(legacy: QEMUMonitorProtocol) -> None:
    """stop/cont events come out of pull_event and get_events as plain
    dicts; clear_events empties the queue; with nothing queued and no
    wait, pull_event is None and get_events is []."""
    assert legacy.pull_event() is None
    assert legacy.get_events() == []
    assert legacy.cmd("stop") == {}
    stop = legacy.pull_event(wait=EVENT_WAIT)
    assert stop is not None
    assert stop["event"] == "STOP"
    assert set(stop["timestamp"]) == {"seconds", "microseconds"}
    assert is_plain(stop)
    assert legacy.cmd("cont") == {}
    events = legacy.get_events(wait=EVENT_WAIT)
    assert [event["event"] for event in events] == ["RESUME"]
    assert is_plain(events)

    # QEMU writes the event a command causes before that command's
    # reply, and the client queues each event before it hands over the
    # next reply: both events are queued when cmd('cont') returns.
    legacy.cmd("stop")
    legacy.cmd("cont")
    assert legacy.clear_events() is None  # type: ignore[func-returns-value]
    assert legacy.pull_event() is None
    assert legacy.get_events() == []


def test_events_queue_while_the_caller_is_idle(qemu2: QEMU) -> None:
    """Events caused from another monitor while the legacy client is
    left alone are all queued, none lost, in order."""
    idle = QEMUMonitorProtocol(qemu2.paths[0])
    other = QEMUMonitorProtocol(qemu2.paths[1])
    try:
        idle.connect()
        other.connect()
        for _ in range(10):
            other.cmd("stop")
            other.cmd("cont")
        events: list[dict[str, object]] = []
        # Each call is bounded; the 20 events may come in several
        # batches, but none is left behind or comes twice.
        while len(events) < 20:
            events += idle.get_events(wait=EVENT_WAIT)
        assert [event["event"] for event in events] == (
            ["STOP", "RESUME"] * 10)
        assert idle.get_events() == []
    finally:
        other.close()
        idle.close()


def test_send_fd_scm_then_getfd_and_closefd(
        legacy: QEMUMonitorProtocol, tmp_path: Path) -> None:
    """send_fd_scm passes an fd that getfd names and closefd closes."""
    with open(tmp_path / "passed", "wb") as passed:
        legacy.send_fd_scm(passed.fileno())
        assert legacy.cmd("getfd", fdname="x") == {}
    assert legacy.cmd("closefd", fdname="x") == {}
    with pytest.raises(ExecuteError, match="'x'"):
        legacy.cmd("closefd", fdname="x")


def test_settimeout_and_context_manager(qemu: QEMU) -> None:
    """Commands work with no timeout and with one; the context manager
    closes the connection."""
    with QEMUMonitorProtocol(qemu.path) as client:
        client.connect()
        client.settimeout(None)
        assert client.cmd("query-name") == {}
        client.settimeout(5.0)
        assert client.cmd_raw("query-name") == {"return": {}}
        assert client.cmd_obj({"execute": "query-name"}) == {"return": {}}
        inside = client.runstate
    assert inside is Runstate.RUNNING
    assert client.runstate is Runstate.IDLE


def test_close_twice(qemu: QEMU) -> None:
    """close() is idempotent, and fine on a client never connected."""
    client = QEMUMonitorProtocol(qemu.path)
    client.close()
    client.connect()
    client.close()
    client.close()
    assert client.runstate is Runstate.IDLE


@pytest.mark.parametrize(("address", "parsed"), [
    ("localhost:4444", ("localhost", 4444)),
    ("/tmp/sock", "/tmp/sock"),
    ("relative.sock", "relative.sock"),
])
def test_parse_address(address: str, parsed: object) -> None:
    """host:port becomes a (host, port) tuple; anything else is a unix
    socket path, returned as it is."""
    assert QEMUMonitorProtocol.parse_address(address) == parsed


def test_parse_address_bad_port() -> None:
    """A port that is not a number is a QMPBadPortError (a QMPError)."""
    with pytest.raises(QMPBadPortError, match="'port' in 'host:port'"):
        QEMUMonitorProtocol.parse_address("host:port")
    assert issubclass(QMPBadPortError, QMPError)


# ----------------------------------------------------------------------
# The original's bugs, fixed.


def test_idless_cmd_obj_after_timeout_gets_its_own_reply(
        peer: FakeConnection, pool: ThreadPoolExecutor,
        peer_client: QEMUMonitorProtocol) -> None:
    """After a cmd_obj timeout, the late reply is dropped and the next
    cmd_obj gets its own reply. (The original sends an id-less message
    as it is, so it takes the late reply for the next command's.)"""
    peer_client.settimeout(0.3)
    with pytest.raises(TimeoutError):
        peer_client.cmd_obj({"execute": "slow"})
    slow = peer.recv()
    assert slow["execute"] == "slow"
    assert "id" in slow
    peer.send({"return": "late", "id": slow["id"]})

    peer_client.settimeout(WAIT)
    command = {"execute": "next"}
    replying = pool.submit(peer_client.cmd_obj, command)
    following = peer.recv()
    assert following["execute"] == "next"
    assert following["id"] != slow["id"]
    peer.send({"return": "next's", "id": following["id"]})
    assert replying.result(timeout=WAIT) == {"return": "next's"}
    assert command == {"execute": "next"}


def test_pull_event_integer_wait_is_seconds(
        legacy: QEMUMonitorProtocol, pool: ThreadPoolExecutor) -> None:
    """pull_event(wait=1), an int, raises TimeoutError after a second.
    (The original takes only a float for seconds and waits forever.)"""

    def timed_pull() -> float:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            legacy.pull_event(wait=1)
        return time.monotonic() - start

    assert pool.submit(timed_pull).result(timeout=WAIT) >= 0.9


@pytest.mark.qemu
def test_accept_again_after_accept_timeout(tmp_path: Path) -> None:
    """When nobody connects in time, accept() raises TimeoutError and
    keeps listening: a second accept() takes QEMU's connection. (The
    original stops listening on the timeout; the second accept() raises
    StateError.)"""
    path = str(tmp_path / "monitor.sock")
    client = QEMUMonitorProtocol(path, server=True)
    try:
        with pytest.raises(TimeoutError):
            client.accept(timeout=0.2)
        assert os.path.exists(path)
        with qemu_connecting_to(path):
            assert_greeting(client.accept(timeout=QEMU_TIMEOUT))
            assert client.cmd("query-status")["running"] is True  # type: ignore[index]
            client.close()
    finally:
        client.close()


def test_parse_address_bracketed_ipv6() -> None:
    """'[::1]:4444' is IPv6 host ::1, port 4444. (The original splits on
    every colon, finds more than two parts, and returns the string as a
    unix socket path.)"""
    assert QEMUMonitorProtocol.parse_address("[::1]:4444") == ("::1", 4444)


# ----------------------------------------------------------------------
# Where the original cannot be used at all.


async def test_works_inside_a_running_event_loop(qemu: QEMU) -> None:
    """The blocking methods work when called from a coroutine. (The
    original runs its own loop with run_until_complete: RuntimeError.)"""
    client = QEMUMonitorProtocol(qemu.path)
    try:
        assert_greeting(client.connect())
        assert client.cmd_raw("query-name") == {"return": {}}
        assert client.cmd("stop") == {}
        stop = client.pull_event(wait=EVENT_WAIT)
        assert stop is not None
        assert stop["event"] == "STOP"
    finally:
        client.close()
    assert client.runstate is Runstate.IDLE


def test_four_threads_share_one_instance(
        legacy: QEMUMonitorProtocol, pool: ThreadPoolExecutor) -> None:
    """Four threads calling cmd_obj at once on one instance each get the
    reply to their own command. (The original's event loop cannot run
    in several threads at once.)"""

    def caller(thread: int) -> list[str]:
        wrong = []
        for index in range(100):
            name = f"nonexistent-{thread}-{index}"
            reply = legacy.cmd_obj({"execute": name})
            if reply != {"error": {
                    "class": "CommandNotFound",
                    "desc": f"The command {name} has not been found"}}:
                wrong.append(f"{name}: {reply}")
        return wrong

    callers = [pool.submit(caller, thread) for thread in range(4)]
    assert [future.result(timeout=30) for future in callers] == [[]] * 4


# ----------------------------------------------------------------------
# A forgotten instance.


def test_dropped_instance_warns_and_releases_its_socket(
        peer: FakeConnection, pool: ThreadPoolExecutor) -> None:
    """An instance garbage-collected without close() warns with a
    ResourceWarning and hangs up: the server sees the end of stream."""
    client = QEMUMonitorProtocol(peer.client_sock)
    connect_to_peer(client, peer, pool)
    with pytest.warns(ResourceWarning, match="without close"):
        del client
        gc.collect()
    assert peer.at_eof()
