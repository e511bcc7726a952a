"""
Helpers of the tests: peers for the faults QEMU will not produce on
demand, all built on the one fake server, ``qmp_sync.fake_server``
(`AsyncPeer` drives its `FakeConnection` from an async test), a
protocol on the core (`LineProtocol`), and small waits and checks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, ClassVar

import pytest

from qmp_sync.fake_server import FakeConnection, Sendable
from qmp_sync.machine import QEMUMachine
from qmp_sync.protocol import AsyncProtocol
from qmp_sync.sync import QMPSyncClient
from qmp_sync.testing import find_qemu

#: Longest wait of a test for a peer or a client, in seconds.
TIMEOUT = 10.0


class AsyncPeer:
    """
    A `FakeConnection` on a socketpair, driven from an ``async def``
    test: each step runs in a worker thread, so the client in the
    test's event loop goes on meanwhile. Give ``client_sock`` to the
    client.
    """

    #: Every AsyncPeer still open in this test; see `close_all`.
    _open: ClassVar[list[AsyncPeer]] = []

    def __init__(self) -> None:
        self.connection = FakeConnection.socketpair(TIMEOUT)
        AsyncPeer._open.append(self)

    @classmethod
    async def create(cls) -> AsyncPeer:
        """A new peer (a coroutine, for symmetry with the test's
        awaits)."""
        return cls()

    @classmethod
    async def close_all(cls) -> None:
        """Hang up every peer of the test (run by conftest)."""
        while cls._open:
            await cls._open.pop().close()

    @property
    def client_sock(self) -> socket.socket:
        """The client's end (see `FakeConnection.client_sock`)."""
        return self.connection.client_sock

    @property
    def received(self) -> list[dict[str, Any]]:
        """Every message read from the client, in order."""
        return self.connection.received

    async def send(self, *items: Sendable) -> None:
        """`FakeConnection.send`."""
        await asyncio.to_thread(self.connection.send, *items)

    async def recv(self) -> dict[str, Any]:
        """`FakeConnection.recv`."""
        return await asyncio.to_thread(self.connection.recv)

    async def answer(self, result: Any = None, **extra: Any
                     ) -> dict[str, Any]:
        """`FakeConnection.answer`."""
        return await asyncio.to_thread(self.connection.answer, result,
                                       **extra)

    async def handshake(self, capabilities: tuple[str, ...] = ("oob",)
                        ) -> dict[str, Any]:
        """`FakeConnection.handshake`."""
        return await asyncio.to_thread(self.connection.handshake,
                                       capabilities)

    async def at_eof(self) -> bool:
        """`FakeConnection.at_eof`."""
        return await asyncio.to_thread(self.connection.at_eof)

    async def close(self) -> None:
        """Hang up."""
        self.connection.close()


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


def peer_client(peer: FakeConnection,
                pool: concurrent.futures.ThreadPoolExecutor,
                **options: Any) -> QMPSyncClient:
    """A `QMPSyncClient` made with `options`, connected to `peer`
    (handshake done)."""
    client = QMPSyncClient(**options)
    opening = pool.submit(client.open_with_socket, peer.client_sock)
    peer.handshake()
    opening.result(TIMEOUT)
    return client


def poll_until(condition: Callable[[], bool], timeout: float = TIMEOUT
               ) -> bool:
    """Check `condition` every 5 ms until it holds (True) or `timeout`
    seconds have passed (False): polling a condition, not a delay."""
    pause = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if condition():
            return True
        pause.wait(0.005)
    return condition()


def blocked_in_call(future: concurrent.futures.Future[object],
                    caller: str = "block_on") -> None:
    """
    Wait (bounded) until the pool thread running `future` is blocked in
    a ``wait`` called (at some depth) from `caller`: by default, waiting
    for the loop thread in the hand-off's lock.
    """
    def blocked() -> bool:
        assert not future.done(), future.exception()
        for frame in sys._current_frames().values():
            names = []
            while frame is not None:
                names.append(frame.f_code.co_name)
                frame = frame.f_back  # type: ignore[assignment]
            if names and names[0] == "wait" and caller in names:
                return True
        return False

    if not poll_until(blocked):
        raise AssertionError("the call never blocked")


