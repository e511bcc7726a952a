"""
The push reader: `LineReader` on its own (lines split across chunks,
the limit, the end of the stream), and the two ways a protocol reads
(pushed lines for `QMPClient`, the reader task for a subclass that
overrides the async hooks), which must behave alike.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from qmp_sync import ExecInterruptedError, Message, QMPClient, Runstate
from qmp_sync._linereader import LineReader, LineTooLong, PushTarget
from qmp_sync.fake_server import DEFAULT_GREETING as GREETING
from qmp_sync.protocol import MessageTooLargeError
from qmp_sync.qmp_client import ServerParseError


class Recorder(PushTarget):
    """Records what a `LineReader` pushes."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.lines: list[bytes] = []
        self.chunks = 0
        self.failures: list[BaseException] = []
        self.fail_on = fail_on

    def line_received(self, line: bytes) -> None:
        if line == self.fail_on:
            raise ValueError("bad line")
        self.lines.append(line)

    def chunk_done(self) -> None:
        self.chunks += 1

    def push_failed(self, error: BaseException) -> None:
        self.failures.append(error)


async def test_lines_split_and_joined_across_chunks() -> None:
    """Lines come out whole and in order however the chunks cut them;
    chunk_done follows each chunk."""
    reader = LineReader(100)
    target = Recorder()
    reader.feed_data(b"early\n")  # before pushing: kept
    reader.push_to(target)
    for chunk in (b"a\nb", b"c", b"\nd\ne\n", b"", b"f"):
        reader.feed_data(chunk)
    assert target.lines == [b"early\n", b"a\n", b"bc\n", b"d\n", b"e\n"]
    reader.feed_eof()
    assert target.lines[-1] == b"f"  # the unfinished line, at the end
    assert len(target.failures) == 1
    assert isinstance(target.failures[0], EOFError)


async def test_limit_in_push_mode() -> None:
    """A line over the limit fails the pushing, whether it comes whole
    or grows across chunks; nothing after it is delivered."""
    for chunks in ([b"x" * 11 + b"\n"], [b"x" * 6, b"x" * 6], [b"ok\n" +
                                                             b"x" * 20]):
        reader = LineReader(10)
        target = Recorder()
        reader.push_to(target)
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_data(b"later\n")
        assert b"later\n" not in target.lines
        assert len(target.failures) == 1
        assert isinstance(target.failures[0], LineTooLong)


async def test_a_failing_line_stops_the_pushing() -> None:
    """An exception from the callback is reported once; the rest of the
    chunk and later chunks are dropped."""
    reader = LineReader(100)
    target = Recorder(fail_on=b"bad\n")
    reader.push_to(target)
    reader.feed_data(b"one\nbad\ntwo\n")
    reader.feed_data(b"three\n")
    reader.feed_eof()
    assert target.lines == [b"one\n"]
    assert [str(e) for e in target.failures] == ["bad line"]


async def test_stop_pushing_drops_later_data() -> None:
    reader = LineReader(100)
    target = Recorder()
    reader.push_to(target)
    reader.feed_data(b"one\n")
    reader.stop_pushing()
    reader.feed_data(b"two\n")
    reader.feed_eof()
    assert target.lines == [b"one\n"]
    assert target.failures == []


async def test_pull_mode_readline() -> None:
    """Before pushing, readline() reads like asyncio's: whole lines, the
    unfinished rest at the end, then b""; a stream failure is raised
    once nothing is left; an overlong line is LineTooLong."""
    reader = LineReader(10)
    reader.feed_data(b"ab\ncd")
    assert await reader.readline() == b"ab\n"
    waiting = asyncio.ensure_future(reader.readline())
    await asyncio.sleep(0)
    assert not waiting.done()
    reader.feed_data(b"\nrest")
    assert await waiting == b"cd\n"
    reader.feed_eof()
    assert await reader.readline() == b"rest"
    assert await reader.readline() == b""
    failing = LineReader(10)
    failing.set_exception(ConnectionResetError("reset"))
    with pytest.raises(ConnectionResetError):
        await failing.readline()
    long = LineReader(10)
    long.feed_data(b"x" * 20)
    with pytest.raises(LineTooLong):
        await long.readline()


