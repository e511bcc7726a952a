"""The generic async core (qmp_sync.protocol) against in-process peers."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from peers import LineProtocol, RunstateWatcher

from qmp_sync.error import ProtocolError, QMPError
from qmp_sync.protocol import (
    ConnectError,
    MessageTooLargeError,
    Runstate,
    StateError,
)

IDLE, CONNECTING, RUNNING, DISCONNECTING = (
    Runstate.IDLE, Runstate.CONNECTING, Runstate.RUNNING,
    Runstate.DISCONNECTING)


class EchoServer:
    """An asyncio server that echoes lines; records its connections."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.connected = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.connected.set()
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "proto.sock")


async def connected(**kwargs: Any) -> tuple[LineProtocol, socket.socket]:
    """A LineProtocol in RUNNING on a socketpair, and the peer's end."""
    proto = LineProtocol(**kwargs)
    mine, theirs = socket.socketpair()
    await proto.connect(mine)
    return proto, theirs


async def ended(proto: LineProtocol) -> None:
    """Wait until the session has ended by itself."""
    while proto.runstate is RUNNING:
        await proto.runstate_changed()


async def held_connect(*, until_holding: bool
                       ) -> tuple[LineProtocol, socket.socket, socket.socket,
                                  asyncio.Future[None]]:
    """
    A connect() in progress that cannot finish until
    ``proto.hold_session`` is resolved: returned as soon as it is
    CONNECTING (its attempt task may not have started yet), or, with
    `until_holding`, once it waits inside session setup. Returns the
    protocol, both socket ends and the connect's future.
    """
    proto = LineProtocol()
    proto.hold_session = asyncio.get_running_loop().create_future()
    mine, theirs = socket.socketpair()
    connecting = asyncio.ensure_future(proto.connect(mine))
    if until_holding:
        await proto.holding.wait()
    while proto.runstate is not CONNECTING:
        await proto.runstate_changed()
    return proto, mine, theirs, connecting


async def echo_unix(path: str) -> EchoServer:
    echo = EchoServer()
    echo.server = await asyncio.start_unix_server(echo.handle, path)
    return echo


async def test_connect_unix_runstates_and_messages(sock_path: str) -> None:
    """connect() walks IDLE->CONNECTING->RUNNING, messages flow both ways,
    disconnect() walks DISCONNECTING->IDLE."""
    echo = await echo_unix(sock_path)
    proto = LineProtocol("echo")
    watcher = RunstateWatcher(proto)
    await proto.connect(sock_path)
    assert proto.runstate is RUNNING
    proto.send(b"hello")
    proto.send(b"world")
    assert await proto.inbox.get() == b"hello\n"
    assert await proto.inbox.get() == b"world\n"
    await proto.disconnect()
    assert proto.runstate is IDLE
    assert await watcher.stop() == [IDLE, CONNECTING, RUNNING,
                                     DISCONNECTING, IDLE]
    await echo.close()


async def test_connect_tcp_and_socket() -> None:
    """A (host, port) tuple and a connected socket work as addresses."""
    echo = EchoServer()
    echo.server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    port = echo.server.sockets[0].getsockname()[1]
    proto = LineProtocol()
    await proto.connect(("127.0.0.1", port))
    proto.send(b"tcp")
    assert await proto.inbox.get() == b"tcp\n"
    await proto.disconnect()

    mine, theirs = socket.socketpair()
    peer_reader, peer_writer = await asyncio.open_connection(sock=theirs)
    await proto.connect(mine)
    peer_writer.write(b"from peer\n")
    assert await proto.inbox.get() == b"from peer\n"
    await proto.disconnect()
    assert mine.fileno() == -1, "the protocol closes a socket it was given"
    assert await peer_reader.read() == b""
    peer_writer.close()
    await echo.close()


async def test_open_with_socket_runs_the_session() -> None:
    """open_with_socket() establishes the whole session in one call."""
    mine, theirs = socket.socketpair()
    proto = LineProtocol()
    await proto.open_with_socket(mine)
    assert proto.runstate is RUNNING
    theirs.sendall(b"x\n")
    assert await proto.inbox.get() == b"x\n"
    await proto.disconnect()
    theirs.close()
    with pytest.raises(TypeError):
        await proto.open_with_socket("not a socket")  # type: ignore


