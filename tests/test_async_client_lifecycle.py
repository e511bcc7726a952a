"""The async client's lifetime: ``async with`` disconnects when the block
is left, however it is left; a client dropped while connected warns once,
in plain words, and hangs up (no raw asyncio or uvloop warnings)."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import textwrap
import warnings
import weakref
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from peers import QEMU, TIMEOUT, AsyncPeer, LineProtocol

from qmp_sync import ExecInterruptedError, QMPClient, Runstate
from qmp_sync.fake_server import FakeConnection
from qmp_sync.qmp_client import ServerParseError

#: The child runs from the source tree, so it imports this qmp_sync.
ROOT = Path(__file__).resolve().parent.parent
#: Longest a child program may take.
CHILD_TIMEOUT = 30.0

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
#: The event loops a bare asyncio user may run the client in.
LOOPS = [
    "asyncio",
    pytest.param("uvloop", marks=pytest.mark.skipif(
        not HAVE_UVLOOP, reason="uvloop is not installed (extra 'speed')")),
]

#: How the finaliser's warning begins, for a client named `name`.
DROPPED = "QMPClient {name!r} was garbage-collected without disconnect()"
#: What asyncio and uvloop say about what they find left open.
RAW_WORDS = ("unclosed", "loop is closed", "Task was destroyed",
             "Exception ignored")


async def connect(client: QMPClient) -> AsyncPeer:
    """Open a session of `client` with a fresh fake server."""
    fake = await AsyncPeer.create()
    await asyncio.wait_for(asyncio.gather(
        client.open_with_socket(fake.client_sock), fake.handshake()),
        TIMEOUT)
    return fake


async def wait_for_state(client: QMPClient, state: Runstate) -> None:
    """Wait (bounded) until `client` is in runstate `state`."""
    async def reached() -> None:
        while client.runstate is not state:
            await client.runstate_changed()
    await asyncio.wait_for(reached(), TIMEOUT)


def chain(error: BaseException | None) -> list[BaseException]:
    """`error` and every exception chained to it, outermost first."""
    found: list[BaseException] = []
    while error is not None and error not in found:
        found.append(error)
        error = error.__cause__ or error.__context__
    return found


class Oops(Exception):
    """The block's own error."""


# ----------------------------------------------------------------------
# async with


async def test_entering_does_not_connect() -> None:
    """``async with`` gives the client itself, still IDLE; a client can
    be used in one block after another."""
    client = QMPClient("c")
    for _ in range(2):
        async with client as entered:
            assert entered is client
            assert client.runstate is Runstate.IDLE
        assert client.runstate is Runstate.IDLE


async def test_leaving_the_block_disconnects() -> None:
    """At the end of the block the client is IDLE and has hung up."""
    async with QMPClient("c") as client:
        fake = await connect(client)
        answering = asyncio.ensure_future(fake.answer({"status": "running"}))
        assert await client.execute("query-status") == {"status": "running"}
        await answering
        assert client.runstate is Runstate.RUNNING
    assert client.runstate is Runstate.IDLE
    assert await fake.at_eof()


async def test_every_protocol_has_it() -> None:
    """``async with`` belongs to the generic core: a protocol that is not
    QMP disconnects on leaving the block too."""
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.settimeout(TIMEOUT)
        async with LineProtocol("line") as proto:
            await proto.open_with_socket(ours)
            assert proto.runstate is Runstate.RUNNING
        assert proto.runstate is Runstate.IDLE
        assert theirs.recv(1) == b""


async def test_the_blocks_exception_goes_on_alone() -> None:
    """An exception raised in the block leaves it unchanged, nothing
    chained to it, and the client IDLE and hung up."""
    with pytest.raises(Oops) as info:
        async with QMPClient("c") as client:
            fake = await connect(client)
            raise Oops
    assert chain(info.value) == [info.value]
    assert client.runstate is Runstate.IDLE
    assert await fake.at_eof()


