"""
The edges of the thread boundary: bad timeouts, close() racing the
blocking calls of other threads, commands withdrawn when their caller
gave up, a prompt close, deep nesting, non-string keys, the memory and
the cap of the event queue, and state errors that name one state.

Real QEMU where QEMU is the peer; the scripted `FakeConnection` for what
QEMU will not do on demand.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import itertools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest
from peers import QEMU, blocked_in_call, peer_client, qemu_client

from qmp_sync import (
    ConnectError,
    ExecInterruptedError,
    QMPSyncClient,
    Runstate,
    StateError,
)
from qmp_sync._event_queue import BlockingListener
from qmp_sync.fake_server import FakeConnection
from qmp_sync.legacy import QEMUMonitorProtocol
from qmp_sync.protocol import AsyncProtocol
from qmp_sync.qmp_client import ServerParseError

# Upper bound of any single wait in these tests.
BOUND = 10.0


def running(path: str) -> bool:
    """Whether QEMU's VM is running, asked on a connection of its own."""
    with qemu_client(path) as client:
        status = client.execute("query-status", timeout=BOUND)
    assert isinstance(status, dict)
    return bool(status["running"])


# ----------------------------------------------------------------------
# 1. Bad timeouts are refused before anything happens.

NAN = math.nan


def test_nan_timeouts_are_value_errors_and_send_nothing(qemu: QEMU) -> None:
    """NaN as a timeout or wait is a ValueError at once (it used to spin
    a core forever, or time out after sending): QEMU never sees the
    command."""
    with qemu_client(qemu.path) as client:
        with pytest.raises(ValueError, match="NaN"):
            client.execute("stop", timeout=NAN)
        with pytest.raises(ValueError, match="NaN"):
            client.pull_event(wait=NAN)
        with pytest.raises(ValueError, match="NaN"):
            client.get_events(wait=NAN)
        with pytest.raises(ValueError, match="NaN"):
            client.event_wait("STOP", timeout=NAN)
        with pytest.raises(ValueError, match="NaN"):
            client.execute_msg({"execute": "stop"}, timeout=NAN)
        with client.listen() as listener, pytest.raises(ValueError):
            listener.get(timeout=NAN)
        with pytest.raises(ValueError, match="negative"):
            client.execute("stop", timeout=-1)
        assert client.runstate is Runstate.RUNNING
        assert client.get_events() == []
    assert running(qemu.path)


def test_nan_timeouts_of_connect_and_accept(tmp_path: Path) -> None:
    """connect() and accept() refuse NaN too, leaving the client as it
    was."""
    client = QMPSyncClient(str(tmp_path / "nobody"))
    with pytest.raises(ValueError, match="NaN"):
        client.connect(timeout=NAN)
    with pytest.raises(ValueError, match="NaN"):
        client.connect(retry_until=NAN)
    assert client.runstate is Runstate.IDLE
    client.start_server(str(tmp_path / "listen"))
    with pytest.raises(ValueError, match="NaN"):
        client.accept(timeout=NAN)
    assert client.runstate is Runstate.CONNECTING
    client.close()
    assert client.runstate is Runstate.IDLE


def test_legacy_nan_is_refused(qemu: QEMU) -> None:
    """The legacy class: pull_event(wait=nan) and settimeout(nan)."""
    with QEMUMonitorProtocol(qemu.path) as legacy:
        legacy.connect()
        with pytest.raises(ValueError, match="NaN"):
            legacy.pull_event(wait=NAN)
        with pytest.raises(ValueError, match="NaN"):
            legacy.settimeout(NAN)
        legacy.settimeout(math.inf)
        assert legacy.cmd("query-status")["running"] is True  # type: ignore


