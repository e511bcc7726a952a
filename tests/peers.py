"""
In-process peers for the faults QEMU will not produce on demand.

`FakeQMP` is a scripted QMP server on one end of a socketpair: the test
hands the other end to the client, then says what the server does,
line by line (greet, read a command, answer, send garbage, hang up).
Everything it reads is recorded in `FakeQMP.received`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import socket
import sys
import threading
from typing import Any, ClassVar, Union

from qmp_sync.message import Message
from qmp_sync.protocol import AsyncProtocol
from qmp_sync.sync import QMPSyncClient

GREETING: dict[str, Any] = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 0, "major": 9},
                    "package": "fake"},
        "capabilities": ["oob"],
    },
}

Sendable = Union[bytes, dict[str, Any], Message]


class FakeQMP:
    """
    The server side of a socketpair, driven step by step by a test.

    Create it with `FakeQMP.create()` inside the test's event loop; give
    ``client_sock`` to the client.
    """

    def __init__(self, client_sock: socket.socket,
                 reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.client_sock = client_sock
        self.reader = reader
        self.writer = writer
        #: Every message read from the client, in order.
        self.received: list[dict[str, Any]] = []

    #: Every FakeQMP still open in this test; see `close_all`.
    _open: ClassVar[list[FakeQMP]] = []

    @classmethod
    async def create(cls) -> FakeQMP:
        """Make the socketpair and open the server end."""
        client_sock, server_sock = socket.socketpair()
        reader, writer = await asyncio.open_connection(
            sock=server_sock, limit=64 << 20)
        fake = cls(client_sock, reader, writer)
        cls._open.append(fake)
        return fake

    @classmethod
    async def close_all(cls) -> None:
        """Hang up every fake server of the test (run by conftest)."""
        while cls._open:
            await cls._open.pop().close()

    async def send(self, *items: Sendable) -> None:
        """Write each item: raw bytes as they are, objects as a line."""
        for item in items:
            if isinstance(item, (bytes, bytearray)):
                self.writer.write(item)
            else:
                data = dict(item)
                self.writer.write(json.dumps(data).encode() + b"\r\n")
        await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        """Read one message from the client and record it."""
        line = await self.reader.readline()
        if not line:
            raise EOFError("the client closed the connection")
        msg = json.loads(line)
        self.received.append(msg)
        return msg

    async def answer(self, result: Any = None, **extra: Any) -> dict[str, Any]:
        """Read one command and reply ``return: result`` with its id."""
        cmd = await self.recv()
        reply = {"return": {} if result is None else result, **extra}
        if "id" in cmd:
            reply["id"] = cmd["id"]
        await self.send(reply)
        return cmd

    async def handshake(self, capabilities: tuple[str, ...] = ("oob",)
                        ) -> dict[str, Any]:
        """Greet, then answer qmp_capabilities; return that command."""
        greeting = json.loads(json.dumps(GREETING))
        greeting["QMP"]["capabilities"] = list(capabilities)
        await self.send(greeting)
        return await self.answer()

    async def close(self) -> None:
        """Hang up."""
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def at_eof(self) -> bool:
        """Wait until the client hangs up; True when it did."""
        rest = await self.reader.read()
        return rest == b"" and self.reader.at_eof()


class LineProtocol(AsyncProtocol[bytes]):
    """The smallest real protocol on the core: one message per line."""

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._inbox: asyncio.Queue[bytes] | None = None
        #: Set to an exception to make _on_message or _do_send raise it.
        self.fail_on_message: BaseException | None = None
        self.fail_on_send: BaseException | None = None
        #: Awaited by _establish_session before the session starts.
        self.hold_session: asyncio.Future[None] | None = None
        self._holding: asyncio.Event | None = None

    @property
    def inbox(self) -> asyncio.Queue[bytes]:
        """Every message received, in order (made in the loop: py3.9)."""
        if self._inbox is None:
            self._inbox = asyncio.Queue()
        return self._inbox

    @property
    def holding(self) -> asyncio.Event:
        """Set when _establish_session starts waiting for hold_session."""
        if self._holding is None:
            self._holding = asyncio.Event()
        return self._holding

    async def _establish_session(self) -> None:
        if self.hold_session is not None:
            self.holding.set()
            await self.hold_session
        await super()._establish_session()

    async def _do_recv(self) -> bytes:
        return await self._readline()

    def _do_send(self, msg: bytes) -> None:
        if self.fail_on_send is not None:
            raise self.fail_on_send
        assert self._writer is not None
        self._writer.write(msg + b"\n")

    async def _on_message(self, msg: bytes) -> None:
        if self.fail_on_message is not None:
            raise self.fail_on_message
        self.inbox.put_nowait(msg)

    def send(self, msg: bytes) -> None:
        """Queue one line for the writer task."""
        self._enqueue(msg)


class RunstateWatcher:
    """Records every runstate a protocol passes through, exactly (it
    wraps the instance's _set_state), and checks that runstate_changed()
    wakes a waiter for each change."""

    def __init__(self, proto: AsyncProtocol[Any]):
        self.proto = proto
        self.seen = [proto.runstate]
        self.woken = 0
        original = proto._set_state

        def recording_set_state(state: Any) -> None:
            if state is not proto.runstate:
                self.seen.append(state)
            original(state)

        proto._set_state = recording_set_state  # type: ignore[method-assign]
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await self.proto.runstate_changed()
            self.woken += 1

    async def stop(self) -> list[Any]:
        """Stop watching; return the runstates seen."""
        await asyncio.sleep(0)  # let the watcher take the last wake-up
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        assert self.woken >= 1, "runstate_changed() never woke"
        return self.seen


class BlockingPeer:
    """
    A scripted QMP server for tests of the blocking client: the server
    end of a socketpair, driven with plain blocking calls from the test
    thread (every read bounded by `TIMEOUT`). Give ``client_sock`` to
    the client.
    """

    #: Longest wait for the client to write something, in seconds.
    TIMEOUT = 10.0

    def __init__(self) -> None:
        self._client_sock, self.sock = socket.socketpair()
        self._handed_over = False
        self.sock.settimeout(self.TIMEOUT)
        self._stream = self.sock.makefile("rb")
        #: Every message read from the client, in order.
        self.received: list[dict[str, Any]] = []

    @property
    def client_sock(self) -> socket.socket:
        """The client's end; whoever takes it owns (and closes) it."""
        self._handed_over = True
        return self._client_sock

    def send(self, *items: Sendable) -> None:
        """Write each item: raw bytes as they are, objects as a line."""
        for item in items:
            if isinstance(item, (bytes, bytearray)):
                self.sock.sendall(item)
            else:
                self.sock.sendall(json.dumps(dict(item)).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        """Read one message from the client and record it."""
        line = self._stream.readline()
        if not line:
            raise EOFError("the client closed the connection")
        msg = json.loads(line)
        self.received.append(msg)
        return msg

    def answer(self, result: Any = None) -> dict[str, Any]:
        """Read one command and reply ``return: result`` with its id."""
        cmd = self.recv()
        reply = {"return": {} if result is None else result}
        if "id" in cmd:
            reply["id"] = cmd["id"]
        self.send(reply)
        return cmd

    def greet(self) -> None:
        """Send the greeting."""
        self.send(GREETING)

    def handshake(self) -> None:
        """Greet, then answer qmp_capabilities."""
        self.greet()
        self.answer()

    def at_eof(self) -> bool:
        """Wait (bounded) until the client hangs up; True when it did."""
        return self._stream.read() == b""

    def close(self) -> None:
        """Hang up (and close the client's end if nobody took it)."""
        self._stream.close()
        self.sock.close()
        if not self._handed_over:
            self._client_sock.close()


def peer_client(peer: BlockingPeer,
                pool: concurrent.futures.ThreadPoolExecutor,
                **options: Any) -> QMPSyncClient:
    """A `QMPSyncClient` made with `options`, connected to `peer`
    (handshake done)."""
    client = QMPSyncClient(**options)
    opening = pool.submit(client.open_with_socket, peer.client_sock)
    peer.handshake()
    opening.result(BlockingPeer.TIMEOUT)
    return client


def blocked_in_call(future: concurrent.futures.Future[object],
                    caller: str = "block_on") -> None:
    """
    Wait (bounded) until the pool thread running `future` is blocked in
    a ``wait`` called (at some depth) from `caller`: by default, waiting
    for the loop thread in the hand-off's lock.
    """
    deadline = BlockingPeer.TIMEOUT
    event = threading.Event()
    while deadline > 0:
        assert not future.done(), future.exception()
        for frame in sys._current_frames().values():
            names = []
            while frame is not None:
                names.append(frame.f_code.co_name)
                frame = frame.f_back  # type: ignore[assignment]
            if names and names[0] == "wait" and caller in names:
                return
        event.wait(0.005)  # polling a condition, not a delay
        deadline -= 0.005
    raise AssertionError("the call never blocked")


def qemu_client(path: str) -> QMPSyncClient:
    """A `QMPSyncClient` connected to the QEMU monitor at `path`."""
    client = QMPSyncClient(path)
    client.connect(timeout=BlockingPeer.TIMEOUT)
    return client


def pid_exists(pid: int) -> bool:
    """Whether a process (a zombie included) has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
