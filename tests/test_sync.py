"""The blocking facade, QMPSyncClient: against real QEMU, and against a
scripted fake server for the faults QEMU will not produce on demand."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from peers import QEMU, monitor_args, peer_client, qemu_client, start_qemu

from qmp_sync import (
    ConnectError,
    ExecInterruptedError,
    ExecuteError,
    QMPError,
    QMPSyncClient,
    Runstate,
    StateError,
)
from qmp_sync.fake_server import DEFAULT_GREETING as GREETING
from qmp_sync.fake_server import FakeConnection
from qmp_sync.machine import QEMUMachine
from qmp_sync.qmp_client import ServerParseError
from qmp_sync.sync import event_match

# Upper bound of any single wait in these tests.
BOUND = 10.0


# ----------------------------------------------------------------------
# Against real QEMU.

def test_connect_execute_close(qemu: QEMU) -> None:
    """connect() negotiates; execute() returns `return`; the properties
    say where the client is; close() is idempotent."""
    client = QMPSyncClient(qemu.path, name="vm0")
    assert client.runstate is Runstate.IDLE and client.greeting is None
    client.connect(timeout=BOUND)
    assert client.runstate is Runstate.RUNNING
    assert client.name == "vm0" and "vm0" in repr(client)
    assert client.greeting is not None and "oob" in str(client.greeting)
    assert client.execute("query-status") == {
        "status": "running", "singlestep": False, "running": True}
    assert client.cmd("query-name") == {}
    assert isinstance(client.execute("query-version"), dict)
    client.close()
    assert client.runstate is Runstate.IDLE
    client.close()
    client.disconnect()


def test_context_manager_and_reconnect(qemu: QEMU) -> None:
    """The context manager closes; the same client connects again."""
    with QMPSyncClient(qemu.path) as client:
        client.connect(timeout=BOUND)
        client.execute("query-status")
    assert client.runstate is Runstate.IDLE
    client.connect(timeout=BOUND)
    assert client.execute("query-status") is not None
    client.close()


def test_error_reply_keeps_session(qemu: QEMU) -> None:
    """An error reply raises ExecuteError with QEMU's class and text; the
    session goes on."""
    with QMPSyncClient(qemu.path) as client:
        client.connect(timeout=BOUND)
        with pytest.raises(ExecuteError) as info:
            client.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert "no-such-command" in str(info.value)
        with pytest.raises(ExecuteError) as info:
            client.cmd("human-monitor-command", **{"command-line": 1})
        assert info.value.error_class == "GenericError"
        assert client.cmd("human-monitor-command", **{
            "command-line": "info status"}) == "VM status: running\r\n"


def test_event_wait_stop(qemu: QEMU) -> None:
    """event_wait finds STOP whether it came before the call or not."""
    with QMPSyncClient(qemu.path) as client:
        client.connect(timeout=BOUND)
        client.execute("stop")
        event = client.event_wait("STOP", timeout=BOUND)
        assert event["event"] == "STOP" and "timestamp" in event
        client.execute("cont")
        assert client.event_wait("RESUME", timeout=BOUND)["event"] == "RESUME"
        assert client.get_events() == []


def test_events_queue_while_idle_in_order(qemu2: QEMU) -> None:
    """Events sent while the caller does nothing are all queued, in
    order (STOP/RESUME bursts caused from a second monitor)."""
    with QMPSyncClient(qemu2.paths[0]) as idle, \
            QMPSyncClient(qemu2.paths[1]) as other:
        idle.connect(timeout=BOUND)
        other.connect(timeout=BOUND)
        for _ in range(25):
            other.execute("stop")
            other.execute("cont")
        names: list[object] = []
        while len(names) < 50:
            names.append(idle.pull_event(wait=BOUND)["event"])  # type: ignore[index]
        assert names == ["STOP", "RESUME"] * 25
        assert idle.pull_event() is None


def test_events_queue_while_in_execute(qemu2: QEMU) -> None:
    """Events that arrive while the caller waits in execute() are
    queued too, none lost, order kept."""
    with QMPSyncClient(qemu2.paths[0]) as busy, \
            QMPSyncClient(qemu2.paths[1]) as other:
        busy.connect(timeout=BOUND)
        other.connect(timeout=BOUND)
        done = threading.Event()

        def toggle() -> None:
            try:
                for _ in range(20):
                    other.execute("stop")
                    other.execute("cont")
            finally:
                done.set()

        toggler = threading.Thread(target=toggle)
        toggler.start()
        calls = 0
        while not done.is_set() or calls < 50:
            busy.execute("query-status")
            calls += 1
        toggler.join(BOUND)
        names = [busy.pull_event(wait=BOUND)["event"]  # type: ignore[index]
                 for _ in range(40)]
        assert names == ["STOP", "RESUME"] * 20


def test_threads_share_one_client(qemu: QEMU) -> None:
    """8 threads x 250 commands on one client: every reply goes to the
    thread that sent the command."""
    with QMPSyncClient(qemu.path) as client:
        client.connect(timeout=BOUND)

        def work(thread: int) -> int:
            for index in range(250):
                name = f"nonexistent-{thread}-{index}"
                if index % 5 == 0:
                    assert client.execute("query-status") is not None
                    continue
                try:
                    client.execute(name)
                except ExecuteError as err:
                    assert name in str(err), (name, str(err))
                else:
                    raise AssertionError(f"{name} succeeded")
            return thread

        with concurrent.futures.ThreadPoolExecutor(8) as executor:
            results = list(executor.map(work, range(8), timeout=60))
        assert results == list(range(8))


def test_fifty_clients_one_loop_thread(
        qemu_machine: Callable[..., QEMUMachine], tmp_path: Path) -> None:
    """50 clients (one QEMU with 50 monitors) share the one loop
    thread."""
    args, paths = monitor_args(tmp_path, 50)
    vm = qemu_machine(*args)
    clients = [QMPSyncClient(path) for path in paths]
    try:
        for client in clients:
            client.connect(timeout=BOUND)
        for client in clients:
            assert client.execute("query-status") is not None
        loop_threads = [t for t in threading.enumerate()
                        if t.name == "qmp_sync loop"]
        assert len(loop_threads) == 1
        clients[0].execute("stop")
        for client in clients:
            assert client.event_wait("STOP", timeout=BOUND)
    finally:
        for client in clients:
            client.close()
        vm.kill()


def test_sigkill_interrupts_commands_in_flight(qemu: QEMU,
                                              pool: Any) -> None:
    """QEMU killed with commands in flight: every one of them ends with
    ExecInterruptedError promptly; disconnect() returns to IDLE."""
    client = qemu_client(qemu.path)
    # A stopped QEMU reads nothing, so the commands stay in flight.
    os.kill(qemu.pid, signal.SIGSTOP)
    try:
        calls = [pool.submit(client.execute, "query-status")
                 for _ in range(8)]
        done, _ = concurrent.futures.wait(calls, timeout=0.2)
        assert not done
    finally:
        qemu.kill()
    start = time.monotonic()
    for call in calls:
        with pytest.raises(ExecInterruptedError):
            call.result(BOUND)
    assert time.monotonic() - start < 5
    client.disconnect()
    assert client.runstate is Runstate.IDLE


@pytest.mark.qemu
def test_retry_until_qemu_starts(tmp_path: Path) -> None:
    """connect(retry_until=...) waits for a QEMU that is still starting
    (its socket does not exist yet)."""
    path = str(tmp_path / "late.sock")
    proc = start_qemu("-qmp", f"unix:{path},server=on,wait=off")
    try:
        with QMPSyncClient(path) as client:
            client.connect(retry_until=BOUND, timeout=BOUND)
            assert client.execute("query-status") is not None
    finally:
        proc.kill()
        proc.wait(BOUND)


def test_retry_until_gives_up(tmp_path: Path) -> None:
    """Retrying ends with the ConnectError of the last attempt."""
    client = QMPSyncClient(str(tmp_path / "nobody.sock"))
    start = time.monotonic()
    with pytest.raises(ConnectError) as info:
        client.connect(retry_until=0.3)
    assert isinstance(info.value.exc, FileNotFoundError)
    assert 0.25 < time.monotonic() - start < BOUND
    assert client.runstate is Runstate.IDLE


@pytest.mark.qemu
def test_accept_qemu_as_client(tmp_path: Path) -> None:
    """start_server + accept take QEMU's connection; an accept() that
    times out leaves the socket listening for the next one."""
    path = str(tmp_path / "listen.sock")
    client = QMPSyncClient()
    client.start_server(path)
    assert client.runstate is Runstate.CONNECTING
    with pytest.raises(TimeoutError, match="still listening"):
        client.accept(timeout=0.1)
    assert client.runstate is Runstate.CONNECTING
    proc = start_qemu("-chardev", f"socket,id=mon,path={path}",
                      "-mon", "chardev=mon,mode=control")
    try:
        client.accept(timeout=BOUND)
        assert client.execute("query-status") is not None
        assert not os.path.exists(path)
        client.close()
    finally:
        proc.kill()
        proc.wait(BOUND)


@pytest.mark.qemu
def test_open_with_socketpair() -> None:
    """open_with_socket on one end of a socketpair handed to QEMU."""
    mine, theirs = socket.socketpair()
    proc = start_qemu("-chardev", f"socket,id=mon,fd={theirs.fileno()}",
                      "-mon", "chardev=mon,mode=control",
                      pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        with QMPSyncClient() as client:
            client.open_with_socket(mine, timeout=BOUND)
            assert client.execute("query-status") is not None
    finally:
        proc.kill()
        proc.wait(BOUND)


def test_send_fd_scm(qemu: QEMU, tmp_path: Path) -> None:
    """send_fd_scm passes an fd that getfd names and closefd closes."""
    with QMPSyncClient(qemu.path) as client, \
            open(tmp_path / "f", "wb") as passed:
        client.connect(timeout=BOUND)
        client.send_fd_scm(passed.fileno())
        assert client.cmd("getfd", fdname="mine") == {}
        assert client.cmd("closefd", fdname="mine") == {}
        with pytest.raises(OSError):
            client.send_fd_scm(10_000)
        with pytest.raises(TypeError):
            client.send_fd_scm("3")  # type: ignore[arg-type]


def test_oob_execute(qemu: QEMU) -> None:
    """oob=True sends exec-oob on a session that negotiated it."""
    with QMPSyncClient(qemu.path) as client:
        client.connect(timeout=BOUND)
        assert isinstance(client.execute("query-yank", oob=True), list)


async def test_works_inside_a_running_loop(qemu: QEMU) -> None:
    """The blocking calls work unchanged from a thread that runs its own
    event loop (IPython, Jupyter, an async program)."""
    asyncio.get_running_loop()
    with QMPSyncClient(qemu.path) as client:
        client.connect(timeout=BOUND)
        client.execute("stop")
        assert client.event_wait("STOP", timeout=BOUND)["event"] == "STOP"
        client.execute("cont")


def test_callers_own_loop(qemu: QEMU) -> None:
    """With loop=, the session lives in the caller's loop, which the
    client neither stops nor closes."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    try:
        with QMPSyncClient(qemu.path, loop=loop) as client:
            client.connect(timeout=BOUND)
            assert client.execute("query-status") is not None
        assert loop.is_running() and not loop.is_closed()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(BOUND)
        loop.close()
    with pytest.raises(QMPError, match=r"closed|not running"):
        QMPSyncClient(qemu.path, loop=loop).connect()


