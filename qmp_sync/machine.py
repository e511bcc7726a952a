"""
`QEMUMachine`: launch a QEMU and drive it with the blocking client.

The names, signatures and return values are those of QEMU's in-tree
``qemu.machine.QEMUMachine`` for the part its users call, so that code
written for it switches by changing an import (or, unchanged, through
``qmp_sync.compat``). Beyond it: the monitor is one end of a socketpair
(no socket file to leak), `shutdown` always reaps and never leaves a
QEMU behind, also when interrupted, and a QEMU that refuses its
arguments or exits early is a `VMLaunchFailure` from `launch` carrying
its exit status and output. `client` is the `QMPSyncClient` underneath.

Threads: everything here runs in the caller's thread; one machine is
driven by one thread at a time (its client may be shared).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from .error import QMPError
from .legacy import QMPMessage, QMPReturnValue
from .protocol import ConnectError, SocketAddrT
from .qmp_client import ExecInterruptedError
from .sync import QMPSyncClient, event_match

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = (
    "AbnormalShutdown",
    "QEMUMachine",
    "QEMUMachineError",
    "VMLaunchFailure",
)

_logger = logging.getLogger(__name__)

#: How many times `QEMUMachine.launch` starts QEMU whose monitor failed
#: at start-up (see there).
STARTUP_ATTEMPTS = 3
#: How long a QEMU whose monitor hung up may take to exit: at launch,
#: one still running then counts as a start-up race.
_EXIT_GRACE = 2.0
#: How long `shutdown` waits for QEMU after SIGTERM, before SIGKILL.
_TERM_GRACE = 10.0
#: How much of QEMU's output a `VMLaunchFailure` quotes.
_OUTPUT_TAIL = 4000


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """
    In the main thread: hold a Ctrl-C back until the block is over, then
    let it through. Used around starting QEMU: a KeyboardInterrupt
    raised inside ``subprocess.Popen`` after the fork would lose the
    handle of a process that then runs on.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[FrameType | None] = []
    previous = signal.signal(signal.SIGINT,
                             lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, caught[0])


def _exit_status_soon(popen: subprocess.Popen[bytes]) -> int | None:
    """QEMU's exit status once it has exited, waiting up to
    `_EXIT_GRACE` seconds for that; None if it still runs."""
    try:
        return popen.wait(_EXIT_GRACE)
    except subprocess.TimeoutExpired:
        return None


def _kill_now(popen: subprocess.Popen[bytes]) -> None:
    """SIGKILL QEMU's process group and reap QEMU, with Ctrl-C held
    back meanwhile (a KILLed process is reaped at once)."""
    with _ctrl_c_deferred():
        _signal_group(popen.pid, signal.SIGKILL)
        popen.wait()


def _kill_abandoned(popen: subprocess.Popen[bytes], name: str,
                    temp_dir: str | None) -> None:
    """
    Any thread (the garbage collector's, or the main thread at exit):
    the finaliser of a machine dropped, or left at exit, with its QEMU
    running. QEMU runs in a session of its own and would outlive us:
    kill it, reap it, remove the temporary directory, and say so.
    """
    if popen.poll() is None:
        _kill_now(popen)
        warnings.warn(
            f"QEMUMachine {name!r} was not shut down: its QEMU (pid "
            f"{popen.pid}) was killed. Call shutdown(), or use the "
            "machine as a context manager", ResourceWarning, stacklevel=1)
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _chardev_address(address: SocketAddrT) -> str:
    """The chardev options of a socket client of `address`."""
    if not isinstance(address, tuple):
        return f"path={os.fspath(address)}"
    host, port = address
    return f"host={host},port={port}"


