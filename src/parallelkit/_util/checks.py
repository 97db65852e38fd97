"""Validation of arguments shared by the public API: clear errors, in the caller's process."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Final

# Seconds: a timeout this long or longer (infinity too) means no limit.  The longest wait
# the platform's locks and selectors take (about 292 years on Linux); beyond it they raise
# OverflowError.
NO_LIMIT_FROM: Final = threading.TIMEOUT_MAX


def check_callable(fn: object, what: str = "fn") -> None:
    """Raise ``TypeError`` unless ``fn`` is callable, and not an ``async def`` function.

    A coroutine function called in a worker (or a thread) returns a coroutine that nobody
    awaits: refused up front, the same way on every backend.
    """
    if not callable(fn):
        raise TypeError(f"{what} must be callable, got {type(fn).__name__}: {fn!r}")
    import inspect  # noqa: PLC0415 - only the caller's process checks this

    call = getattr(type(fn), "__call__", None)  # noqa: B004 - an object whose __call__ is async
    if (
        inspect.iscoroutinefunction(fn)
        or inspect.isasyncgenfunction(fn)
        or (
            not inspect.isroutine(fn)
            and not isinstance(fn, type)
            and (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call))
        )
    ):
        name = getattr(fn, "__qualname__", None) or repr(fn)
        raise TypeError(
            f"{what} {name!r} is an async function: parallelkit calls it in worker processes "
            "or threads, which would get a coroutine to await, not a result. Pass a plain "
            f"function that runs it, defined at the top level of a module: "
            f"`def run(x): return asyncio.run({getattr(fn, '__name__', 'fn')}(x))`"
        )


def check_positive_int(value: object, what: str, *, none_means: str | None = None) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless ``value`` is an int of at least 1.

    ``none_means``: when given, ``None`` is accepted too and the message says what it means.
    """
    if value is None and none_means is not None:
        return
    choices = f"a positive int or None ({none_means})" if none_means else "a positive int"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be {choices}, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{what} must be {choices}, got {value}")


def check_bool(value: object, what: str) -> None:
    """Raise ``TypeError`` unless ``value`` is ``True`` or ``False`` (``None`` is neither)."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, not {value!r}")


def check_timeout(value: object, what: str = "timeout", *, zero_ok: bool = False) -> float | None:
    """A timeout in seconds, validated; ``None`` for no limit.

    ``None``, infinity and anything of :data:`NO_LIMIT_FROM` seconds or more mean no limit.
    ``zero_ok``: ``0`` is allowed (do not wait); otherwise a timeout must be positive.
    NaN, negatives, bools and non-numbers raise.
    """
    if value is None:
        return None
    choices = f"a {'non-negative' if zero_ok else 'positive'} number of seconds or None"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be {choices}, not {type(value).__name__}")
    if math.isnan(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{what} must be {choices} (no limit), got {value}")
    if value >= NO_LIMIT_FROM:
        return None
    return float(value)


def check_chunksize(chunksize: object) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless ``chunksize`` is ``None`` or an int >= 1."""
    if chunksize is None:
        return
    if isinstance(chunksize, bool) or not isinstance(chunksize, int):
        raise TypeError(f"chunksize must be a positive int or None, not {type(chunksize).__name__}")
    if chunksize <= 0:
        raise ValueError(f"chunksize must be a positive int or None (automatic), got {chunksize}")


def check_initializer(initializer: Callable[..., object] | None, initargs: object) -> None:
    """Raise ``TypeError`` unless ``initializer`` is ``None`` or callable and ``initargs`` a
    tuple."""
    if initializer is not None:
        check_callable(initializer, "initializer")
    if not isinstance(initargs, tuple):
        raise TypeError(f"initargs must be a tuple, not {type(initargs).__name__}")


def check_max_tasks(max_tasks: object) -> None:
    """Raise ``ValueError`` unless ``max_tasks_per_worker`` is ``None`` or an int >= 1."""
    if max_tasks is None:
        return
    if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks <= 0:
        raise ValueError(f"max_tasks_per_worker must be a positive int or None, got {max_tasks!r}")