@pytest.mark.parametrize("huge", [math.inf, 1e300, 10**400])
def test_huge_timeouts_mean_no_limit(
        qemu: QEMU, pool: concurrent.futures.ThreadPoolExecutor,
        huge: float) -> None:
    """Infinity and values beyond what the platform can wait mean "no
    limit", for commands and for waits that really wait (1e300 used to
    be an OverflowError)."""
    with qemu_client(qemu.path) as client:
        for wait in (client.pull_event, client.get_events):
            waiting = pool.submit(wait, huge)
            blocked_in_call(waiting, "take")  # type: ignore[arg-type]
            assert client.execute("stop", timeout=huge) == {}
            assert waiting.result(BOUND)
            client.execute("cont", timeout=huge)
            assert client.event_wait("RESUME", timeout=huge)
        waiting = pool.submit(client.event_wait, "STOP", huge)
        blocked_in_call(waiting, "take")  # type: ignore[arg-type]
        client.execute("stop", timeout=huge)
        assert waiting.result(BOUND)["event"] == "STOP"


# ----------------------------------------------------------------------
# 2 and 3. close() from another thread ends accept() and connect().

@pytest.mark.parametrize("timeout", [None, 60.0])
def test_close_ends_a_blocked_accept(
        tmp_path: Path, pool: concurrent.futures.ThreadPoolExecutor,
        timeout: float | None) -> None:
    """accept() blocked in another thread, with or without a timeout,
    ends at once with ConnectError when close() is called; the socket
    file is gone and the client IDLE (it used to stay blocked, or wake at
    its timeout claiming to be "still listening")."""
    path = tmp_path / "listen.sock"
    client = QMPSyncClient()
    client.start_server(str(path))
    accepting = pool.submit(client.accept, timeout=timeout)
    blocked_in_call(accepting)  # type: ignore[arg-type]
    client.close()
    with pytest.raises(ConnectError, match=r"disconnect|close") as info:
        accepting.result(BOUND)
    assert "accept" in str(info.value)
    assert client.runstate is Runstate.IDLE
    assert not path.exists()