async def test_a_session_failure_reaches_the_user_once() -> None:
    """When the session fails under a command in the block, the user
    gets the command's ExecInterruptedError with the failure as its
    cause, not the failure a second time from the disconnect."""
    with pytest.raises(ExecInterruptedError) as info:
        async with QMPClient("c") as client:
            fake = await connect(client)
            execute = asyncio.ensure_future(client.execute("query-status"))
            await fake.recv()
            await fake.send(b"garbage\n")
            await execute
    found = chain(info.value)
    assert isinstance(found[1], ServerParseError)
    assert [error for error in found
            if isinstance(error, ServerParseError)] == [found[1]]
    assert client.runstate is Runstate.IDLE


async def test_a_failure_nobody_saw_is_raised_when_the_block_ends(
        ) -> None:
    """A block that ends normally after its session failed on its own
    raises that failure, once, as disconnect() would."""
    with pytest.raises(ServerParseError, match="malformed JSON") as info:
        async with QMPClient("c") as client:
            fake = await connect(client)
            await fake.send(b"garbage\n")
            await wait_for_state(client, Runstate.DISCONNECTING)
    assert [error for error in chain(info.value)
            if isinstance(error, ServerParseError)] == [info.value]
    assert client.runstate is Runstate.IDLE


async def test_a_failure_the_block_collected_is_not_raised_again() -> None:
    """A block that called disconnect() and handled the failure it
    raised ends quietly."""
    async with QMPClient("c") as client:
        fake = await connect(client)
        await fake.send(b"garbage\n")
        await wait_for_state(client, Runstate.DISCONNECTING)
        with pytest.raises(ServerParseError):
            await client.disconnect()
    assert client.runstate is Runstate.IDLE


async def test_the_blocks_exception_wins_over_the_sessions(
        caplog: pytest.LogCaptureFixture) -> None:
    """When the block raises after the session failed for reasons of its
    own, the block's exception goes on unchained, and the session's
    failure is logged."""
    caplog.set_level(logging.DEBUG, logger="qmp_sync")
    with pytest.raises(Oops) as info:
        async with QMPClient("c") as client:
            fake = await connect(client)
            await fake.send(b"garbage\n")
            await wait_for_state(client, Runstate.DISCONNECTING)
            raise Oops
    assert chain(info.value) == [info.value]
    assert client.runstate is Runstate.IDLE
    assert any("disconnect() ended with" in record.getMessage()
               and "ServerParseError" in record.getMessage()
               for record in caplog.records)


async def test_a_cancelled_block_disconnects() -> None:
    """Cancelling the task while the block waits for a reply ends the
    session: the task ends cancelled, the client IDLE and hung up."""
    client = QMPClient("c")
    peers: list[AsyncPeer] = []
    waiting = asyncio.Event()

    async def user() -> None:
        async with client:
            peers.append(await connect(client))
            execute = asyncio.ensure_future(client.execute("stop"))
            await peers[0].recv()
            waiting.set()
            await execute

    task = asyncio.ensure_future(user())
    await asyncio.wait_for(waiting.wait(), TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert client.runstate is Runstate.IDLE
    assert await peers[0].at_eof()


class SlowToClose(QMPClient):
    """A client whose disconnect waits at `gate` before closing."""

    def __init__(self) -> None:
        super().__init__("slow")
        self.gate: asyncio.Future[None] | None = None

    async def _bh_disconnect(self) -> None:
        if self.gate is not None:
            await self.gate
        await super()._bh_disconnect()


@pytest.mark.parametrize("block_ends", ["normally", "cancelled"])
async def test_cancelled_while_disconnecting_still_ends_idle(
        block_ends: str) -> None:
    """A cancellation that comes while the block's disconnect is under
    way waits for it: the task ends cancelled, the client IDLE."""
    client = SlowToClose()
    client.gate = asyncio.get_running_loop().create_future()
    connected, leave = asyncio.Event(), asyncio.Event()

    async def user() -> None:
        async with client:
            await connect(client)
            connected.set()
            await leave.wait()

    task = asyncio.ensure_future(user())
    await asyncio.wait_for(connected.wait(), TIMEOUT)
    if block_ends == "normally":
        leave.set()
    else:
        task.cancel()
    await wait_for_state(client, Runstate.DISCONNECTING)
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)  # let the task run: it must keep waiting
    assert not task.done()
    client.gate.set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert client.runstate is Runstate.IDLE


