"""QMPClient against a scripted fake server: faults QEMU won't produce."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
from peers import AsyncPeer

from qmp_sync import (
    ConnectError,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)
from qmp_sync.fake_server import DEFAULT_GREETING as GREETING
from qmp_sync.fake_server import FakeQMPServer
from qmp_sync.message import encode
from qmp_sync.protocol import MessageTooLargeError
from qmp_sync.qmp_client import (
    BadReplyError,
    GreetingError,
    NegotiationError,
    ServerParseError,
)


async def connect(client: QMPClient | None = None,
                  capabilities: tuple[str, ...] = ("oob",)
                  ) -> tuple[QMPClient, AsyncPeer]:
    """A client in RUNNING state, talking to a fresh fake server."""
    client = client or QMPClient("test")
    fake = await AsyncPeer.create()
    await asyncio.gather(client.open_with_socket(fake.client_sock),
                         fake.handshake(capabilities))
    return client, fake


async def session_end(client: QMPClient) -> None:
    """Wait until the session has ended by itself."""
    while client.runstate is Runstate.RUNNING:
        await client.runstate_changed()


# ----------------------------------------------------------------------
# Greeting and negotiation


async def test_greeting_and_oob_negotiation() -> None:
    """The greeting is kept; 'oob' is enabled when the server offers it."""
    client, fake = await connect()
    assert client.greeting == GREETING
    assert client.oob_enabled
    assert fake.received[0]["execute"] == "qmp_capabilities"
    assert fake.received[0]["arguments"] == {"enable": ["oob"]}
    await client.disconnect()
    assert client.greeting == GREETING, "kept after disconnect"

    client, fake = await connect(capabilities=())
    assert not client.oob_enabled
    assert "arguments" not in fake.received[0]
    with pytest.raises(ValueError, match="did not negotiate"):
        await client.execute("migrate-pause", oob=True)
    await client.disconnect()


@pytest.mark.parametrize("first, error", [
    ({"return": {}}, "expected a greeting"),
    ({"QMP": {"capabilities": []}}, "no 'version'"),
    ({"QMP": {"version": {}, "capabilities": "oob"}}, "no 'capabilities'"),
    (b"[]\n", "not an object"),
])
async def test_bad_greeting(first: object, error: str) -> None:
    """A malformed greeting fails connect with ConnectError, back in IDLE."""
    client = QMPClient()
    fake = await AsyncPeer.create()
    await fake.send(first)  # type: ignore[arg-type]
    with pytest.raises(ConnectError, match=error) as info:
        await client.open_with_socket(fake.client_sock)
    assert isinstance(info.value.exc, (GreetingError, ServerParseError))
    assert client.runstate is Runstate.IDLE
    assert await fake.at_eof()


async def test_event_before_the_greeting() -> None:
    """An event sent before the greeting (QEMU does, as it starts) is no
    protocol error: it is delivered, and the session opens."""
    client = QMPClient()
    fake = await AsyncPeer.create()
    event = {"event": "RESUME", "timestamp": {"seconds": 1,
                                              "microseconds": 2}}
    await fake.send(event)
    await asyncio.gather(client.open_with_socket(fake.client_sock),
                         fake.handshake())
    assert client.greeting == GREETING
    assert await asyncio.wait_for(client.events.get(), 5) == event
    await client.disconnect()


async def test_server_hangs_up_before_greeting() -> None:
    """EOF instead of a greeting is a GreetingError that says so."""
    client = QMPClient()
    fake = await AsyncPeer.create()
    client_sock = fake.client_sock
    await fake.close()
    with pytest.raises(ConnectError, match="instead of greeting") as info:
        await client.open_with_socket(client_sock)
    assert isinstance(info.value.exc, GreetingError)
    assert client.runstate is Runstate.IDLE


async def test_server_that_never_greets() -> None:
    """A silent server: the caller's timeout ends connect, back in IDLE,
    and the same client connects fine afterwards."""
    client = QMPClient()
    fake = await AsyncPeer.create()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.open_with_socket(fake.client_sock),
                               0.1)
    assert client.runstate is Runstate.IDLE
    assert await fake.at_eof()
    client, fake = await connect(client)
    task = asyncio.ensure_future(client.execute("query-status"))
    await fake.answer({"status": "running"})
    assert await task == {"status": "running"}
    await client.disconnect()


@pytest.mark.parametrize("answer, says", [
    (lambda cmd: {"id": cmd["id"], "error": {
        "class": "GenericError", "desc": "no capabilities for you"}},
     "no capabilities for you"),
    # QEMU 7.2 resets a monitor that way when a client connects while it
    # is starting.
    (lambda cmd: GREETING, "greeted again"),
])
async def test_negotiation_fails(
        answer: Callable[[dict[str, Any]], dict[str, Any]],
        says: str) -> None:
    """An error reply to qmp_capabilities, or a second greeting in its
    place, is a NegotiationError that says which; back to IDLE."""
    client = QMPClient()
    fake = await AsyncPeer.create()

    async def negotiate() -> None:
        await fake.send(GREETING)
        await fake.send(answer(await fake.recv()))

    results = await asyncio.gather(
        client.open_with_socket(fake.client_sock), negotiate(),
        return_exceptions=True)
    assert isinstance(results[0], ConnectError)
    assert isinstance(results[0].exc, NegotiationError)
    assert says in str(results[0])
    assert client.runstate is Runstate.IDLE


async def test_no_greeting_no_negotiation() -> None:
    """await_greeting/negotiate False (qemu-ga): commands flow at once."""
    client = QMPClient()
    client.await_greeting = False
    client.negotiate = False
    fake = await AsyncPeer.create()
    await client.open_with_socket(fake.client_sock)
    assert client.greeting is None
    task = asyncio.ensure_future(client.execute("guest-ping"))
    cmd = await fake.answer({})
    assert cmd["execute"] == "guest-ping"
    assert await task == {}
    await client.disconnect()


# ----------------------------------------------------------------------
# Commands, ids and replies


async def test_replies_are_routed_by_id() -> None:
    """Replies answered out of order each reach their own caller."""
    client, fake = await connect()
    tasks = [asyncio.ensure_future(client.execute("cmd", {"n": n}))
             for n in range(20)]
    cmds = [await fake.recv() for _ in range(20)]
    assert len({cmd["id"] for cmd in cmds}) == 20
    for cmd in reversed(cmds):
        await fake.send({"id": cmd["id"],
                         "return": cmd["arguments"]["n"] * 10})
    assert await asyncio.gather(*tasks) == [n * 10 for n in range(20)]
    await client.disconnect()


async def test_caller_ids_and_execute_reply() -> None:
    """A caller's id is kept; execute_reply returns the whole reply and
    strips only the private id; the caller's message is not modified."""
    client, fake = await connect()
    msg = Message({"execute": "query-status"})
    task = asyncio.ensure_future(client.execute_reply(msg))
    await fake.answer({"status": "running"})
    assert await task == {"return": {"status": "running"}}
    assert msg == {"execute": "query-status"}

    task = asyncio.ensure_future(
        client.execute_reply({"execute": "x", "id": [1, "a"]}))
    cmd = await fake.recv()
    assert cmd["id"] == [1, "a"]
    await fake.send({"id": [1, "a"],
                     "error": {"class": "GenericError", "desc": "d"}})
    assert await task == {"id": [1, "a"],
                          "error": {"class": "GenericError", "desc": "d"}}

    task = asyncio.ensure_future(client.execute_msg({"execute": "a",
                                                     "id": 7}))
    await fake.recv()
    with pytest.raises(ValueError, match="already in flight"):
        await client.execute_msg({"execute": "b", "id": 7})
    with pytest.raises(ValueError, match="reserved"):
        await client.execute_msg({"execute": "b", "id": "__qmp_sync#1"})
    await fake.send({"id": 7, "return": 1})
    assert await task == 1
    await client.disconnect()


