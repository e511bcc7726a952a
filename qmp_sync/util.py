"""
Small helpers shared by the layers.

`cancel_and_wait` is plain asyncio and runs in the thread of the event
loop that awaits it; the others are pure functions for any thread.
"""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

__all__ = (
    "cancel_and_wait",
    "exception_summary",
    "format_size",
    "timeout_seconds",
)


def timeout_seconds(value: object, name: str = "timeout") -> float | None:
    """
    Any thread: check a timeout argument and return it as seconds, or
    None for "no limit".

    None, infinity and anything longer than the platform can wait
    (`threading.TIMEOUT_MAX`, some 292 years) mean no limit.

    :param name: The argument's name, for the error message.
    :raise TypeError: When `value` is neither None nor a number (a bool
        is not a number of seconds).
    :raise ValueError: For NaN or a negative number.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not "
                        f"{value!r}")
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{name} must be a number of seconds, not NaN")
    if value < 0:
        raise ValueError(f"{name} must not be negative, not {value!r}")
    if value >= threading.TIMEOUT_MAX:
        return None
    return float(value)


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
