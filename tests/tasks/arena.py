"""Task functions for ``test_arena.py`` (module level, so spawn and forkserver can import them)."""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import sys
from typing import Any

import numpy as np

_KEPT: list[Any] = []  # arguments a task keeps (in this worker process)


def describe(x: Any) -> tuple[str, str, bool]:
    """Type name, digest of the bytes and whether the argument is writable."""
    view = memoryview(x)
    return type(x).__name__, hashlib.sha256(view.cast("B")).hexdigest(), not view.readonly


def describe_array(a: np.ndarray[Any, Any]) -> tuple[str, tuple[int, ...], str, bool, bool]:
    return (
        str(a.dtype),
        a.shape,
        hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(),
        bool(a.flags.writeable),
        bool(a.flags.f_contiguous and not a.flags.c_contiguous),
    )


def echo(x: Any) -> Any:
    return x


def make_buffer(n: int) -> pickle.PickleBuffer:
    """A result that protocol 5 sends out of band as it is."""
    return pickle.PickleBuffer(bytearray(i % 251 for i in range(n)))


def make_array(n: int) -> np.ndarray[Any, Any]:
    return np.arange(n, dtype=np.int64)


def keep(a: np.ndarray[Any, Any]) -> float:
    """Keep the argument itself (not a copy) in a global."""
    _KEPT.append(a)
    return float(a.sum())


def kept_sums(_: object) -> list[float]:
    return [float(a.sum()) for a in _KEPT]


def total(a: np.ndarray[Any, Any]) -> float:
    return float(a.sum())


def fail_on_negative(a: np.ndarray[Any, Any]) -> float:
    if a[0] < 0:
        raise ValueError(f"negative: {a[0]}")  # the traceback holds the array for a while
    return float(a.sum())


def big_result_or_die(x: int) -> np.ndarray[Any, Any]:
    """A large result, or SIGKILL this worker (x < 0) once it holds a result segment."""
    if x < 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return np.full(200_000, x, dtype=np.float64)


def sum_or_die(a: np.ndarray[Any, Any]) -> tuple[float, int]:
    if a[0] < 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return float(a.sum()), os.getpid()


_REUSED: list[Any] = []  # one buffer a task fills and returns, again and again


def fill_reused(i: int) -> np.ndarray[Any, Any]:
    """Return the same large array each time, filled with ``i`` (a function that reuses
    its output buffer): each result must still arrive as it was when returned."""
    if not _REUSED:
        _REUSED.append(np.empty(40_000, dtype=np.float64))  # 320 KB
    out: np.ndarray[Any, Any] = _REUSED[0]
    out[:] = i
    return out


def no_result_segments() -> None:
    """Initializer: this worker finds /dev/shm full whenever it makes a segment (as in a
    container with a small /dev/shm); mapping the parent's arena still works."""
    result_segments_full_for(sys.maxsize)


def many_arrays(count: int, n: int) -> list[np.ndarray[Any, Any]]:
    """``count`` arrays of ``n`` int64, array ``i`` holding ``arange(n) + i``."""
    return [np.arange(n, dtype=np.int64) + i for i in range(count)]


def result_segments_full_for(failures: int, clock_path: str | None = None) -> None:
    """Initializer: this worker finds /dev/shm full for its first ``failures`` attempts to
    make a segment, then has room again.  With ``clock_path``, the result writer's clock
    (when to try again) reads the time the test wrote in that file."""
    import errno

    from parallelkit._wire import arena as _arena
    from parallelkit._wire import shm as _shm

    real = _shm.Segment.create
    left = [failures]

    def create(size: int, **options: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "no room in /dev/shm (test)")
        return real(size, **options)

    _shm.Segment.create = create  # type: ignore[method-assign]
    if clock_path is not None:
        path = clock_path

        class Clock:
            @staticmethod
            def monotonic() -> float:
                with open(path) as f:
                    return float(f.read())

        _arena.time = Clock  # type: ignore[attr-defined,assignment]


def die_before_registering(n: int) -> np.ndarray[Any, Any]:
    """A large result; this worker is SIGKILLed as it registers its result segment's name
    with the resource tracker (which it does before it makes the file)."""
    from multiprocessing import resource_tracker

    def register(name: object, rtype: str) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    resource_tracker.register = register
    return np.arange(n, dtype=np.int64)


def die_before_unlinking(n: int) -> np.ndarray[Any, Any]:
    """A large result that needs a larger segment: this worker is SIGKILLed as it retires
    its old segment, as it unlinks the file (the tracker still holds its name)."""
    real = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if "pk_" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, *args, **kwargs)

    os.unlink = unlink
    return np.arange(n, dtype=np.int64)


def array_facts(a: np.ndarray[Any, Any]) -> tuple[str, tuple[int, ...], str, bool, bool, bool]:
    """dtype, shape, digest of the values (C order), C- and F-contiguity, writability."""
    return (
        a.dtype.str if a.dtype.names is None else repr(a.dtype.descr),
        a.shape,
        # structured: the fields' values (a copy need not keep the padding bytes)
        hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
        if not a.dtype.hasobject and a.dtype.names is None
        else repr(a.tolist()),
        bool(a.flags.c_contiguous),
        bool(a.flags.f_contiguous),
        bool(a.flags.writeable),
    )


def facts_of_item(item: tuple[int, np.ndarray[Any, Any]]) -> tuple[int, Any]:
    """``(i, array)`` in: ``(i, array_facts(array))`` out (for unordered maps)."""
    i, a = item
    return i, array_facts(a)


def echo_item(item: tuple[int, Any]) -> tuple[int, Any]:
    return item


def crop_of(n: int) -> np.ndarray[Any, Any]:
    """A non-contiguous result: the inside of an ``n`` x ``n`` array, every other column."""
    return np.arange(n * n, dtype=np.float64).reshape(n, n)[1:-1, ::2]


def crop_pair(n: int) -> tuple[int, np.ndarray[Any, Any]]:
    return n, crop_of(n)