def qemu_client(path: str) -> QMPSyncClient:
    """A `QMPSyncClient` connected to the QEMU monitor at `path`."""
    client = QMPSyncClient(path)
    client.connect(timeout=TIMEOUT)
    return client


def pid_exists(pid: int) -> bool:
    """Whether a process (a zombie included) has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ----------------------------------------------------------------------
# QEMU, as the conftest fixtures hand it to the tests.

#: The arguments of a guest-less QEMU.
QEMU_ARGS = ("-machine", "none", "-nodefaults", "-display", "none")


class QEMU:
    """
    A launched guest-less QEMU (`machine`, a `QEMUMachine`, killed at
    the test's end by the plugin) with further QMP monitors on the unix
    sockets `paths` (the first is `path`) for the test's own clients.
    """

    def __init__(self, machine: QEMUMachine, paths: list[str]) -> None:
        self.machine = machine
        self.paths = paths
        self.path = paths[0]
        pid = machine.get_pid()
        assert pid is not None
        #: QEMU's process id.
        self.pid = pid

    def wait(self, timeout: float = TIMEOUT) -> int | None:
        """Wait for QEMU to exit by itself; return its exit status."""
        self.machine.wait(timeout)
        return self.machine.exitcode()

    def kill(self) -> None:
        """Stop QEMU at once and reap it."""
        self.machine.kill()


def monitor_args(directory: Path, count: int) -> tuple[list[str], list[str]]:
    """QEMU arguments for `count` QMP monitors listening on unix sockets
    in `directory`, and the socket paths."""
    args, paths = [], []
    for index in range(count):
        path = str(directory / f"qmp{index}.sock")
        args += ["-chardev", f"socket,id=qmp{index},path={path},"
                 "server=on,wait=off",
                 "-mon", f"chardev=qmp{index},mode=control"]
        paths.append(path)
    return args, paths


def qemu_binary() -> str:
    """The QEMU binary; its absence fails the test (never a skip)."""
    path = find_qemu()
    if path is None:
        pytest.fail("qemu-system-x86_64 is not installed: the README's test "
                    "command (tools/test.sh) installs it with apt-get")
    return path


def start_qemu(*extra: str, pass_fds: tuple[int, ...] = ()
               ) -> subprocess.Popen[bytes]:
    """
    A bare guest-less QEMU with `extra` arguments, for the few tests
    whose subject is a monitor set up by hand (QEMU as the socket's
    client, QEMU on an fd given by the test). Everything else uses
    the ``qemu_machine`` fixture. The caller kills and reaps it.
    """
    return subprocess.Popen(
        [qemu_binary(), *QEMU_ARGS, *extra], pass_fds=pass_fds,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


class GuestAgent:
    """A qemu-ga process serving its protocol on the unix socket `path`
    (on the host: its commands answer about this machine); as a context
    manager, killed when the block is left."""

    def __init__(self, proc: subprocess.Popen[bytes], path: str):
        self.proc = proc
        self.path = path

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)


# ----------------------------------------------------------------------
# The shell's programs.

def program(name: str) -> str:
    """A console script of the venv running the tests."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{path} is missing: install the package with "
                    "pip install -e '.[test]'")
    return str(path)


class Run:
    """What a run of a shell program printed, and its exit status."""

    def __init__(self, status: int, out: str, err: str) -> None:
        self.status = status
        self.out = out
        self.err = err

    @property
    def messages(self) -> list[dict[str, object]]:
        """stdout as JSON, one message per line."""
        return [json.loads(line) for line in self.out.splitlines()]

    @property
    def replies(self) -> list[dict[str, object]]:
        """The messages that are not events."""
        return [m for m in self.messages if "event" not in m]
