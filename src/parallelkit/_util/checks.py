"""Validation of arguments shared by the public API: clear errors, in the caller's process.

Every argument check lives here; the ``resolve_*`` helpers validate and fill in a default
(the platform's start method, the usable CPU count).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Final

from parallelkit._util.context import (
    ALL_START_METHODS,
    available_start_methods,
    default_start_method,
    default_workers,
    usable_cpu_count,
)
from parallelkit._util.types import StartMethod
from parallelkit.errors import StartMethodError

# Seconds: a timeout this long or longer (infinity too) means no limit.  The longest wait
# the platform's locks and selectors take (about 292 years on Linux); beyond it they raise
# OverflowError.
NO_LIMIT_FROM: Final = threading.TIMEOUT_MAX
MIN_AUTHKEY_BYTES: Final = 16  # a channel key's length, at least
PROGRESS_EXTRA_HINT: Final = "pip install 'parallelkit[progress]'"


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


def check_initializer(
    initializer: Callable[..., object] | None,
    initargs: object,
    name: str = "initializer",
    args_name: str = "initargs",
) -> None:
    """Raise ``TypeError`` unless ``initializer`` is ``None`` or callable and ``initargs`` a
    tuple (``name``, ``args_name``: the finalizer's, checked the same way)."""
    if initializer is not None:
        check_callable(initializer, name)
    if not isinstance(initargs, tuple):
        raise TypeError(f"{args_name} must be a tuple, not {type(initargs).__name__}")


def check_max_tasks(max_tasks: object) -> None:
    """Raise ``ValueError`` unless ``max_tasks_per_worker`` is ``None`` or an int >= 1."""
    if max_tasks is None:
        return
    if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks <= 0:
        raise ValueError(f"max_tasks_per_worker must be a positive int or None, got {max_tasks!r}")


def check_progress(progress: object) -> None:
    """Validate ``progress=`` in the caller; with ``True``, check that tqdm is installed."""
    if isinstance(progress, bool):
        if progress:
            try:
                import tqdm  # noqa: F401, PLC0415
            except ImportError as exc:
                raise ImportError(
                    f"progress=True shows a tqdm progress bar, and tqdm is not installed: "
                    f"{PROGRESS_EXTRA_HINT} (or pass a callable to render progress yourself)"
                ) from exc
        return
    if not callable(progress):
        raise TypeError(
            "progress must be True, False or a callable taking a parallelkit.Progress, "
            f"not {type(progress).__name__}"
        )


def check_authkey(authkey: object) -> bytes:
    """Validate a channel key.

    Raises:
        TypeError: not ``bytes``.
        ValueError: shorter than 16 bytes.
    """
    if not isinstance(authkey, bytes):
        raise TypeError(
            f"authkey must be bytes (at least {MIN_AUTHKEY_BYTES} of them, e.g. "
            f"os.urandom(32)), not {type(authkey).__name__}"
        )
    if len(authkey) < MIN_AUTHKEY_BYTES:
        raise ValueError(
            f"authkey must be at least {MIN_AUTHKEY_BYTES} bytes (e.g. os.urandom(32)), "
            f"got {len(authkey)}"
        )
    return authkey


def check_handshake_timeout(timeout: float, what: str) -> float:
    """A handshake's timeout: a positive, finite number of seconds (a handshake always has
    a limit), as a float.

    Raises:
        ValueError: anything else (``None`` and infinity too).
    """
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < NO_LIMIT_FROM  # a handshake always has a limit
    ):
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {timeout!r}")
    return float(timeout)


def resolve_start_method(start_method: str | None) -> StartMethod:
    """Validate ``start_method``; ``None`` means the platform default.

    Raises:
        StartMethodError: the name is unknown, or this platform does not offer it.
    """
    if start_method is None:
        return default_start_method()
    valid = available_start_methods()
    if start_method not in valid:
        kind = "unknown" if start_method not in ALL_START_METHODS else "unavailable"
        raise StartMethodError(
            f"{kind} start method {start_method!r}; valid choices here: "
            + ", ".join(repr(m) for m in valid)
            + " (or None for the platform default)"
        )
    return start_method


def resolve_max_workers(max_workers: int | None) -> int:
    """Validate ``max_workers``; ``None`` means :func:`default_workers` (the usable CPUs,
    or, in a parallelkit worker, its share of them: ``docs/nesting.md``).

    Raises:
        TypeError: not an int.
        ValueError: zero or negative.
    """
    if max_workers is None:
        return default_workers()
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError(
            f"max_workers must be a positive int or None, not {type(max_workers).__name__}"
        )
    if max_workers <= 0:
        raise ValueError(
            f"max_workers must be a positive int or None (the usable CPU count, "
            f"{usable_cpu_count()} here), got {max_workers}"
        )
    return max_workers


def check_max_message_bytes(max_message_bytes: int | None) -> int | None:
    """A channel's ``max_message_bytes``: ``None`` (no limit) or a positive int."""
    if max_message_bytes is None:
        return None
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int):
        raise TypeError(
            f"max_message_bytes must be an int or None, not {type(max_message_bytes).__name__}"
        )
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    return max_message_bytes


def check_queue_maxsize(maxsize: object) -> None:
    """Raise ``ValueError`` unless a queue's ``maxsize`` is an int >= 0 (0: no limit)."""
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
        raise ValueError(f"maxsize must be an int >= 0 (0: no limit), got {maxsize!r}")