def test_call_from_loop_thread_fails_at_once(qemu: QEMU) -> None:
    """A blocking call from inside the loop thread (an event filter)
    raises QMPError instead of deadlocking."""
    with QMPSyncClient(qemu.path) as client:
        client.connect(timeout=BOUND)
        errors: list[BaseException] = []

        def nested(event: Any) -> bool:
            try:
                client.execute("query-status")
            except BaseException as err:
                errors.append(err)
            return True

        with client.listen("STOP", nested) as listener:
            client.execute("stop")
            assert listener.get(timeout=BOUND)["event"] == "STOP"
        assert len(errors) == 1 and isinstance(errors[0], QMPError)
        assert "deadlock" in str(errors[0])
        client.execute("cont")


def test_listen_private_listener(qemu: QEMU) -> None:
    """listen() yields a listener of its own: names filter what it gets,
    the client's queue still gets everything; iteration ends with the
    session."""
    client = qemu_client(qemu.path)
    with client.listen("RESUME") as resumes:
        client.execute("stop")
        client.execute("cont")
        assert resumes.get(timeout=BOUND)["event"] == "RESUME"
        assert resumes.empty()
        client.execute("stop")
        client.execute("cont")
        assert client.event_wait("RESUME", timeout=BOUND)
        client.close()
        assert [e["event"] for e in resumes] == ["RESUME"]
    assert [e["event"] for e in client.get_events()] == [
        "STOP", "STOP", "RESUME"]