async def test_error_reply_raises_execute_error() -> None:
    """An error reply is ExecuteError: class, desc, sent and received."""
    client, fake = await connect()
    task = asyncio.ensure_future(client.execute("nope", {"a": 1}))
    cmd = await fake.recv()
    reply = {"id": cmd["id"], "error": {
        "class": "CommandNotFound", "desc": "The command nope has not "
        "been found"}}
    await fake.send(reply)
    with pytest.raises(ExecuteError) as info:
        await task
    assert info.value.error_class == "CommandNotFound"
    assert str(info.value) == "The command nope has not been found"
    assert info.value.sent["arguments"] == {"a": 1}
    assert info.value.received == reply
    assert client.runstate is Runstate.RUNNING
    await client.disconnect()


@pytest.mark.parametrize("reply, error", [
    ({}, "neither or both"),
    ({"return": 1, "error": {}}, "neither or both"),
    ({"error": "boom"}, "malformed error object"),
    ({"error": {"class": "X"}}, "malformed error object"),
])
async def test_bad_reply_fails_only_its_caller(reply: dict[str, object],
                                               error: str) -> None:
    """A reply that is no valid answer is BadReplyError for its caller;
    the session stays usable."""
    client, fake = await connect()
    task = asyncio.ensure_future(client.execute("x"))
    cmd = await fake.recv()
    await fake.send({"id": cmd["id"], **reply})
    with pytest.raises(BadReplyError, match=error):
        await task
    task = asyncio.ensure_future(client.execute("y"))
    await fake.answer(5)
    assert await task == 5
    await client.disconnect()