async def test_async_with_against_qemu(qemu: QEMU) -> None:
    """Against QEMU, each block's session ends with the block: QEMU
    (one client per monitor) serves the next block's client at once."""
    for _ in range(2):
        async with QMPClient("vm") as client:
            await asyncio.wait_for(client.connect(qemu.path), TIMEOUT)
            status = await asyncio.wait_for(
                client.execute("query-status"), TIMEOUT)
            assert isinstance(status, dict) and status["running"]
        assert client.runstate is Runstate.IDLE


# ----------------------------------------------------------------------
# Dropped without disconnect()


def run_in(loop_kind: str,
           main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` (bounded) in a new event loop of `loop_kind`, then
    close the loop."""
    if loop_kind == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), TIMEOUT))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


@pytest.fixture
def fake() -> Iterator[FakeConnection]:
    """A fake server's end of a socketpair, hung up after the test."""
    connection = FakeConnection.socketpair(TIMEOUT)
    try:
        yield connection
    finally:
        connection.close()


async def collect(gone: weakref.ref[QMPClient]) -> list[str]:
    """
    Collect garbage until the client behind `gone` is collected (its
    teardown may still be running in the loop: let the loop run between
    tries, a bounded number of times); return the text of every warning
    that caused.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(1000):
            gc.collect()
            if gone() is None:
                break
            await asyncio.sleep(0)  # a pass of the loop, not a delay
    assert gone() is None, "the client was never collected"
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def quiet_collect() -> None:
    """Collect the garbage earlier tests left (theirs to report), so that
    what a test collects next is its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_dropped_while_connected_warns_once_and_hangs_up(
        loop_kind: str, fake: FakeConnection,
        caplog: pytest.LogCaptureFixture) -> None:
    """A connected client garbage-collected while its loop runs warns
    once, naming itself and the cure, and aborts its connection; asyncio
    and uvloop report nothing of their own."""
    async def main() -> None:
        quiet_collect()
        client = QMPClient("dropped")
        await asyncio.gather(client.open_with_socket(fake.client_sock),
                             asyncio.to_thread(fake.handshake))
        gone = weakref.ref(client)
        del client
        found = await collect(gone)
        assert len(found) == 1, found
        assert found[0].startswith(
            "ResourceWarning: " + DROPPED.format(name="dropped")
            + " (runstate RUNNING); its connection was aborted."), found
        assert "disconnect()" in found[0]
        assert "async with QMPClient(...) as client:" in found[0]
        assert await asyncio.to_thread(fake.at_eof)

    run_in(loop_kind, main)
    assert not [record for record in caplog.records
                if record.name.startswith("asyncio")]


def test_dropped_after_the_session_ended_warns(
        fake: FakeConnection) -> None:
    """A client whose session ended by itself and was never collected
    with disconnect() warns too, with its runstate."""
    async def main() -> None:
        quiet_collect()
        client = QMPClient("ended")
        await asyncio.gather(client.open_with_socket(fake.client_sock),
                             asyncio.to_thread(fake.handshake))
        fake.close()
        await wait_for_state(client, Runstate.DISCONNECTING)
        gone = weakref.ref(client)
        del client
        found = await collect(gone)
        assert found == [
            "ResourceWarning: " + DROPPED.format(name="ended")
            + " (runstate DISCONNECTING). Await its disconnect() when "
            "done with it, or use 'async with QMPClient(...) as client:', "
            "which disconnects when the block is left"], found

    run_in("asyncio", main)


def test_disconnected_client_is_dropped_quietly(
        fake: FakeConnection) -> None:
    """A client that was disconnected is collected without a word."""
    async def main() -> None:
        quiet_collect()
        client = QMPClient("done")
        await asyncio.gather(client.open_with_socket(fake.client_sock),
                             asyncio.to_thread(fake.handshake))
        await client.disconnect()
        gone = weakref.ref(client)
        del client
        assert await collect(gone) == []

    run_in("asyncio", main)


def test_a_facade_warns_in_its_own_name(fake: FakeConnection) -> None:
    """A client that a facade owns (it set ``error_name``, as
    QMPSyncClient does) leaves the warning to the facade, but still
    hangs up."""
    async def main() -> None:
        quiet_collect()
        client = QMPClient("owned")
        client.error_name = "Facade"
        await asyncio.gather(client.open_with_socket(fake.client_sock),
                             asyncio.to_thread(fake.handshake))
        gone = weakref.ref(client)
        del client
        assert await collect(gone) == []
        assert await asyncio.to_thread(fake.at_eof)

    run_in("asyncio", main)


#: A child program: a bare asyncio user of QMPClient (argv: the scenario
#: and the loop), against a fake server in the same process.
CHILD = '''
import asyncio
import sys

from qmp_sync import QMPClient
from qmp_sync.fake_server import FakeQMPServer

scenario, loop_kind = sys.argv[1:]
server = FakeQMPServer()
server.reply("query-status", {"status": "running", "running": True})
kept = []


async def main():
    client = QMPClient("forgotten")
    if scenario == "async-with":
        async with client:
            await client.connect(server.address)
            assert (await client.execute("query-status"))["running"]
        return
    await client.connect(server.address)
    assert (await client.execute("query-status"))["running"]
    if scenario == "kept":
        kept.append(client)  # alive until exit


if loop_kind == "asyncio":
    asyncio.run(main())
else:
    import uvloop
    if hasattr(asyncio, "Runner"):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(main())
server.close()
print("RAN")
'''


def run_child(scenario: str,
              loop_kind: str) -> subprocess.CompletedProcess[str]:
    """Run `CHILD` in development mode with every ResourceWarning shown
    (each time it is issued, so that a second one would show too)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONWARNINGS", "QMP_SYNC_LOOP")}
    return subprocess.run(
        [sys.executable, "-X", "dev", "-W", "always::ResourceWarning",
         "-c", textwrap.dedent(CHILD), scenario, loop_kind],
        cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT,
        env=env)


@pytest.mark.parametrize("scenario", ["local", "kept"])
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_forgotten_client_warns_once_in_plain_words(
        loop_kind: str, scenario: str) -> None:
    """A client never disconnected, under asyncio.run (the stock loop or
    uvloop): collected after the run ('local') or at exit ('kept'), it
    warns exactly once, in our words; neither asyncio nor uvloop reports
    an unclosed transport, stream or socket, or a pending task."""
    child = run_child(scenario, loop_kind)
    report = f"stdout:\n{child.stdout}\nstderr:\n{child.stderr}"
    assert child.returncode == 0, report
    assert "RAN" in child.stdout.split(), report
    warning = DROPPED.format(name="forgotten") + " (runstate RUNNING)"
    assert child.stderr.count(warning) == 1, report
    assert child.stderr.count("ResourceWarning") == 1, report
    for words in RAW_WORDS:
        assert words not in child.stderr, report


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_async_with_leaves_nothing_behind(loop_kind: str) -> None:
    """The same program with ``async with``: not one warning."""
    child = run_child("async-with", loop_kind)
    report = f"stdout:\n{child.stdout}\nstderr:\n{child.stderr}"
    assert child.returncode == 0, report
    assert "RAN" in child.stdout.split(), report
    assert "Warning" not in child.stderr, report
    for words in RAW_WORDS:
        assert words not in child.stderr, report
