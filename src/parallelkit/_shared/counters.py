"""SharedCounter and SharedAccumulator: shared-memory totals that lose no update.

Segments (naming, space reserved up front, attach without the resource tracker,
cleanup) come from ``_shm``; this module lays out what is inside them (``SharedArray``
is in ``_shared_array``).  One writer per slot, no lock on the hot path::

    line 0      header: magic, kind, op, dtype, slot count, high-water mark
    line 1      slot 0: the overflow slot, written only under the segment's lock
    line 2..    slot i: value, owner pid, owner thread      (one 64-byte line each)

- A writer is a process and thread (``SharedAccumulator``, and ``SharedCounter`` on a
  free-threaded build), or a whole process (``SharedCounter`` with the GIL: its slot's
  thread word is :data:`PROCESS_KEY`).
- ``SharedCounter.add`` with the GIL is one read-modify-write of the process's slot,
  ``cell[0] += n`` on a cached memoryview with ``n`` an exact int: no lock, no system
  call, no thread check, and no cache line shared with another process.  The threads of
  the process share the slot and lose no update: between the read and the write there is
  no call and no Python code (memoryview items and int addition are C code that does not
  release the GIL), and CPython switches threads only at calls, function entries and
  backward jumps.  (An opcode-level tracer, ``f_trace_opcodes`` or a ``sys.monitoring``
  INSTRUCTION event, runs Python code between bytecodes and voids this: debugging tools
  only.)  A free-threaded build has no GIL: there each thread has its own slot.
- ``add`` in a thread that owns a per-thread slot is a check of the thread id and one
  read-modify-write of its own slot, on a cached memoryview: no lock, no system call,
  and no cache line shared with another writer.
- A writer's first ``add`` claims a slot, once per process (and thread), under the
  segment's ``flock`` lock (released by the kernel if the claimer dies, so a killed
  claimer cannot deadlock anyone), on a descriptor opened for that hold only: an object
  keeps no descriptor of its own beyond its mapping's, so many counters fit in a small
  ``RLIMIT_NOFILE`` (once the creator has unlinked the segment, no new writer can join).
  The claimer takes back the slot it already had (same pid and thread word), else a free
  one, else one whose owner process has died: its value stays in, the new owner keeps
  adding to it, which is right for sum, min and max.
  With every slot taken by a living writer, adds go to the overflow slot under the lock:
  slower, still exact.
- ``value`` reduces the claimed slots (up to the high-water mark): ``sum`` (ints
  exactly, floats correctly rounded from the per-slot partial sums, ``inf`` / ``nan``
  where IEEE arithmetic gives them), ``min`` or ``max``.  It may be read at any time; once
  the writers are done it is exact.
- 8-byte aligned stores are atomic on the platforms we support, so a writer killed in
  the middle of ``add`` loses at most that one add and never blocks the others.
- A forked child gets new slots (an ``os.register_at_fork`` hook forgets the cached
  ones); other processes receive the object pickled *by reference* (the segment's name)
  and attach to the same memory.

The creator owns the segment: ``close()`` and ``with`` unmap and unlink it, and
``weakref.finalize`` does the same for an object that is dropped.  A process that
attached only unmaps.  After ``close()``, using the object raises :class:`ValueError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import operator
import os
import sys
import threading
import weakref
from _thread import get_ident as _get_ident
from collections.abc import Callable, Iterator
from fractions import Fraction
from types import TracebackType
from typing import (
    Any,
    ClassVar,
    Final,
    Generic,
    Literal,
    Self,
    TypeAlias,
    TypeVar,
    overload,
)

from parallelkit._util import fuzz as _fuzz
from parallelkit._wire.codec import check_single_host
from parallelkit._wire.shm import SHM_DIR, Segment, pid_alive

__all__ = ("SharedAccumulator", "SharedCounter")

N = TypeVar("N", int, float)
Op = Literal["sum", "min", "max"]
OPS: Final[tuple[Op, ...]] = ("sum", "min", "max")

# ------------------------------------------------------------------ layout (int64 words)
LINE: Final = 8  # words per 64-byte cache line
MAGIC: Final = int.from_bytes(b"pkshm\x00\x01\x00", "little")
W_MAGIC, W_KIND, W_OP, W_DTYPE, W_SLOTS, W_HWM = range(6)
KIND_SLOTS: Final = 1
KIND_ARRAY: Final = 2
OP_SUM, OP_MIN, OP_MAX = range(3)
DT_INT, DT_FLOAT = range(2)
S_VALUE, S_PID, S_TID = range(3)  # words of a slot
OVERFLOW_OWNER: Final = -1  # slot 0's pid word once it holds a value
SLOTS: Final = 255  # slot 0 (overflow) + 254 writers: 16 KiB with the header
_TID_MASK: Final = (1 << 63) - 1
PROCESS_KEY: Final = 0  # the thread word of a slot shared by a process's threads (no ident is 0)
FREE_THREADED: Final = "t" in getattr(sys, "abiflags", "")  # no GIL to make a += atomic

_MISSING: Final = object()

# A one-item view of a slot's value, of format "q" or "d".  Typed Any because typeshed
# lets a memoryview item be assigned an int only, whatever the view's format.
Cell: TypeAlias = Any


def _closed_error(obj: object) -> ValueError:
    return ValueError(f"{type(obj).__name__} is closed; it can no longer be used")


def _thread_key(tid: int) -> int:
    return tid & _TID_MASK  # fits an int64 word


def _base(slot: int) -> int:
    return (slot + 1) * LINE


def _release(segment: Segment, views: list[memoryview[Any]]) -> None:
    """The finalizer: holds the segment and the views, never the handle."""
    segment.close(tuple(views))
    views.clear()


def _out_of_descriptors(exc: OSError, doing: str) -> OSError:
    """``EMFILE`` / ``ENFILE`` in words: which limit, and what to do about it."""
    if exc.errno == errno.ENFILE:
        limit = "the system-wide limit on open files (fs.file-max)"
    else:
        try:
            import resource  # noqa: PLC0415 - POSIX only, and only on this error path

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            limit = f"this process's limit of {soft} open files (RLIMIT_NOFILE)"
        except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
            limit = "this process's limit on open files (RLIMIT_NOFILE)"
    return OSError(
        exc.errno,
        f"cannot {doing}: {limit} is reached ({exc.strerror}). Each shared "
        "object holds one file descriptor in every process that maps it, for as long as "
        "it is open there. Close the ones you no longer need, use fewer of them (one "
        "SharedArray instead of many counters, say), or raise the limit "
        "(ulimit -n, resource.setrlimit(resource.RLIMIT_NOFILE, ...))",
    )


@contextlib.contextmanager
def _locked(segment: Segment, kind: str) -> Iterator[None]:
    """The segment's cross-process claim lock, on a descriptor opened for this hold only.

    ``flock`` on the segment's file, released by the kernel if the holder dies (so a killed
    claimer cannot deadlock anyone).  Opening the file anew for each hold, rather than
    keeping a descriptor per object, costs a few system calls per claim (once per thread
    and object) and saves a descriptor for every object in every process; each hold has
    its own open file description, so holds exclude each other in every case.
    """
    try:
        fd = os.open(SHM_DIR / segment.name, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT,
            f"shared-memory segment {segment.name!r} no longer exists: its creator closed "
            f"it or exited, so no new writer can join this {kind} (keep the creating "
            "object open while other processes use it)",
        ) from None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _out_of_descriptors(exc, f"claim a slot in this {kind} (a first add)") from exc
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _float_sum(parts: list[float]) -> float:
    """The sum of float partial sums: as IEEE arithmetic gives it, exact where finite.

    ``math.fsum`` alone raises where ``+`` gives ``inf`` or ``nan``, which would make the
    result depend on how the adds were spread over writers: one writer's own slot holds
    ``inf`` where two writers' partial sums overflow only when added.
    """
    special = [p for p in parts if not math.isfinite(p)]
    if special:
        return float(sum(special))  # inf + -inf, or any nan, is nan; else that inf
    try:
        return math.fsum(parts)
    except OverflowError:  # the running total left the float range: add exactly
        exact = sum(map(Fraction, parts), Fraction(0))
        try:
            return float(exact)  # back in range, correctly rounded
        except OverflowError:
            return math.inf if exact > 0 else -math.inf


# ------------------------------------------------------------------ counters and accumulators


class _Slots:
    """What :class:`SharedCounter` and :class:`SharedAccumulator` share."""

    __slots__ = (
        "__weakref__",
        "_cell",
        "_cells",
        "_dtype",
        "_finalizer",
        "_lock",
        "_op",
        "_segment",
        "_tid",
        "_values",
        "_views",
        "_words",
    )
    _per_thread: ClassVar[bool] = True  # a slot per thread, or one per process (PROCESS_KEY)
    _tid: int  # the thread whose slot is _cell; 0: none, or one slot per process
    _cell: Cell  # that thread's (or this process's) slot value; None: not claimed
    _cells: dict[int, Cell | None]  # every writer's slot here, by key; None: overflow slot
    _values: Any  # the words as int64 ("q") or float64 ("d"): see Cell
    _views: list[memoryview[Any]]  # released by close()

    def _create(self, op: int, dtype: int) -> None:
        try:
            segment = Segment.create((SLOTS + 1) * LINE * 8)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _out_of_descriptors(exc, f"map another {type(self).__name__}") from exc
            raise
        words = memoryview(segment.mm).cast("q")
        words[W_OP], words[W_DTYPE], words[W_SLOTS], words[W_HWM] = op, dtype, SLOTS, 1
        words[W_KIND] = KIND_SLOTS
        words[W_MAGIC] = MAGIC  # last: the header is complete
        self._setup(segment, words)

    def _attach(self, name: str) -> None:
        try:
            segment = Segment.attach(name)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _out_of_descriptors(exc, f"map another {type(self).__name__}") from exc
            raise
        words = memoryview(segment.mm).cast("q")
        if len(words) < LINE or words[W_MAGIC] != MAGIC or words[W_KIND] != KIND_SLOTS:
            words.release()
            segment.close()
            raise ValueError(f"shared-memory segment {name!r} does not hold a counter")
        self._setup(segment, words)

    def _setup(self, segment: Segment, words: memoryview[int]) -> None:
        segment.drop_fd()  # the mapping is all we keep: _locked() opens the file when needed
        self._segment = segment
        self._words = words
        self._op = words[W_OP]
        self._dtype = words[W_DTYPE]
        self._values = memoryview(segment.mm).cast("d") if self._dtype == DT_FLOAT else words
        self._views = [words] if self._values is words else [words, self._values]
        self._forget_slots()
        self._finalizer = weakref.finalize(self, _release, segment, self._views)
        _HANDLES.add(self)

    def _forget_slots(self) -> None:
        self._tid = 0
        self._cell = None
        self._cells = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The segment's name in ``/dev/shm`` (``pk_<creator pid>_<random>``)."""
        return self._segment.name

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (in this process)."""
        return self._segment.closed

    def close(self) -> None:
        """Free the shared memory (the creator) or unmap it (a process that attached).

        Idempotent.  Other processes still attached keep working on their mapping; new
        ones can no longer attach once the creator has closed.
        """
        self._tid = 0  # the hot path now takes the slow path, which sees it closed
        self._cell = None
        self._cells = {}
        self._finalizer()

    def __enter__(self) -> Self:
        if self._segment.closed:
            raise _closed_error(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[Callable[[type[_Slots], str], _Slots], tuple[type, str]]:
        if self._segment.closed:
            raise _closed_error(self)
        check_single_host(self)
        return (_attach_slots, (type(self), self._segment.name))

    # ---------------------------------------------------------------- adding

    def _add_slow(self, x: float) -> None:
        """``add`` in a thread that has no cached slot on this object (yet)."""
        if self._segment.closed:
            raise _closed_error(self)
        key = _get_ident() if self._per_thread else PROCESS_KEY
        cell = self._cells.get(key, _MISSING)
        if cell is _MISSING:
            if _fuzz.ENABLED:
                _fuzz.point("shared.first_add")  # another thread of this process claims
            with self._lock:
                if self._segment.closed:
                    raise _closed_error(self)
                cell = self._cells.get(key, _MISSING)  # one slot a process: claimed meanwhile?
                if cell is _MISSING:
                    cell, applied = self._claim(key, x)
                    self._cells[key] = cell
                    if cell is not None and self._cell is None:
                        self._cell = cell
                        self._tid = key  # after _cell: the hot path reads _tid first
                    if applied:
                        return
        if cell is None:
            self._add_overflow(x)
        else:
            self._apply(cell, x)

    def _apply(self, cell: Cell, x: float) -> None:
        op = self._op
        try:
            if op == OP_SUM:
                cell[0] += x
            elif op == OP_MIN:
                if x < cell[0]:  # noqa: PLR1730 - no call, and no store when nothing changes
                    cell[0] = x
            elif x > cell[0]:
                cell[0] = x
        except (TypeError, ValueError) as exc:
            raise self._add_error(cell, x, exc) from None

    def _add_error(self, cell: Cell | None, x: object, exc: Exception) -> Exception:
        """What went wrong with ``add(x)``, in our words (memoryview's speak of formats)."""
        if self._segment.closed:
            return _closed_error(self)
        name = type(self).__name__
        if isinstance(exc, TypeError):
            held = "int" if self._dtype == DT_INT else "float"
            return TypeError(
                f"{name}.add() takes {held} values; got {x!r} of type {type(x).__name__}"
            )
        if self._dtype != DT_INT:
            return exc
        total = "" if cell is None else f"its total {cell[0]} + "
        return ValueError(
            f"{name}.add({x!r}): this writer's total would leave int64 "
            f"({total}{x!r} is outside -2**63..2**63-1); nothing was added. Each "
            f"{'process and thread' if self._per_thread else 'process'} keeps its own total "
            "in an int64 slot (value adds them up as a Python int): spread large amounts "
            "over more writers, or, where an inexact total will do, use "
            'SharedAccumulator("sum", dtype=float)'
        )

    def _claim(self, tid: int, x: float) -> tuple[Cell | None, bool]:  # noqa: PLR0912 - a hot path kept in one frame (a helper call costs more than its branches)
        """Find this writer a slot; ``(cell or None for overflow, whether x was added)``.

        ``tid`` is the thread's ident, or :data:`PROCESS_KEY` for a slot of the process.
        """
        words, values = self._words, self._values
        pid, key = os.getpid(), _thread_key(tid)
        with _locked(self._segment, type(self).__name__):
            if _fuzz.ENABLED:
                _fuzz.point("shared.claim")  # another claimer waits on the lock meanwhile
            slots, hwm = words[W_SLOTS], words[W_HWM]
            free = dead = None
            checked: dict[int, bool] = {}
            for slot in range(1, hwm):
                base = _base(slot)
                owner = words[base + S_PID]
                if owner == pid and words[base + S_TID] == key:
                    return self._cell_of(slot), False  # ours already (attached again)
                if owner == 0:
                    if free is None:
                        free = slot
                elif dead is None and owner != pid:
                    alive = checked.get(owner)
                    if alive is None:
                        alive = checked[owner] = pid_alive(owner)
                    if not alive:
                        dead = slot
            if free is None and hwm < slots:
                free = hwm
            if free is not None:
                base = _base(free)
                try:
                    values[base + S_VALUE] = x  # first: a bad x leaves the slot free
                except (TypeError, ValueError) as exc:
                    raise self._add_error(None, x, exc) from None
                words[base + S_TID] = key
                if _fuzz.ENABLED:
                    _fuzz.point("shared.claim.publish")  # readers see the value, not the pid
                words[base + S_PID] = pid  # last: now the slot counts
                words[W_HWM] = max(hwm, free + 1)
                return self._cell_of(free), True
            if dead is not None:  # its value stays part of the total
                base = _base(dead)
                words[base + S_TID] = key
                words[base + S_PID] = pid
                return self._cell_of(dead), False
        return None, False  # every slot has a living owner: the locked overflow slot

    def _cell_of(self, slot: int) -> Cell:
        base = _base(slot) + S_VALUE
        cell = self._values[base : base + 1]
        self._views.append(cell)
        return cell

    def _add_overflow(self, x: float) -> None:
        words, values, base = self._words, self._values, _base(0)
        with self._lock, _locked(self._segment, type(self).__name__):
            if _fuzz.ENABLED:
                _fuzz.point("shared.overflow")
            if words[base + S_PID] == 0:
                try:
                    values[base + S_VALUE] = x
                except (TypeError, ValueError) as exc:
                    raise self._add_error(None, x, exc) from None
                words[base + S_PID] = OVERFLOW_OWNER
            else:
                self._apply(values[base : base + 1], x)

    # ---------------------------------------------------------------- reading

    def _partials(self) -> list[Any]:
        if self._segment.closed:
            raise _closed_error(self)
        words, values = self._words, self._values
        return [
            values[_base(slot) + S_VALUE]
            for slot in range(words[W_HWM])
            if words[_base(slot) + S_PID] != 0
        ]

    def _reduce(self) -> Any:
        parts = self._partials()
        op = self._op
        if op == OP_SUM:
            return sum(parts) if self._dtype == DT_INT else _float_sum(parts)
        if not parts:
            name = OPS[op]
            raise ValueError(f"the {name} of no values: nothing was added to this accumulator")
        return min(parts) if op == OP_MIN else max(parts)

    def __repr__(self) -> str:
        if self._segment.closed:
            return f"<{type(self).__name__} {self._segment.name} closed>"
        try:
            shown = repr(self._reduce())
        except ValueError:
            shown = "empty"
        return f"<{type(self).__name__} {self._segment.name} value={shown}>"


_HANDLES: weakref.WeakSet[_Slots] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child's main thread has the forking thread's id: without this, it would keep
    # writing to its parent's slot.
    for handle in list(_HANDLES):
        handle._forget_slots()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _attach_slots(cls: type[_Slots], name: str) -> _Slots:
    obj = cls.__new__(cls)
    obj._attach(name)
    return obj


def _count(n: object) -> int:
    """``n`` as an int for a counter; TypeError for a float, a bool or a non-integer."""
    if isinstance(n, bool) or not hasattr(type(n), "__index__"):
        raise TypeError(
            f"SharedCounter.add() takes an int; got {n!r} of type {type(n).__name__}"
            + (" (use SharedAccumulator for floats)" if isinstance(n, float) else "")
        )
    return operator.index(n)  # type: ignore[arg-type]  # has __index__, checked above


class SharedCounter(_Slots):
    """An int64 counter in shared memory, exact under any number of concurrent writers.

    Pass it to tasks of :func:`run_parallel` and :class:`WorkerPool`, to
    :class:`multiprocessing.Process` targets, under any start method: it is pickled by
    reference, so every process adds to the same counter.  ``add`` takes no lock: each
    process writes its own slot on its own cache line, and its threads share that slot
    without losing an update (each ``add`` is one step the GIL does not interrupt; a
    free-threaded build gives each thread a slot of its own).  Nothing is buffered: an
    ``add`` is in shared memory when it returns.

    The process that creates it owns the shared memory: :meth:`close` or ``with`` free
    it.  Each writer's own total (each process's, or each thread's on a free-threaded
    build) must stay within int64; :attr:`value` adds them up as a Python int.  It holds one file
    descriptor in each process that has it (running out is an :class:`OSError` with
    ``errno.EMFILE`` that names the limit).

    Example:
        >>> import parallelkit as pk
        >>> with pk.SharedCounter() as counter:
        ...     counter.add()
        ...     counter.add(41)
        ...     counter.value
        42

    .. versionadded:: 0.1
    """

    __slots__ = ()
    _per_thread = FREE_THREADED

    def __init__(self) -> None:
        self._create(OP_SUM, DT_INT)

    def _add_per_thread(self, n: int = 1) -> None:
        """:meth:`add` with a slot for each thread: a free-threaded build's (no GIL)."""
        if _get_ident() == self._tid and type(n) is int:  # this thread's own slot
            try:
                self._cell[0] += n
            except ValueError as exc:  # leaving int64; or released by close() meanwhile
                raise self._add_error(self._cell, n, exc) from None
        else:
            self._add_slow(_count(n))

    if FREE_THREADED:  # pragma: no cover - CI's interpreters have the GIL
        add = _add_per_thread
    else:

        def add(self, n: int = 1) -> None:
            """Add ``n`` (default 1).

            Raises:
                ValueError: the counter is closed, or this writer's total would leave
                    int64 (then nothing is added).
                TypeError: ``n`` is not an int (a float, a bool, a string...).
                OSError: ``errno.EMFILE``: this writer's first add found no file
                    descriptor to spare for the claim lock.
            """
            if type(n) is int:
                try:
                    # The process's slot, shared by its threads: with the GIL this line is
                    # atomic (no call, no Python code between read and write; see the
                    # module's docstring).  Keep it so: no fuzz point, no call in between.
                    self._cell[0] += n  # None: TypeError, caught below
                    return
                except TypeError:  # _cell is None: no slot yet here (first add, forked, closed)
                    pass
                except ValueError as exc:  # leaving int64; or released by close() meanwhile
                    raise self._add_error(self._cell, n, exc) from None
            self._add_slow(_count(n))

    @property
    def value(self) -> int:
        """The sum of every add so far, from every process.

        Raises:
            ValueError: the counter is closed.
        """
        result: int = self._reduce()
        return result


class SharedAccumulator(_Slots, Generic[N]):
    """A running sum, minimum or maximum in shared memory, exact under concurrent writers.

    Like :class:`SharedCounter` (pickled by reference, no lock on the hot path, freed by
    its creator's :meth:`close`), over ``int`` (int64) or ``float`` (float64) values.

    A float sum is the correctly rounded sum of each writer's partial sum: as exact as
    floating point allows, but the partial sums depend on which writer added what, so the
    last bits may differ from a sequential ``sum`` over the same values.  Where IEEE
    arithmetic gives ``inf`` or ``nan``, so does :attr:`value`, however the adds were
    spread: a total beyond the float range is ``inf`` or ``-inf``; ``+inf`` with ``-inf``,
    or any NaN, is ``nan``.  ``min`` and
    ``max`` compare with ``<`` and ``>``, so, as with the builtins, NaN gives no
    meaningful result; leave it out.

    Args:
        op: ``"sum"``, ``"min"`` or ``"max"``.
        dtype: ``int`` or ``float`` (the default).

    Raises:
        ValueError: an unknown ``op`` or ``dtype``; the message lists the choices.

    Example:
        >>> import parallelkit as pk
        >>> with pk.SharedAccumulator("max", dtype=int) as highest:
        ...     for x in (3, 9, 4):
        ...         highest.add(x)
        ...     highest.value
        9

    .. versionadded:: 0.1
    """

    __slots__ = ()

    @overload
    def __init__(self: SharedAccumulator[float], op: Op) -> None: ...
    @overload
    def __init__(self, op: Op, *, dtype: type[N]) -> None: ...
    def __init__(self, op: Op, *, dtype: type[int] | type[float] = float) -> None:
        if op not in OPS:
            raise ValueError(
                f"unknown op {op!r}; valid choices: " + ", ".join(repr(o) for o in OPS)
            )
        if dtype is not int and dtype is not float:
            raise ValueError(f"unsupported dtype {dtype!r}; valid choices: int, float")
        self._create(OPS.index(op), DT_INT if dtype is int else DT_FLOAT)

    @property
    def op(self) -> Op:
        """``"sum"``, ``"min"`` or ``"max"``."""
        return OPS[self._op]

    @property
    def dtype(self) -> type[N]:
        """``int`` or ``float``."""
        dtype: Any = int if self._dtype == DT_INT else float
        return dtype  # type: ignore[no-any-return]  # which one N is, known at run time

    def add(self, x: N) -> None:
        """Add ``x`` to the sum, or offer it as a new minimum or maximum.

        Raises:
            ValueError: the accumulator is closed, or (int) this writer's partial sum would
                leave int64.
            TypeError: ``x`` does not fit the dtype (a float into an int accumulator).
        """
        if _get_ident() == self._tid:
            cell = self._cell
            op = self._op
            try:
                if op == OP_SUM:
                    cell[0] += x
                elif op == OP_MIN:
                    if x < cell[0]:  # noqa: PLR1730 - no call, and no store when nothing changes
                        cell[0] = x
                elif x > cell[0]:
                    cell[0] = x
            except (TypeError, ValueError) as exc:
                raise self._add_error(cell, x, exc) from None
        else:
            self._add_slow(x)

    @property
    def value(self) -> N:
        """The sum, minimum or maximum of every value added so far, from every process.

        The sum of no values is ``0``; the minimum or maximum of no values is an error,
        as for the builtins :func:`min` and :func:`max`.

        Raises:
            ValueError: ``"min"`` or ``"max"`` with nothing added yet; or it is closed.
        """
        result: N = self._reduce()
        return result