async def test_bad_arguments_send_nothing() -> None:
    """Caller errors are raised before anything is sent, and the session
    stays usable."""
    client, fake = await connect()
    bad_calls = [
        (TypeError, client.execute("x", {"f": object()})),
        (ValueError, client.execute("x", {"n": math.nan})),
        (TypeError, client.execute("x", [1, 2])),  # type: ignore[arg-type]
        (TypeError, client.execute(5)),  # type: ignore[arg-type]
        (ValueError, client.execute_msg({"arguments": {}})),
        (ValueError, client.execute_msg({"execute": "a", "exec-oob": "b"})),
        (TypeError, client.execute_msg({"execute": "a", "arguments": 3})),
        (TypeError, client.execute_msg("query-status")),  # type: ignore
    ]
    for exc_type, coro in bad_calls:
        with pytest.raises(exc_type):
            await coro
    task = asyncio.ensure_future(client.execute("good"))
    assert (await fake.answer())["execute"] == "good"
    assert await task == {}
    assert len(fake.received) == 2, "only negotiation and 'good' were sent"
    await client.disconnect()


async def test_execute_in_wrong_state() -> None:
    """execute() before connect is a StateError; so is send_fd_scm()."""
    client = QMPClient()
    with pytest.raises(StateError, match="disconnected and idle") as info:
        await client.execute("query-status")
    assert info.value.required is Runstate.RUNNING
    with pytest.raises(StateError):
        client.send_fd_scm(0)


async def test_late_reply_is_dropped() -> None:
    """A timed-out command's late reply is dropped; the next command gets
    its own reply."""
    client, fake = await connect()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(client.execute("slow"), 0.05)
    slow = await fake.recv()
    task = asyncio.ensure_future(client.execute("fast"))
    fast = await fake.recv()
    await fake.send({"id": slow["id"], "return": "late"},
                    {"id": fast["id"], "return": "mine"})
    assert await task == "mine"
    assert client.runstate is Runstate.RUNNING
    await client.disconnect()


async def test_unknown_reply_id_is_logged_and_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    """A reply to an id never sent is logged; the session goes on."""
    client, fake = await connect()
    with caplog.at_level(logging.WARNING):
        await fake.send({"id": "ghost", "return": {}})
        task = asyncio.ensure_future(client.execute("x"))
        await fake.answer(1)
        assert await task == 1
    assert "unknown id 'ghost'" in caplog.text
    await client.disconnect()


# ----------------------------------------------------------------------
# Faults that end the session


@pytest.mark.parametrize("garbage, error_type, text", [
    (b'{"return": {}\n', ServerParseError, "malformed JSON"),
    (b"[1, 2]\n", ServerParseError, "JSON list, not an object"),
    (b'"hello"\n', ServerParseError, "JSON str, not an object"),
    (b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\n',
     ServerParseError, "could not parse a command: JSON parse error"),
    (b'{"what": 1}\n', BadReplyError, "unexpected message"),
])
async def test_garbage_ends_session_and_interrupts_calls(
        garbage: bytes, error_type: type[Exception], text: str) -> None:
    """Garbage from the server: calls in flight end at once with
    ExecInterruptedError naming the cause; disconnect() raises the cause
    and returns to IDLE; the client can connect again."""
    client, fake = await connect()
    tasks = [asyncio.ensure_future(client.execute("x")) for _ in range(3)]
    for _ in tasks:
        await fake.recv()
    await fake.send(garbage)
    for task in tasks:
        with pytest.raises(ExecInterruptedError, match=text) as info:
            await task
        assert isinstance(info.value.__cause__, error_type)
        assert "'x' was interrupted" in str(info.value)
    await session_end(client)
    with pytest.raises(error_type, match=text):
        await client.disconnect()
    assert client.runstate is Runstate.IDLE
    await client.disconnect()
    await connect(client)
    await client.disconnect()


