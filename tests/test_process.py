"""QMPSyncClient and the process it lives in: signals, exit, fork, and
the one shared loop thread. Each test (but one) runs a child Python
program and judges it by its exit status and output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import QEMU

from qmp_sync import Message, QMPError, QMPSyncClient

#: The child runs from the source tree, so it imports this qmp_sync.
ROOT = Path(__file__).resolve().parent.parent
#: Longest a child may take; each should finish well within a second.
CHILD_TIMEOUT = 15.0
#: What "promptly" means for a child's whole run, interpreter included.
PROMPT = 5.0
EVENT_TIMEOUT = 10.0

#: The fake QMP server for child programs, on a socketpair: only for
#: faults QEMU will not produce on demand.
PEER = '''
from qmp_sync.fake_server import DEFAULT_GREETING as GREETING
from qmp_sync.fake_server import FakeConnection

Peer = FakeConnection.socketpair
'''

# asyncio's debug mode (-X dev) reports slow callbacks; a loaded machine
# makes those, and they say nothing about the library.
SLOW_CALLBACK = re.compile(r"Executing <.*> took \d+\.\d+ seconds")


@dataclass
class Child:
    """How a child program ended."""

    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def noise(self) -> str:
        """stderr without asyncio's slow-callback reports."""
        return "\n".join(line for line in self.stderr.splitlines()
                         if not SLOW_CALLBACK.fullmatch(line))


def run_child(code: str, *args: str, peer: bool = False,
              warnings: tuple[str, ...] = ("error",),
              env: dict[str, str] | None = None) -> Child:
    """Run `code` in a fresh interpreter in development mode (asyncio
    debug mode, ResourceWarnings shown), with `warnings` as -W options
    and `env` added to the environment; `peer` prepends the `Peer` fake
    server."""
    program = (PEER if peer else "") + textwrap.dedent(code)
    options = [f"-W{option}" for option in warnings]
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-X", "dev", *options, "-c", program, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT,
        env={**os.environ, **(env or {})})
    return Child(proc.returncode, proc.stdout, proc.stderr,
                 time.monotonic() - start)


def assert_clean(child: Child, marker: str) -> None:
    """The child exited 0 promptly, printed `marker`, and stderr holds
    nothing (slow-callback reports aside)."""
    report = f"stdout:\n{child.stdout}\nstderr:\n{child.stderr}"
    assert child.returncode == 0, report
    assert marker in child.stdout.split(), report
    assert child.elapsed < PROMPT, report
    assert child.noise == "", report


def test_keyboard_interrupt_in_execute_leaves_client_usable() -> None:
    """KeyboardInterrupt while blocked in execute() reaches the caller;
    the late reply is dropped and the next command gets its own."""
    child = run_child('''
        import signal
        import threading

        from qmp_sync import QMPSyncClient

        # Started from a background job, SIGINT comes ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        peer = Peer()
        main = threading.get_ident()
        interrupted = threading.Event()

        def serve():
            peer.handshake()
            slow = peer.recv()
            assert slow["execute"] == "slow", slow
            signal.pthread_kill(main, signal.SIGINT)
            assert interrupted.wait(10), "no KeyboardInterrupt"
            peer.send({"return": "late", "id": slow["id"]})
            assert peer.answer("next-value")["execute"] == "next"
            assert peer.at_eof(), "no hang-up"

        server = threading.Thread(target=serve)
        server.start()
        client = QMPSyncClient()
        client.open_with_socket(peer.client_sock, timeout=10)
        try:
            client.execute("slow", timeout=10)
        except KeyboardInterrupt:
            interrupted.set()
        assert interrupted.is_set(), "execute('slow') was not interrupted"
        assert client.runstate.name == "RUNNING", client
        assert client.execute("next", timeout=10) == "next-value"
        client.close()
        server.join(10)
        assert not server.is_alive()
        peer.close()
        print("USABLE")
    ''', peer=True)
    assert_clean(child, "USABLE")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_keyboard_interrupt_in_event_waits(loop: str) -> None:
    """Ctrl-C reaches a caller blocked in pull_event(wait=True) and in
    event_wait(timeout=None), on either loop (with uvloop, a blocked
    wait used to miss it); the client stays usable."""
    pytest.importorskip(loop)
    child = run_child('''
        import signal
        import sys
        import threading
        import time

        from qmp_sync import QMPSyncClient

        signal.signal(signal.SIGINT, signal.default_int_handler)
        peer = Peer()
        main = threading.get_ident()
        waiting = threading.Event()

        def blocked():
            """Whether the main thread sleeps in a wait (polled)."""
            frame = sys._current_frames().get(main)
            return frame is not None and frame.f_code.co_name == "wait"

        def serve():
            peer.handshake()
            for _ in range(2):
                assert waiting.wait(10), "the main thread never waited"
                waiting.clear()
                for _ in range(10_000):
                    if blocked():
                        break
                    time.sleep(0.001)  # polling a condition, bounded
                signal.pthread_kill(main, signal.SIGINT)
            assert peer.answer("next-value")["execute"] == "next"
            assert peer.at_eof(), "no hang-up"

        server = threading.Thread(target=serve)
        server.start()
        client = QMPSyncClient()
        client.open_with_socket(peer.client_sock, timeout=10)
        for wait in (lambda: client.pull_event(wait=True),
                     lambda: client.event_wait("NEVER", timeout=None)):
            try:
                waiting.set()
                wait()
            except KeyboardInterrupt:
                pass
            else:
                raise AssertionError("the wait was not interrupted")
        assert client.execute("next", timeout=10) == "next-value"
        client.close()
        server.join(10)
        assert not server.is_alive()
        peer.close()
        print("INTERRUPTED")
    ''', peer=True, env={"QMP_SYNC_LOOP": loop})
    assert_clean(child, "INTERRUPTED")