# ----------------------------------------------------------------------
# Matching rules.

@pytest.mark.parametrize(("value", "match", "expected"), [
    ({"a": 1}, None, True),
    ({"a": 1, "b": 2}, {"a": 1}, True),
    ({"a": 1}, {"a": 2}, False),
    ({"a": 1}, {"b": None}, False),
    ({"a": 1}, {"a": None}, True),
    ({"data": {"id": "j0", "type": "mirror"}}, {"data": {"id": "j0"}}, True),
    ({"data": {"id": "j1"}}, {"data": {"id": "j0"}}, False),
    ({"data": {"id": "j0", "x": {"y": 3}}}, {"data": {"x": {"y": None}}},
     True),
    ({"data": "text"}, {"data": {"id": "j0"}}, False),
    ({"data": [1, 2]}, {"data": [1, 2]}, True),
    ({"data": [1, 2]}, {"data": [2, 1]}, False),
    ({}, {}, True),
])
def test_event_match(value: object, match: object, expected: bool) -> None:
    """QEMU's event_match rule: None matches anything, dicts match
    recursively on the keys they name, anything else compares with ==."""
    assert event_match(value, match) is expected


def test_event_wait_takes_first_match_leaves_rest(peer: FakeConnection,
                                                 pool: Any) -> None:
    """event_wait takes out only the first matching event (queued ones
    first) and leaves every other event queued, in order."""
    client = peer_client(peer, pool)
    job = {"event": "JOB_STATUS_CHANGE", "timestamp": {}}
    peer.send({**job, "data": {"id": "a", "status": "running"}},
              {**job, "data": {"id": "b", "status": "running"}},
              {"event": "STOP"},
              {**job, "data": {"id": "b", "status": "concluded"}})
    event = client.event_wait("JOB_STATUS_CHANGE", timeout=BOUND,
                              match={"data": {"id": "b", "status": None}})
    assert event["data"] == {"id": "b", "status": "running"}
    waiting = pool.submit(client.events_wait, [
        ("BLOCK_JOB_COMPLETED", {"data": {"device": "d0"}}),
        ("RESUME", None)], BOUND)
    peer.send({"event": "BLOCK_JOB_COMPLETED", "data": {"device": "d1"}},
              {"event": "BLOCK_JOB_COMPLETED", "data": {"device": "d0"}})
    assert waiting.result(BOUND)["data"] == {"device": "d0"}
    rest = [(e["event"], e.get("data")) for e in client.get_events()]
    assert rest == [
        ("JOB_STATUS_CHANGE", {"id": "a", "status": "running"}),
        ("STOP", None),
        ("JOB_STATUS_CHANGE", {"id": "b", "status": "concluded"}),
        ("BLOCK_JOB_COMPLETED", {"device": "d1"})]
    client.close()