async def test_oversized_reply() -> None:
    """A reply over the read limit: the caller learns the limit."""
    client = QMPClient(readbuflen=4096)
    client, fake = await connect(client)
    task = asyncio.ensure_future(client.execute("query-qmp-schema"))
    cmd = await fake.recv()
    await fake.send({"id": cmd["id"], "return": ["x" * 10_000]})
    with pytest.raises(ExecInterruptedError,
                       match="exceeds the 4 KiB read limit") as info:
        await task
    assert isinstance(info.value.__cause__, MessageTooLargeError)
    with pytest.raises(MessageTooLargeError):
        await client.disconnect()
    assert client.runstate is Runstate.IDLE


async def test_default_read_limit_is_10_mib() -> None:
    """The default limit accepts 9 MiB and refuses 11 MiB."""
    client, fake = await connect()
    task = asyncio.ensure_future(client.execute("big"))
    cmd = await fake.recv()
    await fake.send({"id": cmd["id"], "return": "x" * (9 << 20)})
    assert len(await task) == 9 << 20  # type: ignore[arg-type]
    task = asyncio.ensure_future(client.execute("bigger"))
    cmd = await fake.recv()
    # The client hangs up half-way through, so the send fails: ignore it.
    sending = asyncio.ensure_future(
        fake.send({"id": cmd["id"], "return": "x" * (11 << 20)}))
    with pytest.raises(ExecInterruptedError,
                       match="exceeds the 10 MiB read limit"):
        await task
    with pytest.raises(MessageTooLargeError):
        await client.disconnect()
    await asyncio.gather(sending, return_exceptions=True)


async def test_close_in_the_middle_of_a_reply() -> None:
    """EOF inside a reply: ServerParseError says the message was cut."""
    client, fake = await connect()
    task = asyncio.ensure_future(client.execute("x"))
    cmd = await fake.recv()
    await fake.send(b'{"id": "%s", "return": {"sta' % cmd["id"].encode())
    await fake.close()
    with pytest.raises(ExecInterruptedError,
                       match="in the middle of a message") as info:
        await task
    assert isinstance(info.value.__cause__, ServerParseError)
    with pytest.raises(ServerParseError):
        await client.disconnect()
    assert client.runstate is Runstate.IDLE


async def test_server_hangup_interrupts_calls_cleanly() -> None:
    """The server closing between messages interrupts commands in flight;
    disconnect() then returns without an error."""
    client, fake = await connect()
    task = asyncio.ensure_future(client.execute("quit"))
    await fake.recv()
    await fake.close()
    with pytest.raises(ExecInterruptedError,
                       match="server closed the connection"):
        await task
    await session_end(client)
    await client.disconnect()
    assert client.runstate is Runstate.IDLE


async def test_disconnect_interrupts_calls() -> None:
    """disconnect() while commands are in flight interrupts them."""
    client, fake = await connect()
    task = asyncio.ensure_future(client.execute("x"))
    await fake.recv()
    await client.disconnect()
    with pytest.raises(ExecInterruptedError, match="client disconnected"):
        await task
    assert await fake.at_eof()


# ----------------------------------------------------------------------
# Events


async def test_events_reach_every_listener_in_order() -> None:
    """Events arriving while a command waits reach the default listener
    and every matching listener, in order, and the reply still arrives."""
    client, fake = await connect()
    with client.listener("STOP") as stops:
        task = asyncio.ensure_future(client.execute("stop"))
        cmd = await fake.recv()
        await fake.send({"event": "STOP", "data": {"n": 1}},
                        {"event": "RESUME"},
                        {"event": "STOP", "data": {"n": 2}},
                        {"id": cmd["id"], "return": {}})
        assert await task == {}
        assert [e["event"] for e in client.events.clear()] == [
            "STOP", "RESUME", "STOP"]
        assert [e["data"]["n"] for e in stops.clear()] == [1, 2]
    await client.disconnect()


