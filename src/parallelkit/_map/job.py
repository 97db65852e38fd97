"""Jobs: how one map call is cut into chunks and how its results come back in order.

A :class:`Job` makes chunks lazily (from a sequence by slicing, or from an iterator with
adaptive chunk sizes), keeps a bounded number of them in flight, puts results through a
reorder buffer, and decides what a failed item means (raise at once, a slot holding the
exception, or an error raised when the item is reached).  :func:`collect` and
:func:`iterate` drive a :class:`Driver` until a job is done. Two drivers exist: the process
:class:`~parallelkit._map.engine.Engine`, and
:class:`~parallelkit._map.backends.driver.ChunkEngine`, which runs the same jobs on any
other backend (serial, threads, an Executor, Dask).
"""

from __future__ import annotations

import itertools
import pickle
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, Final, Protocol, cast

from parallelkit._map import worker as W
from parallelkit._map.calls import ItemCall
from parallelkit._util.threads import Mutex
from parallelkit._wire.arena import CHUNK_BYTES, KEPT_LIMIT, dump_items
from parallelkit._wire.codec import PROTOCOL, Strided, dumps, locate_unpicklable
from parallelkit.errors import SerializationError

TARGET_CHUNK_SECONDS: Final = 0.02  # adaptive chunking aims for chunks of about this long
MAX_ADAPTIVE_CHUNK: Final = 100_000
_chunk_ids = itertools.count(1)


# Types whose every value pickles (not subclasses: their state may not).  A chunk made
# of these alone is not pickled to check it: bytes would be copied in band.
_ALWAYS_PICKLABLE: Final = frozenset(
    {int, float, complex, bool, str, bytes, bytearray, type(None), range, slice}
)


def _released(*args: object, **kwargs: object) -> object:
    raise RuntimeError("internal: a released job's function was called")