def test_client_dropped_without_close_at_exit(qemu: QEMU) -> None:
    """A connected client never closed does not hold up exit, and the
    loop thread ends its session quietly (no ResourceWarning)."""
    child = run_child('''
        import sys

        from qmp_sync import QMPSyncClient

        client = QMPSyncClient(sys.argv[1])
        client.connect(timeout=5)
        assert client.execute("query-status", timeout=5)["running"]
        print("CONNECTED")
    ''', qemu.path)
    assert_clean(child, "CONNECTED")


@pytest.mark.parametrize("warning_action", ["default", "error"])
def test_client_dropped_midway_releases_its_socket(
        qemu: QEMU, warning_action: str) -> None:
    """A client garbage-collected without close() releases its
    connection (QEMU then serves another client on its one monitor),
    with a ResourceWarning, whatever the warnings filter does with it."""
    child = run_child('''
        import gc
        import sys

        from qmp_sync import QMPSyncClient

        client = QMPSyncClient(sys.argv[1])
        client.connect(timeout=5)
        assert client.execute("query-status", timeout=5)["running"]
        probe = QMPSyncClient(sys.argv[1])
        try:
            probe.connect(timeout=0.5)
        except TimeoutError:
            pass  # QEMU serves one client per monitor: it waits
        else:
            raise AssertionError("a second session while the first runs")
        del client
        gc.collect()
        probe.connect(timeout=2)
        assert probe.execute("query-status", timeout=5)["running"]
        probe.close()
        print("RELEASED")
    ''', qemu.path, warnings=(warning_action,))
    report = f"stdout:\n{child.stdout}\nstderr:\n{child.stderr}"
    assert child.returncode == 0, report
    assert "RELEASED" in child.stdout.split(), report
    assert "garbage-collected without close()" in child.stderr, report
    if warning_action == "default":
        assert "Traceback" not in child.noise, report
    for bad in ("Task was destroyed", "RuntimeError", "never awaited",
                "unclosed"):
        assert bad not in child.stderr, report


# Registered before qmp_sync is imported, this runs after qmp_sync's own
# exit handler. It gives a daemon thread woken by that handler a second
# to finish, so whatever the thread prints is printed every time, not
# only when it wins the race with interpreter shutdown; a thread that
# stays blocked costs that second. Then it runs the `at_last` cleanups.
LAST_WORDS = '''
import atexit

at_last = []

def last_words():
    daemon.join(1.0)
    for cleanup in at_last:
        cleanup()

atexit.register(last_words)
'''

PULL_EVENT_FOREVER = LAST_WORDS + '''
import sys
import threading

from qmp_sync import QMPSyncClient

client = QMPSyncClient(sys.argv[1])
client.connect(timeout=5)
assert client.execute("query-status", timeout=5)["running"]
parked = threading.Event()

def spy(frame, event, arg):
    if event == "call" and frame.f_code is threading.Condition.wait.__code__:
        parked.set()

def wait_forever():
    sys.setprofile(spy)  # tells when the wait for an event has begun
    client.pull_event(wait=True)

daemon = threading.Thread(target=wait_forever, daemon=True)
daemon.start()
assert parked.wait(5), "pull_event(wait=True) never began waiting"
print("EXITING")
'''


def test_daemon_thread_in_pull_event_does_not_block_exit(qemu: QEMU
                                                          ) -> None:
    """A daemon thread waiting forever for an event does not keep the
    process from exiting, promptly and with status 0."""
    child = run_child(PULL_EVENT_FOREVER, qemu.path)
    report = f"stdout:\n{child.stdout}\nstderr:\n{child.stderr}"
    assert child.returncode == 0, report
    assert "EXITING" in child.stdout.split(), report
    assert child.elapsed < PROMPT, report


def test_daemon_thread_in_pull_event_exits_quietly(qemu: QEMU) -> None:
    """A daemon thread waiting forever for an event is not woken with
    an error at exit: nothing is printed on stderr."""
    assert_clean(run_child(PULL_EVENT_FOREVER, qemu.path), "EXITING")


COMMAND_IN_FLIGHT = LAST_WORDS + '''
import threading

from qmp_sync import QMPSyncClient

peer = Peer()
at_last.append(peer.close)  # the server hangs up only after exit
peer.send(GREETING)
client = QMPSyncClient()
handshake = threading.Thread(target=peer.answer)
handshake.start()
client.open_with_socket(peer.client_sock, timeout=10)
handshake.join(10)
daemon = threading.Thread(target=client.execute, args=("never",),
                          daemon=True)
daemon.start()
assert peer.recv()["execute"] == "never"  # and no reply, ever
print("EXITING")
'''


