"""Worker-local state: one value per process, made on first use (:class:`WorkerLocal`).

A module global does the same in the simple case; this helper adds what a global gets
wrong: a forked worker inherits its parent's value (a database connection shared by two
processes), a copy of the holder that travels by pickling (in ``initargs``, in a closure
sent by value) would make a value of its own, and closing the value when the worker
stops takes an exit hook.  Here the value belongs to the process that made it, every
copy of one holder in a process shares it, and ``close`` runs at the worker's normal
stop (:mod:`parallelkit._proc.identity`).
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from parallelkit._proc import identity as _identity

__all__ = ("WorkerLocal",)

V = TypeVar("V")

# every holder in this process, by token: an unpickled copy finds the holder already here
_holders: weakref.WeakValueDictionary[str, WorkerLocal[object]] = weakref.WeakValueDictionary()
# holders that arrived by pickling live as long as the process: the next task's copy must
# find the value the previous task's made
_arrived: dict[str, WorkerLocal[object]] = {}
_holders_lock = threading.Lock()
_serial = itertools.count()


class WorkerLocal(Generic[V]):
    """A value of which each process has its own, made by ``factory`` on first use.

    Define one at module level beside the task that uses it; each worker process makes its
    own value the first time a task calls :meth:`get`, and keeps it for every later task
    (and, with ``close``, closes it when the worker stops normally: see
    :func:`~parallelkit.worker_info` and the ``finalizer`` option for what "normally"
    means).  A worker forked from a process that had made a value makes a new one; copies
    of the holder that reach a process by pickling share that process's value.  The value
    is per process, not per thread: threads of one process (the ``"thread"`` backend)
    share it.

    Args:
        factory: makes the value, in the process that first asks for it.
        close: called with the value when a worker that made it stops normally (not when
            it is killed); ``None``: nothing to close.  Outside a worker, :meth:`clear`
            closes it.

    Example:
        >>> import sqlite3
        >>> db = WorkerLocal(lambda: sqlite3.connect(":memory:"), close=sqlite3.Connection.close)
        >>> db.get() is db.get()
        True
        >>> db.clear()

    .. versionadded:: 0.1
    """

    __slots__ = ("__weakref__", "_close", "_factory", "_lock", "_pid", "_token", "_value")

    def __init__(
        self, factory: Callable[[], V], /, *, close: Callable[[V], object] | None = None
    ) -> None:
        if not callable(factory):
            raise TypeError(f"factory must be callable, got {type(factory).__name__}")
        if close is not None and not callable(close):
            raise TypeError(f"close must be callable or None, got {type(close).__name__}")
        self._factory = factory
        self._close = close
        self._token = f"{uuid.uuid4().hex}-{next(_serial)}"
        self._lock = threading.Lock()
        self._pid = 0  # the process that made _value; 0: none made
        self._value: V | None = None
        with _holders_lock:
            _holders[self._token] = self  # type: ignore[assignment]  # V erased at run time

    def get(self) -> V:
        """This process's value, made now if it has none yet."""
        pid = os.getpid()
        if self._pid == pid:
            return self._value  # type: ignore[return-value]  # set with _pid
        with self._lock:
            if self._pid != pid:  # none yet, or our parent's (inherited through fork)
                value = self._factory()
                self._value, self._pid = value, pid
                if self._close is not None:
                    _identity.at_worker_exit(self._closer(pid))
            return self._value  # type: ignore[return-value]

    def clear(self) -> None:
        """Forget this process's value (closing it if ``close`` was given); the next
        :meth:`get` makes a new one."""
        with self._lock:
            value, made_here = self._value, self._pid == os.getpid()
            self._value, self._pid = None, 0
        if made_here and self._close is not None:
            self._close(value)  # type: ignore[arg-type]

    def _closer(self, pid: int) -> Callable[[], None]:
        ref = weakref.ref(self)

        def close() -> None:
            holder = ref()
            if holder is not None and holder._pid == pid:
                holder.clear()

        return close

    def __reduce__(self) -> tuple[Callable[..., WorkerLocal[V]], tuple[object, ...]]:
        # by token: every copy in one process is the one holder there (the value never
        # travels)
        return (_holder, (self._token, self._factory, self._close))

    def __repr__(self) -> str:
        made = "made" if self._pid == os.getpid() else "not made"
        return f"<WorkerLocal of {self._factory!r}, {made} in this process>"


def _holder(
    token: str, factory: Callable[[], V], close: Callable[[V], object] | None
) -> WorkerLocal[V]:
    """The holder ``token`` names in this process (made on first unpickling)."""
    with _holders_lock:
        found = _holders.get(token)
    if found is not None:
        return found  # type: ignore[return-value]
    holder = WorkerLocal(factory, close=close)
    with _holders_lock:
        del _holders[holder._token]
        holder._token = token
        found = _holders.setdefault(token, holder)  # type: ignore[arg-type]
        _arrived[token] = found
    return found  # type: ignore[return-value]