def _signal_group(pgid: int, signum: int) -> None:
    """Send `signum` to process group `pgid`, if any process is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class QEMUMachineError(QMPError):
    """An error of the machine layer (not of QMP itself)."""


class VMLaunchFailure(QEMUMachineError):
    """
    QEMU could not be launched, refused its arguments, or exited before
    its monitor was ready.

    :param exitcode: QEMU's exit status, if it exited (negative: killed
        by that signal).
    :param command: The command line.
    :param output: What QEMU printed (its tail).
    """

    def __init__(self, exitcode: int | None, command: str, output: str):
        super().__init__(exitcode, command, output)
        #: QEMU's exit status, if it exited.
        self.exitcode = exitcode
        #: The command line.
        self.command = command
        #: What QEMU printed (its tail).
        self.output = output

    def __str__(self) -> str:
        if self.exitcode is None:  # QEMU did not start, or was stopped
            text = f"QEMU failed to launch: {self.command}"
            return f"{text}\n{self.output.rstrip()}" if self.output else text
        text = (f"QEMU failed to launch (exit status {self.exitcode}): "
                f"{self.command}")
        if self.output:
            text += f"\nQEMU said:\n{self.output.rstrip()}"
        return text


class _StartupRace(Exception):
    """QEMU runs but its monitor failed the negotiation at start-up."""

    def __init__(self, command: str):
        super().__init__(command)
        self.command = command


class AbnormalShutdown(QEMUMachineError):
    """QEMU did not shut down cleanly: it had to be killed, or it exited
    with a signal or a status other than 0."""


class QEMUMachine:
    """
    A QEMU process with a QMP monitor, as QEMU's own ``QEMUMachine``.

    :param binary: The QEMU binary.
    :param args: Arguments for QEMU, besides those the machine adds
        (``-display none -vga none`` and the monitor).
    :param wrapper: A command to run QEMU under (``["gdbserver", ...]``).
    :param name: A name for logs and temporary files.
    :param base_temp_dir: Where the temporary directory goes.
    :param monitor_address: A unix socket path or ``(host, port)``
        where the machine listens for QEMU's monitor to connect (the
        socket file is removed at shutdown); by default the monitor is
        one end of a socketpair, with no file at all.
    :param drain_console: Accepted for compatibility; the console is
        never drained here (read `console_socket` yourself).
    :param console_log: Accepted for compatibility; see `drain_console`.
    :param log_dir: Where QEMU's output log goes (default: the temporary
        directory).
    :param qmp_timer: Seconds the monitor's greeting may take at launch.
    """

    def __init__(self, binary: str, args: Sequence[str] = (),
                 wrapper: Sequence[str] = (), name: str | None = None,
                 base_temp_dir: str = "/var/tmp",
                 monitor_address: SocketAddrT | None = None,
                 drain_console: bool = False,
                 console_log: str | None = None,
                 log_dir: str | None = None,
                 qmp_timer: float | None = 30.0) -> None:
        self._binary = binary
        self._args = list(args)
        self._wrapper = list(wrapper)
        self._name = name or f"qemu-{os.getpid()}-{id(self):x}"
        self._base_temp_dir = base_temp_dir
        self._log_dir = log_dir
        self._qmp_timer = qmp_timer
        self._monitor_address = monitor_address
        self._machine: str | None = None
        self._console: tuple[str | None, int] | None = None
        self._console_sock: socket.socket | None = None
        self._pass_fds: list[int] = []
        self._temp_dir: str | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._abandoned: weakref.finalize[Any, Any] | None = None
        self._log_path: str | None = None
        self._log_text = ""
        self._exitcode: int | None = None
        self._quit_issued = False
        self._launched = False
        #: The blocking client on the monitor (usable once launched).
        self.client = QMPSyncClient(name=self._name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.shutdown()

    # ------------------------------------------------------------------
    # Configuration, before launch().

    def add_args(self, *args: str) -> None:
        """Add arguments to QEMU's command line."""
        self._args.extend(args)

    def set_machine(self, machine_type: str) -> None:
        """Pass ``-machine machine_type``."""
        self._machine = machine_type

    def set_console(self, device_type: str | None = None,
                    console_index: int = 0) -> None:
        """
        Give the machine a console at launch: a chardev on a unix socket
        in `temp_dir` (read and written through `console_socket`),
        attached as serial port `console_index` (the ones before it are
        ``null``), or as a ``-device device_type`` when one is given.
        """
        self._console = (device_type, console_index)

    def add_fd(self, fd: int, fdset: int, opaque: str,
               opts: str = "") -> QEMUMachine:
        """Pass file descriptor `fd` to QEMU at launch, in fdset `fdset`
        (``-add-fd``); returns the machine."""
        options = [f"fd={fd}", f"set={fdset}", f"opaque={opaque}"]
        if opts:
            options.append(opts)
        self._pass_fds.append(fd)
        self._args += ["-add-fd", ",".join(options)]
        return self

    # ------------------------------------------------------------------
    # Properties.

    @property
    def temp_dir(self) -> str:
        """A temporary directory of this machine's, removed at shutdown."""
        if self._temp_dir is None:
            self._temp_dir = tempfile.mkdtemp(prefix=f"{self._name}_",
                                              dir=self._base_temp_dir)
        return self._temp_dir

    @property
    def log_dir(self) -> str:
        """Where QEMU's output log is written."""
        return self._log_dir or self.temp_dir

    def is_running(self) -> bool:
        """True while the QEMU process runs."""
        return self._popen is not None and self._popen.poll() is None

    def exitcode(self) -> int | None:
        """QEMU's exit status once it has exited (negative: the signal
        that killed it), else None."""
        if self._popen is not None:
            return self._popen.poll()
        return self._exitcode

    def get_pid(self) -> int | None:
        """QEMU's process id while it runs, else None."""
        return self._popen.pid if self.is_running() else None  # type: ignore

    def get_log(self) -> str | None:
        """What QEMU printed, once it has exited; None before."""
        return self._log_text if self._launched else None

    # ------------------------------------------------------------------
    # Life cycle.

    def _command(self, monitor: str) -> list[str]:
        args = ["-display", "none", "-vga", "none",
                "-chardev", monitor,
                "-mon", "chardev=mon,mode=control"]
        if self._machine is not None:
            args += ["-machine", self._machine]
        if self._console is not None:
            device_type, index = self._console
            args += ["-chardev", f"socket,id=console,server=on,wait=off,"
                     f"path={self._console_path}"]
            if device_type is None:
                args += ["-serial", "null"] * index
                args += ["-serial", "chardev:console"]
            else:
                args += ["-device", f"{device_type},chardev=console"]
        return [*self._wrapper, self._binary, *args, *self._args]

    @property
    def _console_path(self) -> str:
        return os.path.join(self.temp_dir, "console.sock")

    @property
    def console_socket(self) -> socket.socket:
        """
        A socket connected to the console (see `set_console`), made on
        first use and closed at shutdown.

        :raise QEMUMachineError: When the machine has no console or does
            not run.
        """
        if self._console is None or not self.is_running():
            raise QEMUMachineError("console_socket: the machine has no "
                                   "console (set_console() before "
                                   "launch()) or does not run")
        if self._console_sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self._console_path)
            except OSError:
                sock.close()
                raise
            self._console_sock = sock
        return self._console_sock

    def launch(self) -> None:
        """
        Start QEMU and connect to its monitor; return once QEMU has
        answered the capabilities negotiation, so it runs its main loop
        and every chardev of its command line exists (a client of
        another monitor connecting now does not see QEMU's start-up
        ``RESUME``).

        QEMU 7.2 can, rarely, greet a client that connects while it is
        still starting twice and then lose the negotiation. Such a start
        is not the caller's fault: QEMU is killed and launched again, at
        most `STARTUP_ATTEMPTS` times in all, each time logged.

        :raise VMLaunchFailure: When QEMU cannot start, refuses its
            arguments, or exits before its monitor greets; it carries the
            exit status and QEMU's output. Nothing is left running.
        :raise QEMUMachineError: When the machine runs already.
        """
        if self.is_running():
            raise QEMUMachineError("launch(): the machine runs already")
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            try:
                self._launch_once()
                return
            except _StartupRace as race:
                if attempt == STARTUP_ATTEMPTS:
                    raise VMLaunchFailure(
                        None, race.command,
                        f"the monitor failed {attempt} starts: "
                        f"{race.__cause__}") from race.__cause__
                _logger.warning("%s: QEMU's monitor failed at start-up "
                                "(%s); launching it again",
                                self._name, race.__cause__)

    def _launch_once(self) -> None:
        """One attempt of `launch`; raises `_StartupRace` (QEMU reaped)
        when QEMU runs but its monitor failed the negotiation."""
        self._quit_issued = False
        self._exitcode = None
        self._log_text = ""
        self._log_path = os.path.join(self.log_dir, f"{self._name}.log")
        mine: socket.socket | None = None
        theirs: socket.socket | None = None
        if self._monitor_address is None:
            mine, theirs = socket.socketpair()
            monitor = f"socket,id=mon,fd={theirs.fileno()}"
        else:
            # QEMU connects to us, as QEMU's own QEMUMachine has it.
            monitor = "socket,id=mon," + _chardev_address(
                self._monitor_address)
            try:
                self.client.start_server(self._monitor_address)
            except ConnectError as err:
                self._remove_temp_dir()
                raise VMLaunchFailure(
                    None, f"-chardev {monitor}",
                    f"the machine cannot listen for QEMU's monitor: {err}"
                    ) from err
        command = self._command(monitor)
        try:
            # A session of its own: Ctrl-C at the terminal is ours to
            # handle, and stopping the group stops a wrapper's children.
            with open(self._log_path, "wb") as log, _ctrl_c_deferred():
                self._popen = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                    pass_fds=[*([] if theirs is None else [theirs.fileno()]),
                              *self._pass_fds])
            self._launched = True
            # The safety net of a machine nobody shuts down.
            self._abandoned = weakref.finalize(
                self, _kill_abandoned, self._popen, self._name,
                self._temp_dir)
            if theirs is not None:
                theirs.close()
            try:
                if mine is None:
                    self.client.accept(timeout=self._qmp_timer)
                else:
                    self.client.open_with_socket(mine,
                                                 timeout=self._qmp_timer)
            except (ConnectError, TimeoutError) as err:
                # A QEMU that refused its arguments closes the monitor
                # just before it exits: give it a moment to do so.
                exited = _exit_status_soon(self._popen) is not None
                self._reap(hard=True)
                if not exited:
                    raise _StartupRace(" ".join(command)) from err
                raise VMLaunchFailure(self._exitcode, " ".join(command),
                                      self._log_text[-_OUTPUT_TAIL:]
                                      ) from err
        except OSError as err:
            for sock in (mine, theirs):
                if sock is not None:
                    sock.close()
            self._reap(hard=True)
            raise VMLaunchFailure(None, " ".join(command), str(err)) from err
        except BaseException:
            # Ctrl-C at the worst moment: leave no QEMU behind.
            if theirs is not None:
                theirs.close()
            self._reap(hard=True)
            raise

    def wait(self, timeout: float | None = 30.0) -> None:
        """
        Wait for QEMU to exit by itself (after a ``quit``, say), then
        clean up.

        :raise subprocess.TimeoutExpired: When it runs on past `timeout`.
        """
        if self._popen is not None:
            self._popen.wait(timeout)
        self._reap(hard=False)

    def shutdown(self, hard: bool = False, timeout: float | None = 30.0
                 ) -> None:
        """
        Stop QEMU and clean up; does nothing when it is not running.
        Gracefully, ``quit`` then a wait of `timeout` seconds; then (or
        at once when `hard`) SIGTERM, and SIGKILL if that does not do.
        The process is always reaped, the monitor closed and the
        temporary directory removed.

        :raise AbnormalShutdown: When a graceful shutdown needed a
            signal, or QEMU exited with a failure status.
        """
        popen = self._popen
        if popen is None:
            self._remove_temp_dir()
            return
        forced = False
        try:
            if not hard and popen.poll() is None:
                if not self._quit_issued:
                    # The connection may well end before the reply comes.
                    with contextlib.suppress(QMPError):
                        self.client.execute("quit", timeout=timeout)
                try:
                    popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    forced = True
        except BaseException:
            # Ctrl-C while QEMU quits: kill it and clean up, then go on.
            _kill_now(popen)
            self._reap(hard=True)
            raise
        self._reap(hard=True)
        code = self._exitcode
        if not hard and (forced or (code is not None and code != 0)):
            raise AbnormalShutdown(
                f"QEMU did not shut down cleanly (exit status {code}"
                f"{', killed after quit timed out' if forced else ''})")

    def kill(self) -> None:
        """Shut QEMU down at once (SIGTERM, then SIGKILL)."""
        self.shutdown(hard=True)

    def _reap(self, hard: bool) -> None:
        """Stop QEMU if `hard` (SIGTERM, then SIGKILL), reap it, close
        the monitor, keep the log, remove the temporary directory."""
        popen = self._popen
        if popen is not None:
            try:
                if hard and popen.poll() is None:
                    _signal_group(popen.pid, signal.SIGTERM)
                    try:
                        popen.wait(_TERM_GRACE)
                    except subprocess.TimeoutExpired:
                        _signal_group(popen.pid, signal.SIGKILL)
                popen.wait()
            except BaseException:
                _kill_now(popen)  # Ctrl-C while waiting: no QEMU left
                raise
            # Whatever a wrapper left behind in the group goes too.
            _signal_group(popen.pid, signal.SIGKILL)
            self._exitcode = popen.returncode
            self._popen = None
            if self._abandoned is not None:
                self._abandoned.detach()
                self._abandoned = None
        if self._console_sock is not None:
            self._console_sock.close()
            self._console_sock = None
        # close() re-raises what ended the session (a protocol error, an
        # OSError): QEMU is gone either way, and that is what was asked.
        with contextlib.suppress(Exception):
            self.client.close()
        if self._log_path is not None and os.path.exists(self._log_path):
            with open(self._log_path, errors="replace") as log:
                self._log_text = log.read()
        self._remove_temp_dir()

    def _remove_temp_dir(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    # ------------------------------------------------------------------
    # QMP.

    @staticmethod
    def _qmp_args(conv_keys: bool,
                  args: dict[str, Any]) -> dict[str, object]:
        if conv_keys:
            return {key.replace("_", "-"): value
                    for key, value in args.items()}
        return args

    def _arguments(self, args_dict: dict[str, object] | None,
                   conv_keys: bool | None,
                   args: dict[str, Any]) -> dict[str, object]:
        if args_dict is not None:
            if args or conv_keys is not None:
                raise TypeError("args_dict goes alone, without keyword "
                                "arguments or conv_keys")
            return args_dict
        return self._qmp_args(True if conv_keys is None else conv_keys,
                              args)

    def qmp(self, cmd: str, args_dict: dict[str, object] | None = None,
            conv_keys: bool | None = None, **args: Any) -> QMPMessage:
        """
        Execute `cmd`; return the whole reply (error replies included).
        Keyword arguments have ``_`` turned into ``-`` unless
        `conv_keys` is False; `args_dict` is used as it is.
        """
        arguments = self._arguments(args_dict, conv_keys, args)
        message: dict[str, object] = {"execute": cmd}
        if arguments:
            message["arguments"] = arguments
        with self._naming_the_exit():
            reply = self.client.execute_reply(message).to_dict()
        if cmd == "quit" and "return" in reply:
            self._quit_issued = True
        return reply

    def cmd(self, cmd: str, args_dict: dict[str, object] | None = None,
            conv_keys: bool | None = None, **args: Any) -> QMPReturnValue:
        """
        Execute `cmd`; return its ``return`` value.

        :raise ExecuteError: When QEMU answers with an error.
        """
        arguments = self._arguments(args_dict, conv_keys, args)
        with self._naming_the_exit():
            value = self.client.execute(cmd, arguments or None)
        if cmd == "quit":
            self._quit_issued = True
        return value

    @contextlib.contextmanager
    def _naming_the_exit(self) -> Iterator[None]:
        """Turn the `ExecInterruptedError` of a command whose QEMU died
        into one that names QEMU's exit status."""
        try:
            yield
        except ExecInterruptedError as err:
            code = None if self._popen is None else _exit_status_soon(
                self._popen)
            if code is None:
                raise
            raise ExecInterruptedError(
                f"{err} (QEMU exited, exit status {code})") from err

    def send_fd_scm(self, fd: int | None = None,
                    file_path: str | None = None) -> None:
        """Pass `fd`, or a file opened from `file_path`, to QEMU
        (SCM_RIGHTS) for its next ``getfd``/``add-fd``."""
        if (fd is None) == (file_path is None):
            raise ValueError("send_fd_scm() takes fd or file_path")
        if file_path is not None:
            with open(file_path, "rb") as file:
                self.client.send_fd_scm(file.fileno())
            return
        assert fd is not None
        self.client.send_fd_scm(fd)

    # ------------------------------------------------------------------
    # Events.

    @staticmethod
    def event_match(event: Any, match: Any = None) -> bool:
        """QEMU's matching rule (see ``qmp_sync.sync.event_match``)."""
        return event_match(event, match)

    def get_qmp_event(self, wait: bool | float = False) -> QMPMessage | None:
        """The oldest queued event (see `QMPSyncClient.pull_event`)."""
        event = self.client.pull_event(wait)
        return None if event is None else event.to_dict()

    def get_qmp_events(self, wait: bool | float = False) -> list[QMPMessage]:
        """Every queued event (see `QMPSyncClient.get_events`)."""
        return [event.to_dict() for event in self.client.get_events(wait)]

    def clear_events(self) -> None:
        """Drop every queued event."""
        self.client.clear_events()

    def event_wait(self, name: str, timeout: float | None = 60.0,
                   match: dict[str, object] | None = None
                   ) -> QMPMessage | None:
        """
        Take out the first event called `name` matching `match`. With a
        `timeout` of 0 or None only queued events are looked at (None
        when there is none, as QEMU's does).

        :raise TimeoutError: When `timeout` seconds pass first.
        """
        return self.events_wait([(name, match)], timeout)

    def events_wait(self, events: Sequence[tuple[str, Any]],
                    timeout: float | None = 60.0) -> QMPMessage | None:
        """As `event_wait`, for the first of several ``(name, match)``."""
        if not timeout:
            try:
                found = self.client.events_wait(events, timeout=0)
            except TimeoutError:
                return None
        else:
            found = self.client.events_wait(events, timeout=timeout)
        return found.to_dict()