def test_exit_with_command_in_flight_is_prompt() -> None:
    """The interpreter exits promptly, with status 0, while a daemon
    thread waits for a reply that never comes."""
    child = run_child(COMMAND_IN_FLIGHT, peer=True)
    report = f"stdout:\n{child.stdout}\nstderr:\n{child.stderr}"
    assert child.returncode == 0, report
    assert "EXITING" in child.stdout.split(), report
    assert child.elapsed < PROMPT, report


def test_exit_with_command_in_flight_is_quiet() -> None:
    """Exiting while a daemon thread waits for a reply that never comes
    prints nothing on stderr."""
    assert_clean(run_child(COMMAND_IN_FLIGHT, peer=True), "EXITING")


def test_fork_inherited_client_fails_new_client_works(qemu2: QEMU
                                                      ) -> None:
    """After fork() an inherited client raises a QMPError naming fork
    (never hangs), a client made in the child works, and the parent's
    client is unharmed."""
    child = run_child('''
        import os
        import signal
        import sys
        import traceback

        from qmp_sync import QMPError, QMPSyncClient

        first, second = sys.argv[1:3]
        inherited = QMPSyncClient(first)
        inherited.connect(timeout=5)
        assert inherited.execute("query-status", timeout=5)["running"]
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            ok = False
            try:
                signal.alarm(5)  # watchdog: a hang kills the child
                for call in (
                        lambda: inherited.execute("query-status"),
                        lambda: inherited.pull_event(wait=True)):
                    try:
                        call()
                    except QMPError as err:
                        assert "fork" in str(err), err
                    else:
                        raise AssertionError("no QMPError")
                with QMPSyncClient(second) as fresh:
                    fresh.connect(timeout=5)
                    status = fresh.execute("query-status", timeout=5)
                    assert status["running"], status
                print("CHILD-OK", flush=True)
                ok = True
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(0 if ok else 1)
        signal.alarm(10)  # watchdog for waitpid
        _, status = os.waitpid(pid, 0)
        signal.alarm(0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert inherited.execute("query-status", timeout=5)["running"]
        inherited.close()
        print("PARENT-OK")
    ''', *qemu2.paths, warnings=(
        # Python 3.12+ warns about fork() in a process with threads.
        "error", "ignore:This process:DeprecationWarning"))
    assert_clean(child, "PARENT-OK")
    assert "CHILD-OK" in child.stdout.split()


def test_blocking_call_from_loop_thread_fails_at_once(qemu: QEMU) -> None:
    """Blocking calls made inside an event filter (the loop thread)
    raise QMPError at once instead of deadlocking; the client goes on."""
    client = QMPSyncClient(qemu.path)
    client.connect(timeout=10)
    errors: list[BaseException] = []
    calls: list[Callable[[], object]] = [
        lambda: client.execute("query-status", timeout=1),
        lambda: client.pull_event(wait=1),
        lambda: client.event_wait("NEVER", timeout=1)]

    def reenter(event: Message) -> bool:
        for call in calls:
            try:
                call()
            except BaseException as err:  # judged by the test below
                errors.append(err)
        return True

    try:
        with client.listen(event_filter=reenter) as listener:
            assert client.execute("stop") == {}
            event = listener.get(timeout=EVENT_TIMEOUT)
        assert event["event"] == "STOP"
        assert len(errors) == 3, errors
        for error in errors:
            assert isinstance(error, QMPError), repr(error)
            assert re.search("deadlock|loop thread", str(error)), error
        assert client.execute("cont") == {}
        assert client.event_wait("RESUME", EVENT_TIMEOUT)["event"] == (
            "RESUME")
    finally:
        client.close()


def test_one_loop_thread_for_many_clients() -> None:
    """The loop thread starts on first use, and 50 connected clients
    share it: one thread more than before, however many clients."""
    child = run_child('''
        import threading

        def loop_threads():
            return [thread for thread in threading.enumerate()
                    if thread.name == "qmp_sync loop"]

        before = threading.active_count()
        from qmp_sync import QMPSyncClient

        assert not loop_threads(), "started before first use"
        peers = [Peer() for _ in range(50)]

        def serve():
            for peer in peers:
                peer.handshake()

        server = threading.Thread(target=serve)
        server.start()
        clients = []
        for peer in peers:
            client = QMPSyncClient()
            client.open_with_socket(peer.client_sock, timeout=10)
            clients.append(client)
        server.join(10)
        assert not server.is_alive()
        assert all(c.runstate.name == "RUNNING" for c in clients)
        assert len(loop_threads()) == 1, threading.enumerate()
        assert loop_threads()[0].daemon
        assert threading.active_count() == before + 1, threading.enumerate()
        for client in clients:
            client.close()
        for peer in peers:
            peer.close()
        assert threading.active_count() == before + 1, threading.enumerate()
        print("ONE-LOOP-THREAD")
    ''', peer=True)
    assert_clean(child, "ONE-LOOP-THREAD")