async def test_connect_failure_returns_to_idle(sock_path: str) -> None:
    """A failed connect raises ConnectError with the root cause, in IDLE."""
    proto = LineProtocol()
    watcher = RunstateWatcher(proto)
    with pytest.raises(ConnectError) as info:
        await proto.connect(sock_path)
    assert isinstance(info.value.exc, FileNotFoundError)
    assert info.value.__cause__ is info.value.exc
    assert str(info.value).startswith("Failed to establish connection: ")
    assert proto.runstate is IDLE
    assert await watcher.stop() == [IDLE, CONNECTING, DISCONNECTING, IDLE]

    # Refused: a socket file with nobody listening.
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(sock_path)
    dead.close()
    with pytest.raises(ConnectError) as info:
        await proto.connect(sock_path)
    assert isinstance(info.value.exc, ConnectionRefusedError)
    assert proto.runstate is IDLE


async def test_bad_address_type_changes_nothing() -> None:
    """A wrong address type is a TypeError raised before any state change."""
    proto = LineProtocol()
    for bad in (42, ("host",), ("host", "port"), None):
        with pytest.raises(TypeError, match="address must be"):
            await proto.connect(bad)  # type: ignore[arg-type]
        assert proto.runstate is IDLE
    with socket.socket() as sock, pytest.raises(TypeError):
        await proto.start_server(sock)  # type: ignore[arg-type]


async def test_wrong_state_calls(sock_path: str) -> None:
    """Calls in the wrong runstate raise StateError saying what is needed."""
    echo = await echo_unix(sock_path)
    proto = LineProtocol()
    with pytest.raises(StateError) as info:
        await proto.accept()
    assert info.value.state is IDLE and info.value.required is CONNECTING
    assert "disconnected and idle" in str(info.value)

    await proto.connect(sock_path)
    for call in (lambda: proto.connect(sock_path),
                 lambda: proto.start_server(sock_path + "2"),
                 lambda: proto.start_server_and_accept(sock_path + "2")):
        with pytest.raises(StateError, match="already connected") as info:
            await call()
        assert info.value.state is RUNNING
        assert info.value.required is IDLE
    assert proto.runstate is RUNNING
    await proto.disconnect()
    await proto.disconnect()  # idempotent
    assert proto.runstate is IDLE
    await echo.close()


async def test_accept_needs_start_server() -> None:
    """accept() while another connect is in progress is a clear error."""
    proto, _, theirs, connecting = await held_connect(until_holding=False)
    with pytest.raises(QMPError, match="start_server"):
        await proto.accept()
    proto.hold_session.set_result(None)
    await connecting
    await proto.disconnect()
    theirs.close()


async def test_start_server_and_accept(sock_path: str) -> None:
    """The server side: listen, take one peer, remove the socket file,
    refuse extra peers."""
    proto = LineProtocol()
    watcher = RunstateWatcher(proto)
    await proto.start_server(sock_path)
    assert proto.runstate is CONNECTING
    assert os.path.exists(sock_path)
    peer_reader, peer_writer = await asyncio.open_unix_connection(sock_path)
    await proto.accept()
    assert proto.runstate is RUNNING
    assert not os.path.exists(sock_path), "listening socket file removed"
    proto.send(b"to peer")
    assert await peer_reader.readline() == b"to peer\n"
    peer_writer.write(b"to proto\n")
    assert await proto.inbox.get() == b"to proto\n"
    await proto.disconnect()
    assert await watcher.stop() == [IDLE, CONNECTING, RUNNING,
                                     DISCONNECTING, IDLE]
    peer_writer.close()

    # Know when it listens: accept() starts waiting only after binding.
    listening = asyncio.Event()
    do_accept = proto._do_accept

    async def signalling_do_accept() -> None:
        listening.set()
        await do_accept()

    proto._do_accept = signalling_do_accept  # type: ignore[method-assign]
    accepting = asyncio.ensure_future(
        proto.start_server_and_accept(sock_path))
    await listening.wait()
    _, peer_writer = await asyncio.open_unix_connection(sock_path)
    await accepting
    assert proto.runstate is RUNNING
    await proto.disconnect()
    peer_writer.close()


async def test_listening_stops_after_accept(sock_path: str) -> None:
    """Once a peer is accepted nobody else can connect."""
    proto = LineProtocol()
    await proto.start_server(sock_path)
    _first_r, first_w = await asyncio.open_unix_connection(sock_path)
    await proto.accept()
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        await asyncio.open_unix_connection(sock_path)
    first_w.write(b"one\n")
    assert await proto.inbox.get() == b"one\n"
    await proto.disconnect()
    first_w.close()


async def test_accept_timeout_and_cancel_return_to_idle(
        sock_path: str) -> None:
    """A timed-out or cancelled accept() stops listening and returns to
    IDLE; listening again then works."""
    proto = LineProtocol()
    await proto.start_server(sock_path)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(proto.accept(), 0.05)
    assert proto.runstate is IDLE
    assert not os.path.exists(sock_path)

    await proto.start_server(sock_path)
    task = asyncio.ensure_future(proto.accept())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert proto.runstate is IDLE

    await proto.start_server(sock_path)
    _, peer_writer = await asyncio.open_unix_connection(sock_path)
    await proto.accept()
    assert proto.runstate is RUNNING
    await proto.disconnect()
    peer_writer.close()


