"""
``qmp-shell-wrap``: start QEMU as a `QEMUMachine` (its monitor is one
end of a socketpair, so there is no socket file to clean up or to
collide with), run the shell on it, and shut QEMU down when the shell
ends.

QEMU's own output goes to the machine's log, not to the terminal where
it would tear through the line being typed: a QEMU that fails to start
is reported with what it said, and whatever it printed during the
session is shown once the shell has ended.

Threads: main thread only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence

from ..machine import AbnormalShutdown, QEMUMachine, VMLaunchFailure
from .cli import (
    CLIENT_NAME,
    EXIT_CONNECTION,
    EXIT_USAGE,
    Shell,
    argument_parser,
    options_from,
    session_scope,
)

__all__ = ("wrap_main",)

#: Seconds QEMU may take to start and greet.
STARTUP_TIMEOUT = 30.0
#: Seconds QEMU gets to exit after ``quit`` before it is sent SIGTERM.
EXIT_GRACE = 5.0


def wrap_main(argv: Sequence[str] | None = None) -> int:
    """
    The ``qmp-shell-wrap`` program: run ``QEMU-COMMAND`` with a private
    monitor, and the shell on it. When the shell ends, QEMU is told to
    ``quit``, then stopped with SIGTERM and SIGKILL if it has not
    exited, each after a bounded wait. Returns the shell's exit status
    (`EXIT_CONNECTION` when QEMU fails to start); argparse exits by
    itself for bad usage. Main thread.
    """
    parser = argument_parser("qmp-shell-wrap")
    parser.usage = ("%(prog)s [-h] [--version] [-H] [-v] [-p] [-l LOGFILE] "
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
        # Named as the shell's client, so that -l logs its messages.
        machine = QEMUMachine(command[0], command[1:], name=CLIENT_NAME,
                              base_temp_dir=tempfile.gettempdir(),
                              qmp_timer=STARTUP_TIMEOUT)
        if not _launch(machine, command[0]):
            return EXIT_CONNECTION
        try:
            return _run_shell(machine, args)
        finally:
            _stop(machine)


def _launch(machine: QEMUMachine, binary: str) -> bool:
    """Main thread: launch `machine`; False when it failed (said why
    on stderr, with QEMU's exit status and output)."""
    try:
        machine.launch()
    except VMLaunchFailure as err:
        _error(_launch_failure(err, binary))
        return False
    except OSError as err:
        # The machine's temporary directory could not be made.
        _error(f"cannot start QEMU: {err}")
        return False
    return True


def _launch_failure(err: VMLaunchFailure, binary: str) -> str:
    """What to tell the user about a QEMU that did not start."""
    cause = err.__cause__
    if err.exitcode is None and isinstance(cause, OSError):
        return f"cannot run {binary}: {cause.strerror or cause}"
    if err.exitcode is not None:
        said = f"; it said:\n{err.output.rstrip()}" if err.output.strip() \
            else ""
        return (f"QEMU exited (status {err.exitcode}) before its monitor "
                f"answered{said}")
    return f"QEMU's monitor did not answer: {err.output}"


def _run_shell(machine: QEMUMachine, args: argparse.Namespace) -> int:
    """Main thread: run the shell on the machine's client; the shell
    ends the session with ``quit``."""
    options = options_from(args)
    options.quit_at_exit = True
    return Shell(machine.client, options).run()


def _stop(machine: QEMUMachine) -> None:
    """
    Main thread: shut QEMU down (it has mostly quit already) and show
    what it printed; say so on stderr when it had to be stopped by a
    signal or exited with a failure status.
    """
    try:
        machine.shutdown(timeout=EXIT_GRACE)
    except AbnormalShutdown as err:
        print(f"qmp-shell-wrap: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        # Another Ctrl-C while waiting for QEMU: no more patience.
        machine.kill()
    output = machine.get_log()
    if output and output.strip():
        print(f"qmp-shell-wrap: QEMU said:\n{output.rstrip()}",
              file=sys.stderr)


def _error(text: str) -> None:
    print(f"Error: {text}", file=sys.stderr)