class Failure:
    """A failed item's slot in a result list (only where errors are raised on delivery)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class PoolBrokenError(RuntimeError):
    """Internal: the engine can no longer run work (reported as its cause)."""


class Driver(Protocol):
    """What a :class:`Job` needs from whoever runs its chunks (see the module docstring)."""

    max_workers: int  # sizes chunks and the in-flight window
    changes: int  # bumped whenever a job gets a result or an error
    mutex: Mutex
    pickles_items: bool  # False: chunks are not pickled here (in-process, or by Dask)

    def register_function(self, fn: Callable[..., object]) -> tuple[int, bytes]: ...
    def abandon(self, job: Job) -> None: ...
    def drive(self, done: Callable[[], bool], timeout: float | None = None) -> bool: ...
    def defer(self, callback: Callable[[], object]) -> None: ...
    def future_done(self, job: Job) -> None: ...


class Chunk:
    __slots__ = (
        "buffers",
        "cid",
        "items",
        "job",
        "payload",
        "region",
        "start",
        "stop",
        "tracked",
        "untaken",
    )

    def __init__(self, job: Job, start: int, stop: int, items: Sequence[Any] | None) -> None:
        self.cid = next(_chunk_ids)
        self.job = job
        self.start = start
        self.stop = stop
        self.items = items  # None: the worker inherited the input and slices it
        self.payload: bytes | None = None
        self.tracked = False  # True: the worker must note every item (a re-run after a crash)
        self.buffers: list[memoryview | Strided] | None = None  # large ones, sent apart (_arena)
        self.region: Any = None  # where they are while a worker has the chunk
        self.untaken = 0  # workers that died before they had received it whole


class Job:
    """One map call (or one submitted call): makes chunks, collects results in order."""

    alone = False  # True: queued by itself (a submitted call), not asked in turn
    solo = False  # True: runs on a worker that holds no other chunk (a cancellable task)

    def __init__(
        self,
        engine: Driver,
        fn: Callable[..., object],
        source: Iterator[Any] | Sequence[Any],
        *,
        length: int | None,
        chunksize: int | None,
        ordered: bool,
        return_exceptions: bool,
        fail_fast: bool,
        timeout: float | None,
        star: bool = False,
        inherited: bool = False,
    ) -> None:
        # star() / star_kwargs(): an item of the wrong kind fails before it is sent; a
        # sequence is checked whole now (C-level), so that fail-fast fails before any work
        self.item_check: ItemCall | None = None
        if isinstance(fn, ItemCall) and not star and fn.expects is not object:
            self.item_check = fn
            if length is not None:
                seq = cast("Sequence[Any]", source)
                bad = fn.bad_item(seq)
                if bad is None:
                    self.item_check = None
                elif fail_fast and not return_exceptions:
                    raise fn.item_error(seq[bad], bad)
        self.engine = engine
        self.fn = fn
        self.fn_id, self.fn_payload = engine.register_function(fn)
        self.source = source
        self.iterator: Iterator[Any] | None = None if length is not None else iter(source)
        self.length = length
        self.fixed_chunksize = chunksize
        self.chunksize = chunksize or self._initial_chunksize()
        self.initial_chunksize = self.chunksize
        self.ordered = ordered
        self.return_exceptions = return_exceptions
        self.fail_fast = fail_fast
        self.timeout = timeout
        self.inherited = inherited
        self.flags = (
            (W.STAR_CALL if star else 0)
            | (W.TIMED if timeout is not None else 0)
            | (W.STOP_ON_ERROR if fail_fast and not return_exceptions else 0)
        )
        self.next_start = 0
        self.exhausted = length == 0
        self.in_flight = 0
        self.retries: deque[Chunk] = deque()
        self.pending: dict[int, tuple[list[Any], bool]] = {}
        self.deliver_index = 0
        self.out: deque[tuple[list[Any], bool]] = deque()
        self.error: BaseException | None = None
        self.cancelled = False
        self.seconds_per_item: float | None = None
        self.window = 4 * engine.max_workers + 2
        # large buffers through shared memory (the process engine only; see _arena)
        self.out_of_band: bool = getattr(engine, "out_of_band", False)
        self.byte_cap = MAX_ADAPTIVE_CHUNK  # items per chunk that CHUNK_BYTES allows
        self.carry: list[Any] = []  # an iterator's items read but not yet sent (see next_chunk)
        # the input iterable raised this: the job ends with it once the items before it ran
        self.input_error: BaseException | None = None
        self.kept = 0  # regions the function kept a reference to

    # ---------------------------------------------------------------- chunking
    def _initial_chunksize(self) -> int:
        if self.length is None:
            return 1  # grows as timings arrive
        return max(1, -(-self.length // (4 * self.engine.max_workers)))

    def _adapt(self, items: int, seconds: float) -> None:
        """A chunk of ``items`` took ``seconds`` in the worker: size the next chunks.

        An iterator's chunks grow towards TARGET_CHUNK_SECONDS.  A sized input starts at
        len / (4 x workers) and never goes above it, but shrinks for long items (0.1 s
        each, say: one per chunk), so no worker waits at the end while another runs two.
        """
        if items == 0:
            return
        per_item = seconds / items
        if self.seconds_per_item is None:
            self.seconds_per_item = per_item
        else:
            self.seconds_per_item = 0.7 * self.seconds_per_item + 0.3 * per_item
        if self.fixed_chunksize is not None:
            return
        ideal = int(TARGET_CHUNK_SECONDS / max(self.seconds_per_item, 1e-9))
        if self.length is not None:
            self.chunksize = max(1, min(ideal, self.initial_chunksize, self.byte_cap))
        else:
            self.chunksize = max(1, min(ideal, 2 * self.chunksize, self.byte_cap))

    def resume(
        self,
        done: int,
        results: list[Any],
        errors: list[tuple[int, BaseException]] | None,
        failure: BaseException | None = None,
    ) -> None:
        """Items ``0 ... done - 1`` have run already (``backend="auto"`` measured them in the
        caller): their results are the job's first; chunks start after them.  ``failure``:
        they ended with an error that fails the job (an item's, fail fast, or the input's),
        raised after the results before it."""
        self.next_start = done
        if failure is not None:
            ok = errors[0][0] if errors else done
            if ok:
                self.complete(0, results[:ok], None)
            self.exhausted = True
            self.fail(failure)
            return
        if self.length is not None:
            self.exhausted = done >= self.length
            if self.fixed_chunksize is None:
                left = max(1, self.length - done)
                self.chunksize = max(1, -(-left // (4 * self.engine.max_workers)))
                self.initial_chunksize = self.chunksize
        if done:
            self.complete(0, results, errors)

    @property
    def finished(self) -> bool:
        return (
            self.exhausted and self.in_flight == 0 and not self.retries and not self.pending
        ) or self.cancelled

    def next_chunk(self) -> Chunk | None:  # noqa: PLR0911,PLR0912 - a hot path kept in one frame (a helper call costs more than its branches)
        """The next chunk to run, or ``None`` (input done, window full, or failed)."""
        if self.cancelled or self.error is not None:
            return None
        if self.retries:
            return self.retries.popleft()
        if self.exhausted or self.in_flight + len(self.pending) + len(self.out) >= self.window:
            return None
        start = self.next_start
        if self.length is not None:
            stop = min(start + self.chunksize, self.length)
            if self.inherited:
                items = None
            elif start == 0 and stop == self.length:
                items = cast("Sequence[Any]", self.source)  # one chunk for all: no copy
            else:
                items = self.source[start:stop]  # type: ignore[index]
        else:
            items = self._read_iterator(start)
            if items is None:
                return None
            stop = start + len(items)
        self.next_start = stop
        if stop >= (self.length if self.length is not None else stop + 1):
            self.exhausted = True
        if self.input_error is not None and not self.carry:
            self.exhausted = True
        chunk = Chunk(self, start, stop, items)
        if not self._prepare(chunk):
            return self.next_chunk()
        if stop - start > 1 and self.fixed_chunksize is None:
            # large items pickled in band count too: a chunk of them would keep the
            # workers waiting while it is pickled, sent and read whole
            nbytes = len(chunk.payload or b"") + sum(b.nbytes for b in chunk.buffers or ())
            if nbytes > CHUNK_BYTES:  # fewer items per chunk, so that workers start early
                self.byte_cap = max(1, (stop - start) * CHUNK_BYTES // nbytes)
                self.chunksize = min(self.chunksize, self.byte_cap)
                if self.length is not None or self.chunksize < stop - start:
                    # cut again at the cap: an iterator's items cannot go back, so they wait
                    # in the carry (a chunk of two 2 MB items made the arena grow once)
                    if self.length is None:
                        assert chunk.items is not None
                        self.carry[:0] = chunk.items
                    self.next_start = start
                    self.exhausted = False
                    return self.next_chunk()
        return chunk

    def _read_iterator(self, start: int) -> list[Any] | None:
        """An iterator's next chunk of items (the carry's first), or ``None``: it ended, or
        raised at once.  An ``Exception`` from the input fails the job only after the
        items read before it (:attr:`input_error`)."""
        assert self.iterator is not None
        if self.carry:
            items = self.carry[: self.chunksize]
            del self.carry[: len(items)]
            return items
        items = []
        try:  # extend keeps the items read before the input raised
            items.extend(itertools.islice(self.iterator, self.chunksize))
        except BaseException as exc:
            last = start + len(items) - 1
            exc.add_note(f"parallelkit: raised by the input iterable after item {last}")
            if not isinstance(exc, Exception):  # Ctrl-C and its kin: at once
                self.fail(exc)
                self.exhausted = True
                return None
            self.input_error = exc
        if not items:
            # This may be what finishes the job (every result already delivered): say
            # so, or a driver that dispatched before waiting would wait with nothing
            # left to wait for.
            self.exhausted = True
            self.engine.changes += 1
            return None
        return items

    def dump_in_band(self, chunk: Chunk) -> bytes:
        """The chunk's items pickled with every buffer inside (it was pickled before)."""
        return pickle.dumps(chunk.items, PROTOCOL) if chunk.items is not None else b""

    def note_kept(self) -> None:
        """A worker's function kept a reference into the arena: after a few, stop using it
        (each one retires a whole segment)."""
        self.kept += 1
        if self.kept >= KEPT_LIMIT:
            self.out_of_band = False

    def _prepare(self, chunk: Chunk) -> bool:
        """Pickle the chunk's items; on failure, report the item and split around it."""
        if self.item_check is not None and not self._check_kinds(chunk, self.item_check):
            return False
        if chunk.items is None:
            chunk.payload = b""
            return self._check_inherited(chunk)
        if not self.engine.pickles_items:
            chunk.payload = b""
            return True
        try:
            if self.out_of_band:
                chunk.payload, buffers = dump_items(chunk.items)
                chunk.buffers = buffers or None
            else:
                chunk.payload = pickle.dumps(chunk.items, PROTOCOL)
            return True
        except Exception:
            chunk.buffers = None
        try:
            chunk.payload = dumps(chunk.items)
            return True
        except Exception:
            located = locate_unpicklable(chunk.items)
            if located is None:
                raise
        self._unpicklable(chunk, *located)
        return False

    def _check_kinds(self, chunk: Chunk, call: ItemCall) -> bool:
        """Fail the chunk's first item that ``call`` cannot take; split around it."""
        items = chunk.items
        if items is None:
            items = cast("Sequence[Any]", self.source)[chunk.start : chunk.stop]
        pos = call.bad_item(items)
        if pos is None:
            return True
        self.split_around(chunk, pos, call.item_error(items[pos], chunk.start + pos))
        return False

    def _check_inherited(self, chunk: Chunk) -> bool:
        """fork: the workers inherit the input and slice it themselves, so nothing needs
        pickling -- but an item that cannot be pickled fails under forkserver and spawn, so
        it fails here too: one rule for every start method, found out under fork.  Large
        buffers are left out of band (not copied): only the structure is pickled."""
        items = cast("Sequence[Any]", self.source)[chunk.start : chunk.stop]
        if set(map(type, items)) <= _ALWAYS_PICKLABLE:  # C-level scan: the common case
            return True
        try:
            # as a chunk would be pickled to send it: large buffers, contiguous or not
            # (tiles of an image), are left apart, not copied
            dump_items(items)
            return True
        except Exception:
            pass
        try:
            dumps(items)  # cloudpickle, if installed, sends what pickle cannot
            return True
        except Exception:
            located = locate_unpicklable(items)
            if located is None:
                raise
        self._unpicklable(chunk, *located)
        return False

    def _unpicklable(self, chunk: Chunk, pos: int, cause: Exception) -> None:
        """The chunk's item ``pos`` cannot be pickled: fail it, queue the rest again."""
        index = chunk.start + pos
        error = SerializationError(
            f"item {index} cannot be pickled to send it to a worker: "
            f"{type(cause).__name__}: {cause}",
            what="argument",
            item_index=index,
        )
        error.__cause__ = cause
        self.split_around(chunk, pos, error)

    def split_around(self, chunk: Chunk, pos: int, error: BaseException | None) -> None:
        """Record ``error`` for the chunk's item ``pos``; queue the rest of the chunk again.

        ``error=None`` re-runs the whole chunk, one item per chunk (nothing to blame yet).
        """
        start, stop = chunk.start, chunk.stop
        pieces: list[tuple[int, int]]
        if error is None:
            pieces = [(i, i + 1) for i in range(start, stop)]
        else:
            self.complete(start + pos, [None], [(0, error)])
            if self.cancelled or self.error is not None:
                return
            pieces = [(start, start + pos), (start + pos + 1, stop)]
        for lo, hi in reversed(pieces):
            if lo >= hi:
                continue
            items = None if chunk.items is None else chunk.items[lo - start : hi - start]
            piece = Chunk(self, lo, hi, items)
            if self._prepare(piece):
                self.retries.appendleft(piece)

    # ---------------------------------------------------------------- results
    def complete(
        self, start: int, results: list[Any], errors: list[tuple[int, BaseException]] | None
    ) -> None:
        """Results for items ``start ...`` arrived (errors: (position, exception) pairs)."""
        self.engine.changes += 1
        if self.cancelled:
            return
        flagged = False
        if errors:
            for pos, exc in errors:
                if self.return_exceptions:
                    results[pos] = exc
                elif self.fail_fast:
                    self.fail(exc)
                    return
                else:
                    results[pos] = Failure(exc)
                    flagged = True
        if not self.ordered:
            self.out.append((results, flagged))
            return
        self.pending[start] = (results, flagged)
        while self.deliver_index in self.pending:
            entry = self.pending.pop(self.deliver_index)
            self.deliver_index += len(entry[0])
            self.out.append(entry)

    def fail(self, exc: BaseException) -> None:
        self.engine.changes += 1
        if self.error is None:
            self.error = exc
        self.engine.abandon(self)

    def release(self) -> None:
        """Its caller is done with it: let go of the function and the input, which may be
        large or hold other objects (a closed iterator kept by its caller holds us)."""
        self.fn = _released
        self.item_check = None  # the caller's function too (star(fn, args=...) holds args)
        self.source = ()
        self.iterator = None
        self.error = None if self.cancelled else self.error  # raised already, if at all
        self.input_error = None if self.cancelled else self.input_error

    def cancel(self) -> None:
        """Stop making chunks; results still in flight are dropped when they arrive."""
        if not self.cancelled:
            self.cancelled = True
            self.out.clear()
            self.pending.clear()
            self.retries.clear()
            self.engine.abandon(self)