def test_event_wait_one_deadline(peer: FakeConnection, pool: Any) -> None:
    """The timeout of event_wait is one deadline, however many other
    events keep arriving meanwhile."""
    client = peer_client(peer, pool)
    waiting = pool.submit(client.event_wait, "NEVER", 0.5)
    start = time.monotonic()
    # Keep events coming until the wait ends (bounded).
    while not waiting.done() and time.monotonic() - start < BOUND:
        peer.send({"event": "NOISE"})
        concurrent.futures.wait([waiting], timeout=0.02)
    with pytest.raises(TimeoutError, match="NEVER"):
        waiting.result(0)
    assert time.monotonic() - start < 5
    assert {e["event"] for e in client.get_events()} == {"NOISE"}
    client.close()


def test_pull_event_waits(peer: FakeConnection, pool: Any) -> None:
    """pull_event: False/0 does not wait, a number is seconds (int or
    float), True waits until an event comes."""
    client = peer_client(peer, pool)
    assert client.pull_event() is None and client.pull_event(0) is None
    assert client.get_events() == []
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        client.pull_event(wait=1)
    assert 0.9 < time.monotonic() - start < 5
    with pytest.raises(TimeoutError):
        client.get_events(wait=0.05)
    waiting = pool.submit(client.pull_event, True)
    peer.send({"event": "A"}, {"event": "B"})
    assert waiting.result(BOUND)["event"] == "A"
    assert [e["event"] for e in client.get_events(wait=True)] == ["B"]
    peer.send({"event": "C"}, {"event": "D"})
    assert client.event_wait("D", timeout=BOUND)["event"] == "D"
    assert [e["event"] for e in client.clear_events()] == ["C"]
    assert client.clear_events() == []
    client.close()