def test_close_ends_connect_retrying(
        tmp_path: Path, pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """connect(retry_until=...) in another thread, retrying a socket
    that does not exist yet, ends with ConnectError when close() is
    called, and stays IDLE when the socket appears (it used to connect
    later, leaving RUNNING a client its user had closed)."""
    path = tmp_path / "later.sock"
    client = QMPSyncClient(str(path))
    connecting = pool.submit(client.connect, retry_until=60)
    blocked_in_call(connecting)  # type: ignore[arg-type]
    client.close()
    with pytest.raises(ConnectError, match=r"disconnect|close"):
        connecting.result(BOUND)
    assert client.runstate is Runstate.IDLE
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(0)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody came
    assert client.runstate is Runstate.IDLE


# ----------------------------------------------------------------------
# 4. A command reported as failed is never sent later.

def test_timed_out_commands_are_withdrawn(
        peer: FakeConnection,
        pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """To a server that stops reading, 100 kB commands that time out
    before they are written are withdrawn: when the server reads again
    it receives only the few the client had written, then the next
    command, which gets its reply (they all used to be sent)."""
    client = peer_client(peer, pool)
    big = "x" * 100_000
    for number in range(60):
        with pytest.raises(TimeoutError):
            client.execute("big", {"n": number, "data": big}, timeout=0.01)
    answering = pool.submit(client.execute, "query-status", timeout=BOUND)
    names = []
    while True:
        command = peer.recv()
        names.append(command["execute"])
        if command["execute"] == "query-status":
            peer.send({"return": {"ok": True}, "id": command["id"]})
            break
    assert answering.result(BOUND) == {"ok": True}
    written = names.count("big")
    # The socket's buffers and the transport's hold a few.
    assert written < 10, written
    numbers = [cmd["arguments"]["n"] for cmd in peer.received
               if cmd["execute"] == "big"]
    assert numbers == list(range(written))
    client.close()


def test_stopped_qemu_runs_only_what_was_written(qemu: QEMU) -> None:
    """Against a SIGSTOPped QEMU, commands that timed out and had not
    been written are never run after SIGCONT (they all used to be)."""
    count = 300
    filler = "s" * 4000
    with qemu_client(qemu.path) as client:
        os.kill(qemu.pid, signal.SIGSTOP)
        try:
            for number in range(count):
                with pytest.raises(TimeoutError):
                    client.execute("object-add", {
                        "qom-type": "secret", "id": f"s{number}",
                        "data": filler}, timeout=0.002)
        finally:
            os.kill(qemu.pid, signal.SIGCONT)
        objects = client.execute("qom-list", {"path": "/objects"},
                                 timeout=BOUND)
    assert isinstance(objects, list)
    created = sorted(int(o["name"][1:]) for o in objects
                     if o["name"].startswith("s"))
    # What reached QEMU's socket ran, in order; the rest never did.
    assert created == list(range(len(created)))
    assert len(created) < count


def test_interrupted_command_is_withdrawn(
        peer: FakeConnection,
        pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """A KeyboardInterrupt while a command waits behind unwritten data
    withdraws it: the server never receives it."""
    client = peer_client(peer, pool)
    big = "x" * 100_000
    # Fill the socket and the transport; the writer then waits for the
    # server to read, and what comes next stays queued.
    for number in range(10):
        with pytest.raises(TimeoutError):
            client.execute("big", {"n": number, "data": big}, timeout=0.01)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        # Delivered to this (the main) thread while it waits.
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            client.execute("interrupted", timeout=BOUND)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    answering = pool.submit(client.execute, "last", timeout=BOUND)
    while True:
        command = peer.recv()
        if command["execute"] == "last":
            peer.send({"return": {}, "id": command["id"]})
            break
    answering.result(BOUND)
    assert "interrupted" not in [cmd["execute"] for cmd in peer.received]
    client.close()


def test_unsent_commands_do_not_pile_up(
        peer: FakeConnection,
        pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """Commands that time out to a server that does not read hold no
    memory afterwards (300 of 100 kB used to keep some 30 MB)."""
    client = peer_client(peer, pool)
    big = "x" * 100_000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            with pytest.raises(TimeoutError):
                client.execute("big", {"data": big}, timeout=0.002)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 3_000_000, grown
    client.close()


# ----------------------------------------------------------------------
# 5. close() is prompt whatever the peer does.

def test_close_is_prompt_with_unwritten_data(
        qemu: QEMU, pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """With a 4 MiB command in the write buffer and QEMU SIGSTOPped,
    close() drops the unwritten data and returns at once (it used to
    take the whole 5 s close timeout); the command in flight ends with
    ExecInterruptedError."""
    client = qemu_client(qemu.path)
    os.kill(qemu.pid, signal.SIGSTOP)
    try:
        sending = pool.submit(client.execute, "object-add", {
            "qom-type": "secret", "id": "big", "data": "x" * (4 << 20)})
        blocked_in_call(sending)  # type: ignore[arg-type]
        closing = pool.submit(client.close)
        # Well inside the 5 s a flush would be given.
        closing.result(2.0)
        with pytest.raises(ExecInterruptedError):
            sending.result(BOUND)
    finally:
        os.kill(qemu.pid, signal.SIGCONT)
    assert client.runstate is Runstate.IDLE


# ----------------------------------------------------------------------
# 6 and 7. Deep nesting and non-string keys.

def test_deeply_nested_server_line_is_a_parse_error(
        peer: FakeConnection,
        pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """A server line nested 100,000 deep ends the session with
    ServerParseError (it used to be a RecursionError): the call in
    flight is interrupted by it, and close() re-raises it once."""
    client = peer_client(peer, pool)
    waiting = pool.submit(client.execute, "query-status", timeout=BOUND)
    peer.recv()
    peer.send(b'{"return": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    with pytest.raises(ExecInterruptedError) as info:
        waiting.result(BOUND)
    assert isinstance(info.value.__cause__, ServerParseError)
    assert "nested too deeply" in str(info.value.__cause__)
    with pytest.raises(ServerParseError):
        client.close()
    client.close()
    assert client.runstate is Runstate.IDLE


def test_deeply_nested_arguments_are_value_errors(qemu: QEMU) -> None:
    """Arguments nested beyond what can be encoded are a ValueError with
    nothing sent; the session stays usable."""
    deep: object = "bottom"
    for _ in range(100_000):
        deep = [deep]
    with qemu_client(qemu.path) as client:
        with pytest.raises(ValueError, match="nested too deeply"):
            client.execute("stop", {"a": deep})
        with pytest.raises(ValueError, match="nested too deeply"):
            client.execute_msg({"execute": "stop", "arguments": {"a": deep}})
        assert client.execute("query-status")["running"] is True  # type: ignore


def test_non_string_keys_at_any_depth_are_type_errors(qemu: QEMU) -> None:
    """A key that is not a string, at any depth, is a TypeError before
    sending ({"a": {1: "/"}} used to go out as {"a": {"1": "/"}})."""
    with qemu_client(qemu.path) as client:
        for arguments in ({"a": {1: "/"}}, {"a": [{"b": {(1, 2): 0}}]},
                          {"a": {None: 1}}):
            with pytest.raises(TypeError, match="keys must be str"):
                client.execute("stop", arguments)  # type: ignore[arg-type]
        assert client.execute("query-status")["running"] is True  # type: ignore


def test_match_that_cannot_match_is_a_type_error(qemu: QEMU) -> None:
    """event_wait(match=5) is a TypeError at once, not a silent wait
    for the whole timeout."""
    with qemu_client(qemu.path) as client:
        with pytest.raises(TypeError, match="mapping or None"):
            client.event_wait("STOP", timeout=60, match=5)  # type: ignore
        with pytest.raises(TypeError, match="mapping or None"):
            client.events_wait([("STOP", None), ("RESUME", "x")])


def test_shell_deep_dotted_key_is_one_error_line(qemu: QEMU) -> None:
    """In qmp-shell, a dotted key 1,200 levels deep is one error line,
    and the script's next line runs (it used to print a traceback and
    abandon the script)."""
    key = ".".join(["file"] * 1200)
    script = (f"blockdev-add {key}=x\n"
              "blockdev-add driver=raw file=" + "[" * 5000 + "]" * 5000
              + "\nquery-status\n")
    run = subprocess.run(
        [sys.executable, "-m", "qmp_sync.shell", qemu.path],
        input=script, capture_output=True, text=True, timeout=BOUND * 3,
        check=False)
    errors = run.stderr.splitlines()
    assert len(errors) == 2, run.stderr[:2000]
    assert all(line.startswith("Error: ") and "nested too deeply" in line
               for line in errors), errors
    assert len(errors[1]) < 200
    assert json.loads(run.stdout)["return"]["running"] is True
    assert "Traceback" not in run.stderr


# ----------------------------------------------------------------------
# 8. The event queue: memory in proportion, and an opt-in cap.

def send_events(peer: FakeConnection, count: int) -> int:
    """Have `peer` send `count` events like QEMU's, then a reply to
    the command it reads first; returns the bytes of one event."""
    line = (b'{"timestamp": {"seconds": 1764510000, "microseconds": '
            b'123456}, "event": "BLOCK_JOB_READY", "data": {"device": '
            b'"job0", "len": 1048576}}\n')
    command = peer.recv()
    peer.sock.sendall(line * count)
    peer.send({"return": {}, "id": command["id"]})
    return len(line)


def test_queued_events_cost_in_proportion(
        peer: FakeConnection,
        pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """100,000 unread events hold at most 4x their size on the wire
    (they used to hold some 13x), and come out unchanged, in order."""
    client = peer_client(peer, pool)
    count = 100_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        replied = pool.submit(client.execute, "burst", timeout=60)
        size = send_events(peer, count)
        replied.result(60)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / count <= 4 * size, (held / count, size)
    events = client.get_events()
    assert len(events) == count
    assert all(event["data"] == {"device": "job0", "len": 1048576}
               and event["timestamp"]["microseconds"] == 123456
               for event in events)
    client.close()


def test_event_cap_drops_the_oldest_counted_and_logged(
        peer: FakeConnection, pool: concurrent.futures.ThreadPoolExecutor,
        caplog: pytest.LogCaptureFixture) -> None:
    """With max_queued_events=100, 1,000 unread events leave the newest
    100 queued, in order; dropped_events says 900, and one warning was
    logged for the overflow."""
    client = peer_client(peer, pool, max_queued_events=100)
    assert client.dropped_events == 0
    with caplog.at_level(logging.WARNING, logger="qmp_sync"):
        replied = pool.submit(client.execute, "burst", timeout=BOUND)
        command = peer.recv()
        peer.sock.sendall(b"".join(
            json.dumps({"event": "E", "data": {"n": n}}).encode() + b"\n"
            for n in range(1000)))
        peer.send({"return": {}, "id": command["id"]})
        replied.result(BOUND)
    assert client.dropped_events == 900
    assert [e["data"]["n"] for e in client.get_events()] == list(
        range(900, 1000))
    warnings = [r for r in caplog.records if "queue full" in r.message]
    assert len(warnings) == 1
    client.close()


def test_event_cap_is_checked() -> None:
    """A cap that is not a positive int is a ValueError."""
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="cap"):
            QMPSyncClient(max_queued_events=bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------
# 9. A StateError names one state.

def test_state_errors_under_races_name_one_state(
        qemu: QEMU, pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """While one thread connects and closes in a loop, calls in other
    threads that meet the wrong state get a StateError whose message
    names the state it carries, never RUNNING when RUNNING is what the
    call needs."""
    client = QMPSyncClient(qemu.path)
    stop = threading.Event()
    messages: list[StateError] = []

    def churn() -> None:
        try:
            for _ in range(100):
                with contextlib.suppress(ConnectError, StateError):
                    client.connect(timeout=BOUND)
                client.close()
        finally:
            stop.set()

    def call() -> None:
        while not stop.is_set():
            try:
                client.execute("query-status", timeout=BOUND)
                client.pull_event(wait=0.001)
            except StateError as err:
                messages.append(err)
            except (ExecInterruptedError, TimeoutError):
                pass

    callers = [pool.submit(call) for _ in range(3)]
    churn()
    for caller in callers:
        caller.result(BOUND)
    assert messages, "no call met the wrong state"
    for err in messages:
        assert err.state is not err.required, err
        assert f"runstate {err.state.name};" in str(err), err
    client.close()



class Flickering(AsyncProtocol[object]):
    """A client whose runstate differs at every read, as it can while
    another thread connects and closes."""

    def __init__(self, *states: Runstate) -> None:
        super().__init__()
        self._states = itertools.cycle(states)

    @property  # type: ignore[override]
    def runstate(self) -> Runstate:
        return next(self._states)


def test_state_error_reads_the_state_once() -> None:
    """An event wait that finds the session gone reads the runstate
    once: the message and ``.state`` name the state it saw, even when a
    second read would say RUNNING ("already connected (runstate
    RUNNING); this call needs RUNNING" used to appear)."""
    client = Flickering(Runstate.DISCONNECTING, Runstate.RUNNING)
    queue = BlockingListener(client)
    with pytest.raises(StateError) as info:
        queue.take(None, 0.0, "pull_event()")
    assert info.value.state is Runstate.DISCONNECTING
    assert "runstate DISCONNECTING" in str(info.value)
    assert "RUNNING;" not in str(info.value)