# ----------------------------------------------------------------------
# Both ways of reading, on a real socket.

class TaskReadClient(QMPClient):
    """A subclass that overrides an async hook: it must get the reader
    task, and its hook must run for every message."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Message] = []

    async def _on_message(self, msg: Message) -> None:
        self.seen.append(msg)
        await super()._on_message(msg)


async def session(client: QMPClient) -> socket.socket:
    """Connect `client` to a scripted server; return the server end."""
    loop = asyncio.get_running_loop()
    mine, theirs = socket.socketpair()
    theirs.setblocking(False)
    await loop.sock_sendall(theirs, json.dumps(GREETING).encode() + b"\n")
    connecting = asyncio.ensure_future(client.open_with_socket(mine))
    negotiation = json.loads(await loop.sock_recv(theirs, 4096))
    await loop.sock_sendall(theirs, json.dumps(
        {"return": {}, "id": negotiation["id"]}).encode() + b"\n")
    await connecting
    return theirs


def pushes(client: QMPClient) -> bool:
    return client._pushes_lines()


@pytest.mark.parametrize("kind", [QMPClient, TaskReadClient])
async def test_order_and_events_on_both_paths(
        kind: type[QMPClient]) -> None:
    """Replies and events arrive in order, whole, on either path, from
    data cut at any byte."""
    client = kind()
    assert pushes(client) is (kind is QMPClient)
    theirs = await session(client)
    loop = asyncio.get_running_loop()
    with client.listener() as events:
        replies = [asyncio.ensure_future(client.execute("x", {"n": n}))
                   for n in range(20)]
        received = b""
        while received.count(b"\n") < 20:
            received += await loop.sock_recv(theirs, 65536)
        out = b""
        for line in received.splitlines():
            command = json.loads(line)
            out += json.dumps({"event": "E", "data": command["arguments"]
                               }).encode() + b"\n"
            out += json.dumps({"return": command["arguments"]["n"],
                               "id": command["id"]}).encode() + b"\n"
        for index in range(0, len(out), 7):  # 7-byte chunks
            await loop.sock_sendall(theirs, out[index:index + 7])
        assert await asyncio.gather(*replies) == list(range(20))
        assert [(await events.get())["data"]["n"]
                for _ in range(20)] == list(range(20))
    if isinstance(client, TaskReadClient):
        assert len(client.seen) == 40
    await client.disconnect()
    theirs.close()


@pytest.mark.parametrize("kind", [QMPClient, TaskReadClient])
@pytest.mark.parametrize("fault", ["partial", "garbage", "too long"])
async def test_faults_end_the_session_alike_on_both_paths(
        kind: type[QMPClient], fault: str) -> None:
    """A line cut off by the end of the stream, malformed JSON and a
    line over the read limit end the session the same way on both
    paths: the command in flight is interrupted by the error, and
    disconnect() raises it once."""
    client = kind()
    client.readbuflen = 1000
    theirs = await session(client)
    loop = asyncio.get_running_loop()
    running = asyncio.ensure_future(client.execute("x"))
    await loop.sock_recv(theirs, 4096)
    payload = {"partial": b'{"return": {}',
               "garbage": b"{nope}\n",
               "too long": b'{"return": "' + b"x" * 2000 + b'"}\n'}[fault]
    await loop.sock_sendall(theirs, payload)
    if fault == "partial":
        theirs.shutdown(socket.SHUT_WR)
    expected = (MessageTooLargeError if fault == "too long"
                else ServerParseError)
    with pytest.raises(ExecInterruptedError) as info:
        await running
    assert isinstance(info.value.__cause__, expected)
    with pytest.raises(expected):
        await client.disconnect()
    await client.disconnect()
    assert client.runstate is Runstate.IDLE
    theirs.close()
