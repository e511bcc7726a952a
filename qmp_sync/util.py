"""
Small asyncio helpers shared by the layers.

Everything here is plain asyncio and runs in the thread of the event
loop that awaits it.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = (
    "cancel_and_wait",
    "exception_summary",
    "format_size",
)


def exception_summary(exc: BaseException) -> str:
    """
    Return ``Type: message`` (or just ``Type``) for a log line.

    The type is qualified by its module unless it is a built-in.
    """
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ not in ("builtins", "__main__"):
        name = f"{cls.__module__}.{name}"
    text = str(exc)
    return f"{name}: {text}" if text else name


def format_size(nbytes: int) -> str:
    """
    Render a byte count the way people say it: ``10 MiB``, ``64 KiB``,
    ``1.5 MiB``, ``100 bytes``.
    """
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value.is_integer() else (
                f"{value:.1f} {unit}")
    return f"{nbytes} bytes"


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """
    Cancel `task` and wait until it has really finished.

    Runs in the loop thread. Whatever the task raises (its cancellation
    included) is left in the task, not raised here; a cancellation of
    the *caller* still propagates.
    """
    if not task.done():
        task.cancel()
    await asyncio.wait((task,))
