"""
The shell's interactive terminal: readline editing, history kept in a
file, tab completion, and server events printed the moment they
arrive, above the line being typed, which readline then redraws intact.

Threads: readline and the terminal belong to the main thread alone
(readline is not thread-safe). One helper thread, the event pump,
blocks in ``pull_event(True)``; when an event comes it queues it and
pokes the main thread with a signal, whose handler (run by the main
thread, between two reads of readline's input loop) prints the event
and redraws the line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType, ModuleType, TracebackType
from typing import TextIO

from ..error import QMPError
from ..message import Message
from ..sync import QMPSyncClient
from .output import terminal_columns

__all__ = ("SessionEnded", "Terminal")

#: The signal that wakes the main thread. SIGURG is ignored by default,
#: so a poke that arrives after the handler is gone does no harm (Go's
#: runtime picked it for the same reason).
POKE_SIGNAL = signal.SIGURG
#: Seconds between two pokes while the main thread has not taken the
#: events yet: a poke that lands while readline is busy with a key, not
#: waiting in select(), is only seen at the next one.
POKE_INTERVAL = 0.1
#: Lines of history kept in the file.
HISTORY_LENGTH = 1000

# What the main thread is doing, which says what an event poke may do.
_BUSY = "busy"          # printing or parsing: events wait their turn
_PROMPT = "prompt"      # in readline: print above the line, redraw it
_WAITING = "waiting"    # blocked in a command: print right away


class SessionEnded(QMPError):
    """The session ended while the user sat at the prompt."""


class Terminal:
    """
    Reads lines from the user with readline and shows events live.

    Use it as a context manager, in the main thread, and end the
    client's session before leaving it (that is what stops the event
    pump).

    :param client: The connected client whose events are shown.
    :param show_event: Turns an event into the text to print.
    :param complete: ``complete(before, word)``: the completions of
        `word`, given the line before it.
    :param history: The history file, or None for no history.
    :param stdout: Where events and the line go (default: sys.stdout).
    """

    def __init__(self, client: QMPSyncClient,
                 show_event: Callable[[Message], str],
                 complete: Callable[[str, str], list[str]],
                 history: str | None,
                 stdout: TextIO | None = None) -> None:
        self._client = client
        self._show_event = show_event
        self._complete = complete
        self._history = history
        self._out = stdout or sys.stdout
        self._state = _BUSY
        self._matches: list[str] = []
        # Events taken by the pump; None once the session has ended.
        self._events: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._ended = False
        # Set by the main thread each time it has looked at the queue.
        self._drained = threading.Event()
        # The main thread is in _show_events (a poke may interrupt it).
        self._showing = False
        self._closing = False
        self._pump: threading.Thread | None = None
        self._old_handler: object = None
        self._old_interrupt: object = None
        self._readline: ModuleType | None = None
        self._prompt = ""
        self._force_redisplay: Callable[[], object] | None = None
        self._point: ctypes.c_int | None = None

    def __enter__(self) -> Terminal:
        """Main thread: set up readline, load the history, start the
        event pump."""
        try:
            # Imported only here: importing readline may write terminal
            # control codes, which have no place in a script's output.
            import readline as module
        except ImportError:
            module = None  # type: ignore[assignment]
        readline = self._readline = module
        if readline is not None:
            library = _readline_library(readline)
            if library is not None:
                self._force_redisplay = library.rl_forced_update_display
                self._point = ctypes.c_int.in_dll(library, "rl_point")
            readline.set_completer_delims(" \t\n")
            readline.set_completer(self._on_complete)
            readline.parse_and_bind("tab: complete")
            readline.set_history_length(HISTORY_LENGTH)
            if self._history is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._guard(readline.read_history_file, "read")
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C is the shell's, even when started with SIGINT
            # ignored (as a background job's children are).
            self._old_interrupt = signal.signal(
                signal.SIGINT, signal.default_int_handler)
            self._old_handler = signal.signal(POKE_SIGNAL, self._on_poke)
            self._pump = threading.Thread(
                target=self._run_pump, name="qmp-shell events",
                daemon=True)
            self._pump.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Main thread: stop the pump, save the history."""
        self._closing = True
        self._drained.set()
        if self._pump is not None:
            # The caller has ended the session, which ends the pump.
            self._pump.join(5.0)
            signal.signal(POKE_SIGNAL, self._old_handler)  # type: ignore
            signal.signal(signal.SIGINT, self._old_interrupt)  # type: ignore
        readline = self._readline
        if readline is not None and self._history is not None:
            self._guard(self._write_history, "write")

    def _guard(self, action: Callable[[str], None], verb: str) -> None:
        """Run a history file action; a failure is a warning."""
        assert self._history is not None
        try:
            action(self._history)
        except FileNotFoundError:
            raise
        except OSError as err:
            print(f"Warning: cannot {verb} the history file "
                  f"{self._history}: {err.strerror}", file=sys.stderr)

    def _write_history(self, path: str) -> None:
        assert self._readline is not None
        # Commands may carry secrets: the file is the user's alone.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._readline.write_history_file(path)

    # ------------------------------------------------------------------
    # The main thread.

    def read_line(self, prompt: str) -> str:
        """
        Main thread: print the events that came meanwhile, then read a
        line with readline (events that arrive during it are printed
        above it).

        :raise EOFError: On Ctrl-D.
        :raise KeyboardInterrupt: On Ctrl-C (the line is dropped).
        :raise SessionEnded: When the session has ended.
        """
        self._show_events(redraw=False)
        self._prompt = prompt
        self._state = _PROMPT
        try:
            return input(prompt)
        finally:
            self._state = _BUSY

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Main thread: while the block waits for the server, print
        events as they come."""
        self._show_events(redraw=False, raise_end=False)
        self._state = _WAITING
        try:
            yield
        finally:
            self._state = _BUSY

    def _on_poke(self, signum: int, frame: FrameType | None) -> None:
        """Main thread, signal handler: show the queued events, if the
        main thread is at a point where it may print."""
        if self._state == _PROMPT:
            self._show_events(redraw=True)
        elif self._state == _WAITING:
            self._show_events(redraw=False, raise_end=False)

    def _show_events(self, redraw: bool, raise_end: bool = True) -> None:
        """Main thread: print every queued event; with `redraw`, above
        the line being edited, then draw that line again."""
        if self._showing:
            # A poke's handler that interrupted this very method: the
            # pump pokes again until the queue is empty.
            return
        self._showing = True
        try:
            self._print_queued(redraw, raise_end)
        finally:
            self._showing = False
            self._drained.set()

    def _print_queued(self, redraw: bool, raise_end: bool) -> None:
        lines = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event is None:
                self._ended = True
            else:
                lines.append(self._show_event(event))
        ending = self._ended and raise_end
        # Erase the line being edited, every screen row of it: readline
        # draws it again below, unless the session has ended.
        erase = self._erase_line() if redraw and self._out.isatty() else ""
        if lines:
            self._out.write(erase + "".join(f"{x}\n" for x in lines))
            if redraw and not ending:
                self._redraw()
        elif ending:
            self._out.write(erase)
        self._out.flush()
        if ending:
            raise SessionEnded("the session has ended")

    def _erase_line(self) -> str:
        """Main thread, at the prompt: the control codes that take the
        cursor to the start of the prompt and clear from there on (a
        line longer than the terminal is wide spans several rows)."""
        width = terminal_columns(self._out)
        before_cursor = self._prompt
        if self._readline is not None:
            typed = self._readline.get_line_buffer()
            if self._point is not None:
                # rl_point counts bytes of the line, not characters.
                typed = typed.encode()[:self._point.value].decode(
                    errors="ignore")
            before_cursor += typed
        rows_up = len(before_cursor) // width if width > 0 else 0
        return "\r" + (f"\x1b[{rows_up}A" if rows_up else "") + "\x1b[J"

    def _redraw(self) -> None:
        """Main thread, at the prompt: draw the prompt and the line
        being edited again, on the (new) current line."""
        if self._force_redisplay is not None:
            self._force_redisplay()
        elif self._readline is not None:
            # readline believes the line is still on screen, as it was:
            # draw it just so (the cursor ends up at its end).
            self._out.write(self._prompt + self._readline.get_line_buffer())
            self._out.flush()

    def _on_complete(self, word: str, state: int) -> str | None:
        """Main thread, readline's completer: the `state`-th completion
        of `word`."""
        if state == 0:
            assert self._readline is not None
            before = self._readline.get_line_buffer()[
                :self._readline.get_begidx()]
            saved, self._state = self._state, _BUSY
            try:
                self._matches = self._complete(before, word)
            except Exception:
                # readline would swallow it anyway; a completion that
                # fails is just no completion.
                self._matches = []
            finally:
                self._state = saved
        return self._matches[state] if state < len(self._matches) else None

    # ------------------------------------------------------------------
    # The pump thread.

    def _run_pump(self) -> None:
        """Pump thread: hand each event to the main thread, and the end
        of the session (None) last."""
        main = threading.main_thread().ident
        assert main is not None
        while True:
            try:
                event: Message | None = self._client.pull_event(True)
            except QMPError:
                event = None
            self._events.put(event)
            while not self._closing and not self._events.empty():
                self._drained.clear()
                signal.pthread_kill(main, POKE_SIGNAL)
                self._drained.wait(POKE_INTERVAL)
            if event is None:
                return


def _readline_library(readline: ModuleType) -> ctypes.CDLL | None:
    """
    The GNU readline C library behind the `readline` module, or None.

    The module lacks two things the live events need:
    ``rl_forced_update_display`` (``readline.redisplay()`` redraws only
    what readline believes has changed on screen, and after an event
    is printed over the prompt nothing has, as far as it knows) and
    ``rl_point``, where the cursor is in the line.
    """
    for path in (getattr(readline, "__file__", None), None):
        try:
            library = ctypes.CDLL(path)
            library.rl_forced_update_display.restype = ctypes.c_int
            library.rl_forced_update_display.argtypes = []
            ctypes.c_int.in_dll(library, "rl_point")
        except (OSError, AttributeError, ValueError):
            continue
        return library
    return None