def collect(engine: Driver, job: Job) -> list[Any]:
    """Run ``job`` to completion in this thread; the results in a list (fail fast)."""
    ordered = job.ordered
    n = job.length
    out: list[Any] = [None] * n if ordered and n is not None else []
    filled = 0

    def ready() -> bool:
        return bool(job.out) or job.error is not None or job.finished

    while True:
        engine.drive(ready)
        while job.out:
            results, flagged = job.out.popleft()
            if flagged:
                for value in results:
                    if type(value) is Failure:
                        raise value.exc
            if ordered and n is not None:
                if filled == 0 and len(results) == n:
                    out = results  # one chunk held everything: no copy
                else:
                    out[filled : filled + len(results)] = results
            else:
                out.extend(results)
            filled += len(results)
        if job.error is not None:
            raise job.error
        if job.finished:
            engine.abandon(job)
            if job.input_error is not None:
                raise job.input_error
            return out


def handed_out(results: list[Any]) -> Iterator[Any]:
    """Iterate over ``results``, emptying the list as it goes: a value handed out is no
    longer held by us, so a caller that drops it frees it (CPython gh-14406).  C-level
    calls only: no Python frame per item."""
    results.reverse()
    return map(list.pop, itertools.repeat(results, len(results)))


def iterate(engine: Driver, job: Job) -> Generator[list[Any], None, None]:
    """Yield ``job``'s results, a list at a time, as they become available.

    In order if the job is ordered.  A failure that is raised on delivery is raised after
    the results before it have been yielded.
    """

    def ready() -> bool:
        return bool(job.out) or job.error is not None or job.finished

    try:
        while True:
            while job.out:
                results, flagged = job.out.popleft()
                if flagged:
                    for pos, value in enumerate(results):
                        if type(value) is Failure:
                            if pos:
                                yield results[:pos]
                            raise value.exc
                yield results
            if job.error is not None:
                raise job.error
            if job.finished:
                if job.input_error is not None:
                    raise job.input_error
                return
            engine.drive(ready)
    finally:
        stop(engine, job)