def test_get_events_wait_blocks_until_an_event(peer: FakeConnection,
                                              pool: Any) -> None:
    """get_events(wait=True) with nothing queued waits for an event
    (instead of returning an empty list), then returns all queued."""
    client = peer_client(peer, pool)
    waiting = pool.submit(client.get_events, True)
    done, _ = concurrent.futures.wait([waiting], timeout=0.2)
    assert not done
    peer.send({"event": "A"})
    assert [e["event"] for e in waiting.result(BOUND)] == ["A"]
    client.close()


def test_event_waiters_wake_when_session_ends(peer: FakeConnection,
                                             pool: Any) -> None:
    """Threads waiting for events wake with StateError when the session
    ends; already queued events are still returned."""
    client = peer_client(peer, pool)
    waiting = pool.submit(client.event_wait, "NEVER", None)
    pulling = pool.submit(client.pull_event, True)
    peer.send({"event": "LAST"})
    assert pulling.result(BOUND)["event"] == "LAST"
    peer.close()
    with pytest.raises(StateError):
        waiting.result(BOUND)
    client.disconnect()
    with pytest.raises(StateError):
        client.pull_event(wait=True)
    assert client.pull_event() is None


# ----------------------------------------------------------------------
# Timeouts, interruptions, faults and bad input.

def test_timeout_drops_late_reply(peer: FakeConnection, pool: Any) -> None:
    """A timed-out execute raises the built-in TimeoutError; the late
    reply is dropped and the next command gets its own reply."""
    client = peer_client(peer, pool)
    with pytest.raises(TimeoutError, match="'slow'"):
        client.execute("slow", timeout=0.1)
    slow = peer.recv()
    peer.send({"return": "late", "id": slow["id"]})
    calling = pool.submit(client.execute, "next", None, timeout=BOUND)
    peer.answer("mine")
    assert calling.result(BOUND) == "mine"
    assert client.runstate is Runstate.RUNNING
    client.close()


def test_concurrent_commands_out_of_order(peer: FakeConnection,
                                         pool: Any) -> None:
    """Replies that come in another order still reach their callers."""
    client = peer_client(peer, pool)
    calls = {name: pool.submit(client.execute, name)
             for name in ("one", "two", "three")}
    received = [peer.recv() for _ in range(3)]
    for cmd in reversed(received):
        peer.send({"return": cmd["execute"].upper(), "id": cmd["id"]})
    assert {name: call.result(BOUND) for name, call in calls.items()} == {
        "one": "ONE", "two": "TWO", "three": "THREE"}
    client.close()


def test_malformed_json_ends_session(peer: FakeConnection, pool: Any) -> None:
    """Garbage from the server ends the calls in flight at once with the
    cause chained; disconnect() raises it once; connecting again works."""
    client = peer_client(peer, pool)
    calling = pool.submit(client.execute, "query-status")
    peer.recv()
    peer.send(b"{not json\n")
    with pytest.raises(ExecInterruptedError) as info:
        calling.result(BOUND)
    assert isinstance(info.value.__cause__, ServerParseError)
    with pytest.raises(ServerParseError, match="malformed JSON"):
        client.disconnect()
    assert client.runstate is Runstate.IDLE
    client.disconnect()
    second = FakeConnection.socketpair()
    try:
        opening = pool.submit(client.open_with_socket, second.client_sock)
        second.handshake()
        opening.result(BOUND)
        calling = pool.submit(client.execute, "query-status")
        second.answer({"status": "running"})
        assert calling.result(BOUND) == {"status": "running"}
        client.close()
    finally:
        second.close()


def test_oversized_reply(peer: FakeConnection, pool: Any) -> None:
    """A reply over readbuflen ends the session with an error that says
    so, not a bare disconnect."""
    client = QMPSyncClient(readbuflen=1000)
    opening = pool.submit(client.open_with_socket, peer.client_sock)
    peer.handshake()
    opening.result(BOUND)
    calling = pool.submit(client.execute, "query-status")
    cmd = peer.recv()
    peer.send({"return": "x" * 2000, "id": cmd["id"]})
    with pytest.raises(ExecInterruptedError, match="1000 bytes read limit"):
        calling.result(BOUND)
    with pytest.raises(QMPError):
        client.disconnect()


