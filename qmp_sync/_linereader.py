"""
`LineReader`: a stream reader for line-based protocols that can push
each complete line to a callback the moment its bytes arrive.

While a session is being set up, a `LineReader` is read like any
``asyncio.StreamReader`` (``await readline()``). Once the session runs,
`LineReader.push_to` switches it to *push mode*: ``feed_data`` (called
by the transport's protocol for every chunk received) splits the chunk
into lines and hands each one straight to the callback, in order, with
no task woken per line; a second callback marks the end of each chunk,
so that whoever waits for what the lines brought is woken once per
chunk. This saves the loop passes a reader task spends per message.

Threads: everything here runs in the loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import SupportsIndex

__all__ = ("LineReader", "LineTooLong", "PushTarget")


class LineTooLong(ValueError):
    """A line exceeds the reader's limit (a `ValueError`, as
    ``asyncio.StreamReader.readline`` raises in that case)."""


class PushTarget:
    """
    Where a `LineReader` in push mode delivers (implemented by the
    protocol that reads): every method runs in the loop thread, inside
    the transport's ``data_received`` or ``connection_lost``, and must
    not block.
    """

    def line_received(self, line: bytes) -> None:
        """One complete line, newline included; or, at the end of the
        stream, what is left of an unfinished line (without newline).
        Raising ends the pushing: `push_failed` gets the error."""
        raise NotImplementedError

    def chunk_done(self) -> None:
        """Every line of the chunk just received has been delivered."""

    def push_failed(self, error: BaseException) -> None:
        """Pushing has ended for good: `line_received` raised `error`,
        the line limit was exceeded, the stream failed, or it ended
        (`EOFError`). Called once."""
        raise NotImplementedError


class LineReader(asyncio.StreamReader):
    """
    An ``asyncio.StreamReader`` whose lines can be pushed (see the
    module docstring). In pull mode only `readline` reads it.

    :param limit: The longest line accepted, newline included, in bytes.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit=limit)
        self._line_limit = limit
        # Bytes received and not yet read or pushed: whole lines (in pull
        # mode), then perhaps an unfinished one.
        self._pending = bytearray()
        self._line_waiter: asyncio.Future[None] | None = None
        self._line_transport: asyncio.BaseTransport | None = None
        self._paused = False
        # Set once the stream has ended: None, EOFError or the failure.
        self._end: BaseException | None = None
        self._target: PushTarget | None = None
        # Push mode ended (failed, or stopped): later data is dropped.
        self._done_pushing = False

    # ------------------------------------------------------------------
    # The transport's side (asyncio.StreamReaderProtocol calls these).

    def set_transport(self, transport: asyncio.BaseTransport) -> None:
        """Runs in the loop thread: remember the transport (for pausing
        reading while lines pile up unread in pull mode)."""
        super().set_transport(transport)
        self._line_transport = transport

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        """Runs in the loop thread: take a chunk received (bytes, from
        the transport)."""
        if type(data) is not bytes:
            data = bytes(data)
        if self._done_pushing or not data:
            return
        if self._target is not None:
            self._push_chunk(data)
            return
        self._pending += data
        self._wake()
        if (len(self._pending) > 2 * self._line_limit and not self._paused
                and isinstance(self._line_transport, asyncio.ReadTransport)):
            self._paused = True
            self._line_transport.pause_reading()

    def feed_eof(self) -> None:
        """Runs in the loop thread: the stream ended."""
        super().feed_eof()
        self._ended(EOFError("the peer closed the connection"))

    def set_exception(self, exc: Exception) -> None:
        """Runs in the loop thread: the stream failed."""
        super().set_exception(exc)
        self._ended(exc)

    def _ended(self, error: BaseException) -> None:
        if self._end is None:
            self._end = error
        target = self._target
        if target is None:
            self._wake()
            return
        rest = bytes(self._pending)
        error = self._end
        if rest:
            try:
                target.line_received(rest)
            except Exception as err:
                error = err
        self._fail(target, error)

    def _wake(self) -> None:
        waiter = self._line_waiter
        if waiter is not None:
            self._line_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------
    # Pull mode.

    async def readline(self) -> bytes:
        """
        Runs in the loop thread: the next line, newline included; at the
        end of the stream what is left of an unfinished line, then
        ``b""``.

        :raise ValueError: When a line exceeds the limit (as
            ``asyncio.StreamReader.readline`` does).
        :raise Exception: The stream's failure, once nothing is left.
        """
        pending = self._pending
        while True:
            end = pending.find(b"\n")
            if end >= 0:
                if end >= self._line_limit:
                    raise LineTooLong("a line exceeds the limit")
                line = bytes(pending[:end + 1])
                del pending[:end + 1]
                self._resume()
                return line
            if len(pending) > self._line_limit:
                raise LineTooLong("a line exceeds the limit")
            if self._end is not None:
                if pending:
                    line = bytes(pending)
                    pending.clear()
                    return line
                if isinstance(self._end, EOFError):
                    return b""
                raise self._end
            self._line_waiter = asyncio.get_running_loop().create_future()
            await self._line_waiter

    def _resume(self) -> None:
        if (self._paused and len(self._pending) <= self._line_limit
                and isinstance(self._line_transport, asyncio.ReadTransport)):
            self._paused = False
            self._line_transport.resume_reading()

    # ------------------------------------------------------------------
    # Push mode.

    def push_to(self, target: PushTarget) -> None:
        """
        Runs in the loop thread: from now on hand every line to
        `target`, starting with the lines already received; if the
        stream has ended already, `target` learns it at once.
        """
        self._target = target
        self._resume()
        if self._end is not None:
            self._ended(self._end)
        elif self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self._push_chunk(data)

    def stop_pushing(self) -> None:
        """Runs in the loop thread: deliver nothing more (the session is
        ending); data received from now on is dropped."""
        self._target = None
        self._done_pushing = True
        self._pending.clear()

    def _push_chunk(self, data: bytes) -> None:
        """Runs in the loop thread: deliver the complete lines that
        `data` finishes or holds; keep what is left of an unfinished
        one."""
        target = self._target
        assert target is not None
        pending = self._pending
        if pending:
            # Only the new bytes can hold the end of the pending line.
            found = data.find(b"\n")
            pending += data
            if found < 0:
                if len(pending) > self._line_limit:
                    self._fail(target, LineTooLong("a line exceeds the "
                                                   "limit"))
                return
            data = bytes(pending)
            pending.clear()
        start = 0
        try:
            while True:
                end = data.find(b"\n", start)
                if end < 0:
                    break
                if end - start >= self._line_limit:
                    raise LineTooLong("a line exceeds the limit")
                target.line_received(data[start:end + 1])
                if self._target is not target:
                    return  # the callback stopped the pushing
                start = end + 1
            if len(data) - start > self._line_limit:
                raise LineTooLong("a line exceeds the limit")
        except Exception as err:
            self._fail(target, err)
            return
        if start < len(data):
            pending += data[start:]
        target.chunk_done()

    def _fail(self, target: PushTarget, error: BaseException) -> None:
        """Runs in the loop thread: end the pushing with `error`."""
        self._target = None
        self._done_pushing = True
        self._pending.clear()
        target.push_failed(error)