async def test_cancel_during_session_setup_returns_to_idle() -> None:
    """Cancelling connect() while the session is being established closes
    the stream and returns to IDLE."""
    proto = LineProtocol()
    proto.hold_session = asyncio.get_running_loop().create_future()
    mine, theirs = socket.socketpair()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(proto.connect(mine), 0.05)
    assert proto.runstate is IDLE
    assert mine.fileno() == -1
    theirs.settimeout(5)
    assert theirs.recv(1) == b"", "the peer sees the connection close"
    theirs.close()


async def test_reader_failure_is_raised_once_by_disconnect() -> None:
    """A failure in the reader ends the session; disconnect() raises it
    once and returns to IDLE."""
    proto, theirs = await connected()
    boom = RuntimeError("handler broke")
    proto.fail_on_message = boom
    theirs.sendall(b"trigger\n")
    await ended(proto)
    assert proto.runstate is DISCONNECTING
    with pytest.raises(RuntimeError) as info:
        await proto.disconnect()
    assert info.value is boom
    assert proto.runstate is IDLE
    await proto.disconnect()  # raised once only
    theirs.close()


@pytest.mark.parametrize("queued", [False, True])
async def test_writer_failure_is_raised_once_by_disconnect(
        queued: bool) -> None:
    """A failure to write ends the session the same way, whether the
    message was written at once or queued for the writer task."""
    proto, theirs = await connected()
    peer_reader, peer_writer = await asyncio.open_connection(sock=theirs)
    if queued:
        for _ in range(50):
            proto.send(b"z" * 100_000)
        assert proto._outgoing, "the transport buffer filled"
    proto.fail_on_send = OSError("disk on fire")
    proto.send(b"x")
    await peer_reader.read()  # drain, so the writer task gets its turn
    await ended(proto)
    with pytest.raises(OSError, match="disk on fire"):
        await proto.disconnect()
    assert proto.runstate is IDLE
    peer_writer.close()


async def test_concurrent_disconnects_raise_once() -> None:
    """Of several concurrent disconnect() calls exactly one raises."""
    proto, theirs = await connected()
    proto.fail_on_message = ValueError("bad")
    theirs.sendall(b"x\n")
    await ended(proto)
    results = await asyncio.gather(
        *(proto.disconnect() for _ in range(3)), return_exceptions=True)
    assert sum(isinstance(r, ValueError) for r in results) == 1
    assert results.count(None) == 2
    assert proto.runstate is IDLE
    theirs.close()


async def test_peer_eof_is_a_clean_end() -> None:
    """A peer that hangs up ends the session; disconnect() does not raise."""
    proto, theirs = await connected()
    theirs.close()
    await ended(proto)
    assert proto.runstate is DISCONNECTING
    await proto.disconnect()
    assert proto.runstate is IDLE


async def test_oversized_line_is_a_protocol_error() -> None:
    """A line over readbuflen ends the session with MessageTooLargeError
    naming the limit; the client can connect again afterwards."""
    proto, theirs = await connected(readbuflen=1024)
    theirs.sendall(b"x" * 5000 + b"\n")
    await ended(proto)
    with pytest.raises(MessageTooLargeError,
                       match="exceeds the 1 KiB read limit") as info:
        await proto.disconnect()
    assert isinstance(info.value, ProtocolError)
    assert info.value.limit == 1024
    assert proto.runstate is IDLE
    theirs.close()

    mine, theirs = socket.socketpair()
    await proto.connect(mine)
    theirs.sendall(b"y" * 1000 + b"\n")
    assert await proto.inbox.get() == b"y" * 1000 + b"\n"
    await proto.disconnect()
    theirs.close()


def test_readbuflen_must_be_positive() -> None:
    """readbuflen=0 is rejected at construction."""
    with pytest.raises(ValueError, match="readbuflen"):
        LineProtocol(readbuflen=0)


def test_repr_and_logger_name() -> None:
    """repr shows name and runstate; a named instance logs to a child."""
    proto = LineProtocol("vm1")
    assert repr(proto) == "<LineProtocol name='vm1' runstate=IDLE>"
    assert repr(LineProtocol()) == "<LineProtocol runstate=IDLE>"
    assert proto.logger.name == "qmp_sync.protocol.vm1"
    assert LineProtocol().logger is logging.getLogger("qmp_sync.protocol")