# ----------------------------------------------------------------------
# Logging and fd passing


async def test_messages_are_not_formatted_when_logging_is_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With debug logging off, execute() never turns a message into text
    for a log line; with it on, it does."""
    calls = []
    original = Message.__str__

    def counting_str(self: Message) -> str:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(Message, "__str__", counting_str)
    logger = logging.getLogger("qmp_sync")
    client, fake = await connect()
    for level, expect_formatting in ((logging.WARNING, False),
                                     (logging.DEBUG, True)):
        calls.clear()
        old_level = logger.level
        logger.setLevel(level)
        handler = logging.NullHandler()
        logger.addHandler(handler)
        try:
            task = asyncio.ensure_future(client.execute("query-status"))
            await fake.answer()
            await task
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
        assert bool(calls) is expect_formatting
    await client.disconnect()


async def test_send_fd_scm_errors() -> None:
    """send_fd_scm on a TCP connection or with a bad fd fails clearly."""
    client, _fake = await connect()
    with pytest.raises(TypeError):
        client.send_fd_scm("3")  # type: ignore[arg-type]
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(OSError):
        client.send_fd_scm(read_end)
    assert client.runstate is Runstate.RUNNING
    await client.disconnect()

    with FakeQMPServer(tcp=True) as server:
        client = QMPClient()
        await client.connect(server.address)
        with pytest.raises(QMPError, match="unix socket"):
            client.send_fd_scm(0)
        await client.disconnect()


async def test_calls_from_another_thread_or_loop_are_refused() -> None:
    """execute() under another event loop and send_fd_scm() from another
    thread fail with a clear QMPError instead of corrupting the session."""
    client, fake = await connect()
    errors: list[BaseException] = []

    def elsewhere() -> None:
        try:
            client.send_fd_scm(0)
        except QMPError as err:
            errors.append(err)

        async def other_loop() -> None:
            await client.execute("query-status")

        try:
            asyncio.run(other_loop())
        except QMPError as err:
            errors.append(err)

    await asyncio.get_running_loop().run_in_executor(None, elsewhere)
    assert len(errors) == 2
    assert all("thread running the event loop" in str(e) for e in errors)
    task = asyncio.ensure_future(client.execute("still-fine"))
    await fake.answer()
    assert await task == {}
    assert len(fake.received) == 2
    await client.disconnect()


async def test_server_reset_is_a_hangup_not_a_failure() -> None:
    """A server that dies with unread data resets the connection: the
    command in flight is interrupted and names the reset, disconnect()
    does not raise (the same as a plain end of stream)."""
    loop = asyncio.get_running_loop()
    mine, theirs = socket.socketpair()
    theirs.setblocking(False)
    theirs.sendall(json.dumps(GREETING).encode() + b"\n")
    client = QMPClient()
    connecting = asyncio.ensure_future(client.open_with_socket(mine))
    negotiation = json.loads(await loop.sock_recv(theirs, 4096))
    theirs.sendall(json.dumps({"id": negotiation["id"], "return": {}})
                   .encode() + b"\n")
    await connecting
    # Written at once (nothing queued), so it sits unread in `theirs`.
    future = loop.create_future()
    client.submit(client.command("query-status"), future)
    theirs.close()
    with pytest.raises(ExecInterruptedError, match="reset") as info:
        await future
    assert isinstance(info.value.__cause__, ConnectionResetError)
    await session_end(client)
    await client.disconnect()
    assert client.runstate is Runstate.IDLE


@pytest.mark.parametrize("name", ["query-status", "x", "é€😀", 'a"b\\c',
                                  "\ud800", "tab\there", ""])
@pytest.mark.parametrize("oob", [False, True])
def test_argumentless_command_is_encoded_as_encode_would(
        name: str, oob: bool) -> None:
    """The shortcut that writes argument-less commands gives exactly the
    bytes of the general encoder, and the same message."""
    client = QMPClient()
    command = client.command(name, oob=oob)
    assert command.wire == encode(command.data) + b"\n"
    assert json.loads(command.wire) == command.to_dict()
    assert bytes(command) == command.wire[:-1]