def stop(engine: Driver, job: Job) -> None:
    """Its caller is done with ``job`` (finished, failed, or left early): cancel what is not
    done and forget it.  Idempotent.  It may run from garbage collection, inside any code:
    it never blocks on the mutex."""
    if not job.finished:
        job.cancelled = True  # seen by the driver even if we cannot take the mutex
    mutex = engine.mutex
    if mutex.held():  # from inside the engine (garbage collection): the driver sees cancelled
        return
    try:  # not `if acquire(): try:` -- a Ctrl-C as acquire() returned must not keep the mutex
        if mutex.acquire(blocking=False):
            if job.cancelled or job.error is not None:
                job.cancelled = False
                job.cancel()
            engine.abandon(job)
    finally:
        if mutex.held():  # not held on entry: we took it
            mutex.release()


class Turns:
    """Whose turn it is to give a driver its next chunk, among the jobs it runs.

    Both drivers (the process engine and ``ChunkEngine``) ask their jobs in turn, so that a
    long map does not starve another one on the same pool.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0  # the job (by position) to ask first next time

    def next_chunk(
        self,
        jobs: list[Job],
        abandon: Callable[[Job], object],
        before: Callable[[Job], object] | None = None,
    ) -> Chunk | None:
        """The next chunk of the first job in turn that has one; ``abandon`` is called for
        cancelled jobs (closed from another thread, or by the garbage collector), ``before``
        for each job before it is asked."""
        # a snapshot: asking a job for a chunk may settle it and remove it from ``jobs``
        snapshot = list(jobs)
        n = len(snapshot)
        for k in range(n):
            job = snapshot[(self._next + k) % n]
            if job.cancelled:
                abandon(job)
                continue
            if before is not None:
                before(job)
            chunk = job.next_chunk()
            if chunk is not None:
                self._next = (self._next + k + 1) % n
                return chunk
        return None
