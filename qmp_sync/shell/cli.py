"""
``qmp-shell``: type QMP commands at a running QEMU (or run a script of
them), with events shown as they come.

Threads: everything here runs in the main thread (the terminal's event
pump is `console`'s business).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType
from typing import TextIO

from .. import __version__
from ..error import QMPError
from ..legacy import QEMUMonitorProtocol, QMPBadPortError
from ..message import Message
from ..protocol import ConnectError, Runstate, SocketAddr, StateError
from ..qmp_client import ExecInterruptedError, ExecuteError
from ..sync import QMPSyncClient
from .completion import complete_hmp, complete_qmp
from .console import SessionEnded, Terminal
from .output import (
    colour_wanted,
    columns,
    highlight_json,
    terminal_width,
    wrap_line,
)
from .schema import HumanCommands, Schema, mappings
from .syntax import (
    Command,
    CommandLineError,
    Help,
    LineParser,
    RawMessage,
)

__all__ = ("EXIT_CONNECTION", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE",
           "Options", "Shell", "argument_parser", "main")

#: Every command succeeded.
EXIT_OK = 0
#: A command failed (an error reply, or a line that was not sent).
EXIT_FAILED = 1
#: Bad usage (argparse's code too).
EXIT_USAGE = 2
#: The connection could not be made, or was lost.
EXIT_CONNECTION = 3

#: Seconds to wait for the greeting: QEMU serves one client per
#: monitor, and a second one waits for it without a word.
CONNECT_TIMEOUT = 10.0
#: Seconds for fetching the schema and for the ``quit`` of
#: qmp-shell-wrap.
QUERY_TIMEOUT = 10.0
#: The client's name, in logs.
CLIENT_NAME = "qmp-shell"
HISTORY_FILE = "~/.qmp-shell_history"

_HMP_CPU = re.compile(r"^\s*cpu\s+(\S+)\s*$")


@dataclasses.dataclass
class Options:
    """How the shell talks and shows things (the command-line flags)."""

    #: Send lines to the human monitor (HMP) instead.
    hmp: bool = False
    #: Echo each message sent.
    verbose: bool = False
    #: Indent JSON output.
    pretty: bool = False
    #: The history file, or None for none.
    history: str | None = None
    #: End the session with ``quit`` (qmp-shell-wrap's QEMU is ours).
    quit_at_exit: bool = False


class Shell:
    """
    One shell session over a connected client: reads lines (from the
    terminal, or from a script when stdin is not one), sends the
    commands, prints replies and events. Main thread only.

    `run` ends the session before it returns.
    """

    def __init__(self, client: QMPSyncClient, options: Options,
                 stdin: TextIO | None = None, stdout: TextIO | None = None,
                 stderr: TextIO | None = None) -> None:
        self.client = client
        self.options = options
        self._in = stdin or sys.stdin
        self._out = stdout or sys.stdout
        self._err = stderr or sys.stderr
        self._parser = LineParser()
        self._schema: Schema | None = None
        self._human: HumanCommands | None = None
        self._terminal: Terminal | None = None
        self._failures = 0
        self._cpu_index: int | None = None
        # JSON in colour: only interactively, on a terminal that wants it.
        self._colour = False
        # The server confirmed a `quit`: the session's end is expected.
        self._quit = False

    # ------------------------------------------------------------------
    # The two ways to run.

    def run(self) -> int:
        """Read and run lines until the end of input (Ctrl-D), or until
        the connection is lost; return the exit status."""
        try:
            if self._in.isatty():
                return self._interact()
            return self._run_script()
        finally:
            self._end_session()

    def _run_script(self) -> int:
        """Run each line of a non-terminal stdin; every reply and event
        is one line of JSON."""
        for line in self._in:
            if not self._run_line(line.rstrip("\n")):
                return EXIT_CONNECTION
        if self._parser.in_transaction:
            self._error("the input ended inside 'transaction('; "
                        "nothing was sent")
        self._print_events()
        return EXIT_FAILED if self._failures else EXIT_OK

    def _interact(self) -> int:
        """The interactive loop, on a terminal."""
        self._banner()
        self._colour = colour_wanted(self._out)
        terminal = Terminal(self.client, self._format, self._complete,
                            self.options.history, self._out)
        with terminal:
            self._terminal = terminal
            try:
                return self._interact_loop(terminal)
            finally:
                self._terminal = None
                # Ending the session stops the terminal's event pump.
                self._end_session()

    def _interact_loop(self, terminal: Terminal) -> int:
        while True:
            prompt = "TRANS> " if self._parser.in_transaction else "(QEMU) "
            try:
                line = terminal.read_line(prompt)
            except EOFError:
                self._print()
                break
            except KeyboardInterrupt:
                self._print()
                if self._parser.in_transaction:
                    self._parser.reset()
                    self._error("transaction abandoned", failed=False)
                continue
            except SessionEnded:
                if self._quit:
                    self._print("QEMU has quit.")
                    break
                self._lost(None)
                return EXIT_CONNECTION
            if not self._run_line(line):
                return EXIT_CONNECTION
        return EXIT_FAILED if self._failures else EXIT_OK

    def _banner(self) -> None:
        greeting = self.client.greeting
        version = ""
        with contextlib.suppress(KeyError, TypeError):
            qemu = greeting["QMP"]["version"]["qemu"]  # type: ignore
            version = (f" {qemu['major']}.{qemu['minor']}"
                       f".{qemu['micro']}")
        monitor = "human monitor via QMP" if self.options.hmp else "QMP"
        peer = (f"QEMU{version} ({monitor})" if greeting is not None
                else "the server, without a greeting (-N)")
        self._print(f"Connected to {peer}. Type 'help' for its commands, "
                    "Ctrl-D to leave.")

    def _end_session(self) -> None:
        """End the session (with ``quit`` first, for qmp-shell-wrap)."""
        if (self.options.quit_at_exit
                and self.client.runstate is Runstate.RUNNING):
            with contextlib.suppress(QMPError, TimeoutError):
                self.client.execute("quit", timeout=QUERY_TIMEOUT)
        with contextlib.suppress(QMPError):
            self.client.close()

    # ------------------------------------------------------------------
    # One line.

    def _run_line(self, line: str) -> bool:
        """Run one line; False when the connection is lost."""
        try:
            if self.options.hmp:
                self._run_human(line)
            else:
                self._run_qmp(line)
        except CommandLineError as err:
            self._error(str(err))
        except (ExecInterruptedError, StateError) as err:
            self._lost(err)
            return False
        return True

    def _run_qmp(self, line: str) -> None:
        """Run a line of QMP shell syntax."""
        request = self._parser.feed(line)
        if isinstance(request, Help):
            self._help(request.topic)
        elif isinstance(request, Command):
            problem = self._get_schema().check(request.name,
                                               request.arguments)
            if problem is not None:
                raise CommandLineError(problem)
            self._send(request.message())
        elif isinstance(request, RawMessage):
            self._send(request.message)

    def _send(self, msg: Mapping[str, object]) -> None:
        """Send a QMP command and print its reply."""
        reply = self._exchange(msg)
        if reply is None:
            return
        error = reply.get("error")
        if error is not None:
            self._failures += 1
            if self._terminal is None:
                self._print(self._format(reply))
            else:
                self._error(_error_line(error), failed=False)
        else:
            self._print(self._format(reply))
            self._quit = msg.get("execute") == "quit"

    def _run_human(self, line: str) -> None:
        """Send a line to the human monitor and print what it says."""
        if not line.strip() or line.lstrip().startswith("#"):
            return
        cpu = _HMP_CPU.match(line)
        if cpu:
            self._choose_cpu(cpu.group(1))
            return
        arguments: dict[str, object] = {"command-line": line}
        if self._cpu_index is not None:
            arguments["cpu-index"] = self._cpu_index
        reply = self._exchange({"execute": "human-monitor-command",
                                "arguments": arguments})
        if reply is None:
            return
        if "error" in reply:
            self._error(_error_line(reply["error"]))
            return
        text = reply.get("return")
        if isinstance(text, str) and text:
            self._out.write(text.replace("\r\n", "\n"))
            self._out.flush()
        self._quit = line.split()[0] in ("quit", "q")

    def _exchange(self, msg: Mapping[str, object]) -> Message | None:
        """
        Send `msg` and wait for its reply (printing events meanwhile);
        None when there is none to show (interrupted, or refused before
        sending: said so).

        :raise ExecInterruptedError: When the connection is lost.
        :raise StateError: When it was lost before.
        """
        if self.options.verbose:
            self._print(self._format(msg))
        try:
            with self._waiting():
                reply = self.client.execute_reply(msg)
        except KeyboardInterrupt:
            self._error("interrupted: the reply will be ignored (the "
                        "command may still take effect)")
            return None
        except (ExecInterruptedError, StateError):
            raise
        except (QMPError, TypeError, ValueError) as err:
            self._error(str(err))
            return None
        self._print_events()
        return reply

    def _choose_cpu(self, index: str) -> None:
        """HMP's ``cpu N`` is a setting of the monitor, not a command:
        check that the CPU exists, then send it with every command."""
        if not index.isdigit():
            raise CommandLineError("cpu takes a CPU index (a number)")
        try:
            self.client.execute("human-monitor-command", {
                "command-line": "info version", "cpu-index": int(index)})
        except ExecuteError as err:
            self._error(f"{err.error_class}: {err}")
            return
        self._cpu_index = int(index)

    def _help(self, topic: str | None) -> None:
        """``help`` lists the commands in columns; ``help CMD`` a
        command's arguments; both as wide as the terminal."""
        schema = self._get_schema()
        width = terminal_width(self._out)
        if topic is None:
            names = schema.commands or ["(the server did not list them)"]
            self._print("\n".join(columns(names, width)))
            return
        if topic not in schema.commands:
            problem = schema.check(topic, {})
            raise CommandLineError(problem or f"no help for {topic!r}")
        lines = schema.describe(topic) or ["  (its arguments are unknown)"]
        self._print(topic)
        self._print("\n".join(wrapped for line in lines
                              for wrapped in wrap_line(line, width)))

    # ------------------------------------------------------------------
    # What the server understands.

    def _get_schema(self) -> Schema:
        """The server's commands and schema, fetched on first use."""
        if self._schema is None:
            self._schema = self._fetch_schema()
        return self._schema

    def _fetch_schema(self) -> Schema:
        client = self.client
        try:
            found = client.execute("query-commands", timeout=QUERY_TIMEOUT)
            names = [c.get("name") for c in mappings(found)]
        except ExecuteError:
            try:
                # qemu-ga lists its commands here instead.
                info = client.execute("guest-info", timeout=QUERY_TIMEOUT)
                listed = info.get("supported_commands") if isinstance(
                    info, Mapping) else None
                names = [c.get("name") for c in mappings(listed)
                         if c.get("enabled", True)]
            except ExecuteError:
                return Schema.unknown()
        try:
            entities = list(mappings(client.execute(
                "query-qmp-schema", timeout=QUERY_TIMEOUT)))
        except ExecuteError:
            entities = None
        return Schema([n for n in names if isinstance(n, str)], entities)

    def _get_human_commands(self) -> HumanCommands:
        if self._human is None:
            texts = []
            for line in ("help", "info"):
                try:
                    text = self.client.execute(
                        "human-monitor-command", {"command-line": line},
                        timeout=QUERY_TIMEOUT)
                except ExecuteError:
                    text = ""
                texts.append(text if isinstance(text, str) else "")
            self._human = HumanCommands(*texts)
        return self._human

    def _complete(self, before: str, word: str) -> list[str]:
        """The completions of `word` (readline's completer calls this)."""
        if self.options.hmp:
            return complete_hmp(self._get_human_commands(), before, word)
        return complete_qmp(self._get_schema(), before, word,
                            self._parser.in_transaction)

    # ------------------------------------------------------------------
    # Output.

    def _format(self, msg: Mapping[str, object]) -> str:
        """A message as one line of JSON (indented with ``-p``; in
        colour at an interactive terminal)."""
        data = msg.to_dict() if isinstance(msg, Message) else dict(msg)
        text = json.dumps(data, indent=4 if self.options.pretty else None)
        return highlight_json(text) if self._colour else text

    def _print_events(self) -> None:
        """Print the events queued so far (outside the terminal: inside
        it, the terminal shows them as they come)."""
        if self._terminal is None:
            for event in self.client.get_events():
                self._print(self._format(event))

    def _waiting(self) -> contextlib.AbstractContextManager[None]:
        if self._terminal is None:
            return contextlib.nullcontext()
        return self._terminal.waiting()

    def _print(self, text: str = "") -> None:
        self._out.write(f"{text}\n")
        self._out.flush()

    def _error(self, text: str, failed: bool = True) -> None:
        """One ``Error: ...`` line on stderr; `failed` counts it for the
        exit status."""
        self._failures += failed
        self._out.flush()
        self._err.write(f"Error: {text}\n")
        self._err.flush()

    def _lost(self, err: BaseException | None) -> None:
        """Say that the connection is lost, and why."""
        reason = f": {err}" if err is not None else ""
        try:
            self.client.disconnect()
        except QMPError as cause:
            reason = f": {cause}"
        self._error(f"the connection to QEMU was lost{reason}")


