"""
``qmp-shell-wrap``: start QEMU with a private QMP connection (one end
of a socketpair, so there is no socket file to clean up or to collide
with), run the shell on it, and shut QEMU down when the shell ends.

Threads: main thread only.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from collections.abc import Sequence

from ..protocol import ConnectError
from ..sync import QMPSyncClient
from .cli import (
    CLIENT_NAME,
    EXIT_CONNECTION,
    EXIT_USAGE,
    Shell,
    argument_parser,
    options_from,
    session_scope,
)

__all__ = ("stop_qemu", "wrap_main")

#: The id of the monitor's character device on QEMU's command line.
CHARDEV_ID = "qmp-shell-wrap"
#: Seconds QEMU may take to start and greet.
STARTUP_TIMEOUT = 30.0
#: Seconds to wait for the exit status of a QEMU that hung up.
EXIT_WAIT = 2.0
#: Seconds QEMU gets to exit after ``quit``, and again after SIGTERM,
#: before the next step.
EXIT_GRACE = 5.0


def wrap_main(argv: Sequence[str] | None = None) -> int:
    """
    The ``qmp-shell-wrap`` program: run ``QEMU-COMMAND`` with a private
    monitor, and the shell on it. When the shell ends, QEMU is told to
    ``quit``, then sent SIGTERM, then SIGKILL, each after a bounded
    wait. Returns the shell's exit status.
    """
    parser = argument_parser("qmp-shell-wrap")
    parser.usage = ("%(prog)s [-h] [-H] [-v] [-p] [-l LOGFILE] "
                    "[--history FILE] -- QEMU-COMMAND...")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        metavar="QEMU-COMMAND",
                        help="the QEMU command line (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else \
        args.command
    if not command:
        parser.error("give the QEMU command line after --")
    with session_scope(args.logfile) as ok:
        if not ok:
            return EXIT_USAGE
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [*command,
                 "-chardev", f"socket,id={CHARDEV_ID},fd={theirs.fileno()}",
                 "-mon", f"chardev={CHARDEV_ID},mode=control"],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                # Its own session: Ctrl-C at the shell's prompt must not
                # reach QEMU through the terminal.
                start_new_session=True)
        except OSError as err:
            ours.close()
            print(f"Error: cannot run {command[0]}: {err.strerror}",
                  file=sys.stderr)
            return EXIT_CONNECTION
        finally:
            theirs.close()
        try:
            return _run_shell(process, ours, args)
        finally:
            how = stop_qemu(process)
            if how != "exited":
                print(f"qmp-shell-wrap: QEMU did not quit, so it was {how}",
                      file=sys.stderr)


def _run_shell(process: subprocess.Popen[bytes], sock: socket.socket,
               args: argparse.Namespace) -> int:
    """Open the session on our end of the socketpair and run the
    shell; the shell ends it with ``quit``."""
    client = QMPSyncClient(name=CLIENT_NAME)
    try:
        client.open_with_socket(sock, timeout=STARTUP_TIMEOUT)
    except (ConnectError, TimeoutError) as err:
        client.close()
        try:
            # A monitor that hangs up first is mostly a QEMU on its way
            # out (bad arguments): say how it ended.
            status: int | None = process.wait(EXIT_WAIT)
        except subprocess.TimeoutExpired:
            status = None
        if status is not None:
            print(f"Error: QEMU exited (status {status}) before its monitor "
                  "answered", file=sys.stderr)
        else:
            print(f"Error: QEMU's monitor did not answer: {err}",
                  file=sys.stderr)
        return EXIT_CONNECTION
    options = options_from(args)
    options.quit_at_exit = True
    return Shell(client, options).run()


def stop_qemu(process: subprocess.Popen[bytes],
              grace: float = EXIT_GRACE) -> str:
    """
    Wait for QEMU to exit; if it does not within `grace` seconds send
    SIGTERM, and if it still lives `grace` seconds later, SIGKILL. The
    process is reaped in every case.

    :return: How it ended: ``"exited"``, ``"terminated"`` or
        ``"killed"``.
    """
    if _exited_within(process, grace):
        return "exited"
    process.terminate()
    if _exited_within(process, grace):
        return "terminated"
    process.kill()
    process.wait()
    return "killed"


def _exited_within(process: subprocess.Popen[bytes], seconds: float) -> bool:
    """Whether `process` exits (and is reaped) within `seconds`."""
    try:
        process.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False
    except KeyboardInterrupt:
        # Another Ctrl-C while waiting: no more patience.
        return False