def make_cert(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for localhost, made with openssl."""
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", key, "-out", cert, "-days", "1", "-subj",
         "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60)
    return cert, key


async def test_tls_connect(tmp_path: Path) -> None:
    """connect(..., ssl=context) speaks TLS to a TLS server."""
    cert, key = make_cert(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    echo = EchoServer()
    echo.server = await asyncio.start_server(
        echo.handle, "localhost", 0, ssl=server_ctx)
    port = echo.server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=cert)
    proto = LineProtocol()
    await proto.connect(("localhost", port), ssl=client_ctx)
    proto.send(b"secret")
    assert await proto.inbox.get() == b"secret\n"
    await proto.disconnect()

    # An untrusted certificate fails the connect, back in IDLE.
    with pytest.raises(ConnectError) as info:
        await proto.connect(("localhost", port),
                            ssl=ssl.create_default_context())
    assert isinstance(info.value.exc, ssl.SSLError)
    assert proto.runstate is IDLE
    await echo.close()


@pytest.mark.parametrize("until_holding", [False, True])
async def test_disconnect_aborts_a_connect_in_progress(
        until_holding: bool) -> None:
    """disconnect() from another task aborts a connect, whether its
    attempt has not started yet or waits in session setup: the connect
    raises ConnectError, both end in IDLE, the socket is closed."""
    proto, mine, theirs, connecting = await held_connect(
        until_holding=until_holding)
    await proto.disconnect()
    assert proto.runstate is IDLE
    with pytest.raises(ConnectError, match="disconnect\\(\\) was called"):
        await connecting
    assert mine.fileno() == -1
    theirs.close()


async def test_disconnect_aborts_accept_and_stops_listening(
        sock_path: str) -> None:
    """disconnect() aborts a waiting accept() and removes the socket; a
    listening client with no accept() running just stops listening."""
    proto = LineProtocol()
    await proto.start_server(sock_path)
    accepting = asyncio.ensure_future(proto.accept())
    await asyncio.sleep(0)
    await proto.disconnect()
    with pytest.raises(ConnectError, match="disconnect"):
        await accepting
    assert proto.runstate is IDLE
    assert not os.path.exists(sock_path)

    await proto.start_server(sock_path)
    await proto.disconnect()
    assert proto.runstate is IDLE
    assert not os.path.exists(sock_path)


async def test_second_accept_is_refused(sock_path: str) -> None:
    """Only one accept() may wait at a time."""
    proto = LineProtocol()
    await proto.start_server(sock_path)
    accepting = asyncio.ensure_future(proto.accept())
    await asyncio.sleep(0)
    with pytest.raises(QMPError, match="no other connect or accept"):
        await proto.accept()
    _, peer_writer = await asyncio.open_unix_connection(sock_path)
    await accepting
    assert proto.runstate is RUNNING
    await proto.disconnect()
    peer_writer.close()


def test_client_reused_under_a_new_event_loop() -> None:
    """A disconnected client works again under another event loop."""
    proto = LineProtocol()

    async def session() -> None:
        mine, theirs = socket.socketpair()
        watcher = RunstateWatcher(proto)
        await proto.connect(mine)
        theirs.sendall(b"ping\n")
        assert await proto.inbox.get() == b"ping\n"
        await proto.disconnect()
        assert await watcher.stop() == [IDLE, CONNECTING, RUNNING,
                                         DISCONNECTING, IDLE]
        theirs.close()
        proto._inbox = None  # the test's queue belongs to the old loop

    asyncio.run(session())
    asyncio.run(session())


async def test_backpressure_keeps_order() -> None:
    """Messages sent faster than the peer reads are queued for the writer
    and all arrive, in order."""
    proto, theirs = await connected()
    chunk = b"z" * 100_000
    for n in range(100):
        proto.send(b"%d:" % n + chunk)
    assert proto._outgoing, (
        "the transport buffer filled and messages were queued")
    peer_reader, peer_writer = await asyncio.open_connection(
        sock=theirs, limit=1 << 20)
    for n in range(100):
        line = await peer_reader.readline()
        assert line == b"%d:" % n + chunk + b"\n"
    await proto.disconnect()
    peer_writer.close()


async def test_cancelled_just_as_connect_succeeds() -> None:
    """A connect cancelled in the same instant it succeeds still leaves
    the client IDLE, so the caller's view (it failed) holds."""
    proto, _, theirs, connecting = await held_connect(until_holding=True)
    assert proto.hold_session is not None
    proto.hold_session.set_result(None)
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting
    assert proto.runstate is IDLE
    theirs.settimeout(5)
    assert theirs.recv(1) == b""
    theirs.close()