def test_connect_timeout_never_greeted(peer: FakeConnection) -> None:
    """A server that never greets: connect() raises the built-in
    TimeoutError and the client is IDLE."""
    client = QMPSyncClient()
    with pytest.raises(TimeoutError, match="timed out"):
        client.open_with_socket(peer.client_sock, timeout=0.1)
    assert client.runstate is Runstate.IDLE
    assert peer.at_eof()


def test_disconnect_aborts_connect_from_another_thread(
        peer: FakeConnection, pool: Any) -> None:
    """disconnect() from another thread aborts a connect that waits for
    a greeting."""
    client = QMPSyncClient()
    opening = pool.submit(client.open_with_socket, peer.client_sock)
    deadline = time.monotonic() + BOUND
    while (client.runstate is not Runstate.CONNECTING
           and time.monotonic() < deadline):
        concurrent.futures.wait([opening], timeout=0.01)
    client.disconnect()
    with pytest.raises(ConnectError, match="disconnect"):
        opening.result(BOUND)
    assert client.runstate is Runstate.IDLE


def test_bad_input_sends_nothing(peer: FakeConnection, pool: Any) -> None:
    """Bad arguments fail before anything is sent; the session stays
    usable."""
    client = peer_client(peer, pool)
    with pytest.raises(TypeError):
        client.execute("x", {"f": object()})
    with pytest.raises(TypeError):
        client.execute(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        client.execute("x", ["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        client.execute("x", timeout="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        client.execute_msg({"arguments": {}})
    with pytest.raises(ValueError):
        client.pull_event(wait=-1)
    with pytest.raises(TypeError):
        client.events_wait(["STOP"])  # type: ignore[list-item]
    with pytest.raises(StateError):
        client.connect("/nonexistent")
    calling = pool.submit(client.execute, "ok")
    cmd = peer.answer(1)
    assert calling.result(BOUND) == 1
    assert cmd["execute"] == "ok" and len(peer.received) == 2
    client.close()
    with pytest.raises(StateError):
        client.execute("x")
    with pytest.raises(ValueError, match="address"):
        client.connect()


def test_execute_reply_and_caller_ids(peer: FakeConnection,
                                      pool: Any) -> None:
    """execute_reply returns error replies as they are, without the
    client's private id; a caller's own id stays."""
    client = peer_client(peer, pool)
    calling = pool.submit(client.execute_reply, {"execute": "bad"})
    cmd = peer.recv()
    error = {"class": "GenericError", "desc": "no"}
    peer.send({"error": error, "id": cmd["id"]})
    assert calling.result(BOUND).to_dict() == {"error": error}
    calling = pool.submit(client.execute_msg,
                          {"execute": "mine", "id": ["my", 1]})
    assert peer.answer(7)["id"] == ["my", 1]
    assert calling.result(BOUND) == 7
    client.close()


def test_dropped_client_releases_socket(peer: FakeConnection,
                                        pool: Any) -> None:
    """A client garbage-collected without close() warns and releases its
    socket."""
    client = peer_client(peer, pool)
    with pytest.warns(ResourceWarning, match="without close"):
        del client
        gc.collect()
    assert peer.at_eof()


def test_errors_are_never_asyncio_types(tmp_path: Path) -> None:
    """A failed connect raises ConnectError naming the root cause."""
    client = QMPSyncClient(str(tmp_path / "missing.sock"))
    with pytest.raises(ConnectError) as info:
        client.connect()
    assert isinstance(info.value.exc, FileNotFoundError)
    assert not type(info.value).__module__.startswith(("asyncio",
                                                        "concurrent"))


def test_greeting_is_the_servers(peer: FakeConnection, pool: Any) -> None:
    """greeting is the server's greeting; negotiate=False skips both."""
    client = peer_client(peer, pool)
    assert client.greeting is not None
    assert json.loads(bytes(client.greeting)) == GREETING
    client.close()
    mine, theirs = socket.socketpair()
    with theirs:
        client.open_with_socket(mine, negotiate=False, timeout=BOUND)
        assert client.greeting is None
        client.close()