def _error_line(error: object) -> str:
    """``Class: description`` of a QMP error object."""
    if isinstance(error, Mapping):
        return f"{error.get('class')}: {error.get('desc')}"
    return str(error)


# ----------------------------------------------------------------------
# The program.

def argument_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags qmp-shell and qmp-shell-wrap share."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Type QMP commands at QEMU: 'command key=value ...', "
        "a raw JSON object, 'transaction( ... )', or 'help [COMMAND]'. "
        "Events are shown as they arrive. When stdin is not a terminal, "
        "each line is a command and each reply or event is one line of "
        "JSON.",
        epilog="Exit status: 0 when every command succeeded, 1 when one "
        "failed, 2 for bad usage, 3 when the connection failed or was "
        "lost.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__}")
    parser.add_argument("-H", "--hmp", action="store_true",
                        help="send lines to the human monitor (HMP)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="echo each message sent")
    parser.add_argument("-p", "--pretty", action="store_true",
                        help="indent JSON output")
    parser.add_argument("-l", "--logfile", metavar="LOGFILE",
                        help="append every message sent and received "
                        "to LOGFILE")
    parser.add_argument("--history", metavar="FILE",
                        default=os.environ.get("QMP_SHELL_HISTORY",
                                               HISTORY_FILE),
                        help="the history file (default: $QMP_SHELL_HISTORY"
                        f" or {HISTORY_FILE}); '' for none")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    The ``qmp-shell`` program: connect to the QMP server at ADDRESS and
    run the shell. Returns the exit status (see `EXIT_OK` and the
    others); argparse exits by itself for bad usage.
    """
    parser = argument_parser("qmp-shell")
    parser.add_argument("-N", "--skip-negotiation", action="store_true",
                        help="skip the greeting and capabilities "
                        "negotiation (for qemu-ga)")
    parser.add_argument("address", metavar="ADDRESS", nargs="?",
                        default=os.environ.get("QMP_SOCKET"),
                        help="a unix socket path, HOST:PORT or "
                        "[IPV6]:PORT (default: $QMP_SOCKET)")
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("give the QMP server's ADDRESS (or set QMP_SOCKET)")
    try:
        address: SocketAddr = QEMUMonitorProtocol.parse_address(args.address)
    except QMPBadPortError:
        parser.error(f"bad port number in {args.address!r}")
    client = QMPSyncClient(name=CLIENT_NAME)
    with session_scope(args.logfile) as ok:
        if not ok:
            return EXIT_USAGE
        try:
            client.connect(address, negotiate=not args.skip_negotiation,
                           timeout=CONNECT_TIMEOUT)
        except ConnectError as err:
            print(f"Error: cannot connect to {args.address}: {err}",
                  file=sys.stderr)
            return EXIT_CONNECTION
        except TimeoutError:
            print(f"Error: {args.address} sent no greeting within "
                  f"{CONNECT_TIMEOUT:g} s (is another client using this "
                  "monitor? A guest agent needs -N.)", file=sys.stderr)
            return EXIT_CONNECTION
        return Shell(client, options_from(args)).run()


def options_from(args: argparse.Namespace) -> Options:
    """The `Options` given by parsed command-line flags."""
    history = os.path.expanduser(args.history) if args.history else None
    return Options(hmp=args.hmp, verbose=args.verbose, pretty=args.pretty,
                   history=history)


@contextlib.contextmanager
def session_scope(logfile: str | None) -> Iterator[bool]:
    """
    Main thread: for the time of a session, log every message to
    `logfile` (if given) and turn SIGTERM and SIGHUP into a clean exit
    (the history is saved, the session ended). Yields False when the
    log file cannot be opened (having said why).
    """
    handler = None
    logger = logging.getLogger("qmp_sync.qmp_client").getChild(CLIENT_NAME)
    level, propagate = logger.level, logger.propagate
    if logfile is not None:
        try:
            handler = logging.FileHandler(logfile, encoding="utf-8")
        except OSError as err:
            print(f"Error: cannot open the log file {logfile}: "
                  f"{err.strerror}", file=sys.stderr)
            yield False
            return
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            saved[signum] = signal.signal(signum, _exit_on_signal)
    try:
        yield True
    finally:
        for signum, old in saved.items():
            signal.signal(signum, old)
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
            handler.close()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """Signal handler: leave through the ``finally`` blocks."""
    raise SystemExit(128 + signum)
