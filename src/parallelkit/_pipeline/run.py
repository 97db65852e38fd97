"""The pipeline router: stage processes, the source thread, batches, budget and order.

:mod:`parallelkit._pipeline.builder` (the public ``Pipeline``) runs a pipeline with a ``Run``.

::

    source ─▶ router ─▶ stage 1 workers ─▶ router ─▶ stage 2 workers ─▶ router ─▶ consumer
                 (the router is the consumer's own thread; one duplex pipe per worker)

Every worker of every stage has its own duplex pipe to the parent, as a pool worker does,
and the parent routes *batches* between stages: it forwards a finished batch's bytes to a
worker of the next stage without unpickling them.  Compared with workers sharing one
``multiprocessing.Queue`` per stage, this means:

- no shared lock a killed worker can leave held, and no feeder thread that can swallow an
  unpicklable item: the parent knows which batch every worker holds, so a crash names the
  stage, the worker and the source items involved, as soon as its sentinel fires;
- backpressure is exact: at most ``maxsize`` source items are between the source and the
  consumer (taken from the source and not yet handed out), however slow any stage or the
  consumer is; the source is read by a helper thread that stops when that budget is spent;
  without ``maxsize`` the budget counts bytes too (``BYTES_IN_FLIGHT``: a batch weighs its
  largest message so far), so that large items are not multiplied by stages and workers;
- batching adapts: a batch holds whatever the source has ready, up to a size set by the
  pickled bytes per item and the stages' speed, so a fast source moves thousands of small
  items per message while a slow trickle is sent one item at a time, at once;
- order is kept with a reorder buffer on batch numbers (a batch's outputs keep its number
  through every stage), so ``ordered=False`` only changes when results are handed out.

The router runs only while the consumer waits for results (``run()``, or ``next()`` on
the iterator): a consumer that stops asking stops the pipeline once the budget is spent.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import select
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Final

from parallelkit._observe.progress import PipelineProgress, StageProgress
from parallelkit._observe.table import text_table
from parallelkit._pipeline.stage import ERROR, STOP, TASK, stage_worker
from parallelkit._proc.lifecycle import (
    bootstrap_options,
    describe_exit,
    leave_if_exiting,
    signal_name,
    start_child,
    stop_processes,
    wait_exited,
    waiting_on_children,
)
from parallelkit._util import fuzz as _fuzz
from parallelkit._util.context import get_context
from parallelkit._util.threads import quiet_thread
from parallelkit._util.types import StartMethod
from parallelkit._wire import frames
from parallelkit._wire.codec import dump_function, locate_unpicklable, rebuild_exception
from parallelkit.errors import PipelineError, SerializationError, WorkerCrashedError

if TYPE_CHECKING:
    from parallelkit._observe.stalls import StallReport

__all__ = ("PipelineStats", "Run", "Stage", "StageStats")

MAX_BATCH: Final = 4096  # items per message, at most
BATCH_BYTES: Final = 256 * 1024  # aim for messages about this size
BATCH_SECONDS: Final = 0.005  # ... and for batches that keep the slowest stage this busy
CHUNK_SECONDS: Final = 0.001  # the source thread passes on what it read at least this often
STOP_TIMEOUT: Final = 5.0  # seconds finished workers get to exit before being terminated
# maxsize=None: besides the items bound, at most about this many bytes (the largest pickled
# message of each batch) between the source and the consumer, however many stages and
# workers there are; never fewer than MIN_IN_FLIGHT items, so that the stages overlap
BYTES_IN_FLIGHT: Final = 64 << 20
MIN_IN_FLIGHT: Final = 2  # items

# ------------------------------------------------------------------ statistics


@dataclass(frozen=True, slots=True)
class StageStats:
    """What one stage did during a run.

    Attributes:
        name: the stage's name.
        workers: how many worker processes ran it.
        items_in: items it received.
        items_out: items it passed on (fewer for a filter, more or fewer for a flat_map).
        busy_seconds: time its workers spent working, summed over the workers (including
            unpickling and pickling batches).
        waiting_seconds: time its workers spent waiting for work, summed over the workers.
            A stage that waits a lot is starved by the stages before it; the stage whose
            workers are busiest is the bottleneck.
    """

    name: str
    workers: int
    items_in: int
    items_out: int
    busy_seconds: float
    waiting_seconds: float

    @property
    def utilisation(self) -> float:
        """Busy time as a share of the time its workers were busy or waiting (0 to 1)."""
        total = self.busy_seconds + self.waiting_seconds
        return self.busy_seconds / total if total > 0 else 0.0


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """The per-stage summary of a pipeline run (``Pipeline.stats``, ``PipelineIterator.stats``).

    Attributes:
        stages: one :class:`StageStats` per stage, in order.
        source_items: items read from the source.
        items_out: items the consumer has received (not those ready for it and not yet
            taken).
        seconds: wall time of the run so far.
        consumer_waiting_seconds: time the consumer spent waiting for results.
    """

    stages: tuple[StageStats, ...]
    source_items: int
    items_out: int
    seconds: float
    consumer_waiting_seconds: float

    @property
    def bottleneck(self) -> StageStats | None:
        """The stage whose workers were busiest, or ``None`` without stages."""
        return max(self.stages, key=lambda s: s.utilisation, default=None)

    def __str__(self) -> str:
        rows = [("stage", "workers", "in", "out", "busy s", "waiting s", "busy %")]
        for s in self.stages:
            rows.append(
                (
                    s.name,
                    str(s.workers),
                    str(s.items_in),
                    str(s.items_out),
                    f"{s.busy_seconds:.3f}",
                    f"{s.waiting_seconds:.3f}",
                    f"{100 * s.utilisation:.0f}",
                )
            )
        lines = text_table(rows)
        lines.append(
            f"{self.source_items} items from the source, {self.items_out} out, in "
            f"{self.seconds:.3f} s (the consumer waited {self.consumer_waiting_seconds:.3f} s)"
        )
        return "\n".join(lines)


# ------------------------------------------------------------------ stages and the run


@dataclass(frozen=True, slots=True)
class Stage:
    kind: int
    fn: Callable[[Any], Any]
    max_workers: int
    name: str
    ordered: bool


class _Worker:
    __slots__ = ("conn", "held", "process", "stage")

    def __init__(self, process: BaseProcess, conn: Connection, stage: int) -> None:
        self.process = process
        self.conn = conn
        self.stage = stage
        self.held: deque[int] = deque()  # batch numbers sent and not yet answered


class _Counts:
    __slots__ = ("busy", "items_in", "items_out", "waiting")

    def __init__(self) -> None:
        self.items_in = 0
        self.items_out = 0
        self.busy = 0
        self.waiting = 0


class Run:
    """One execution of a pipeline: its processes, buffers and the router loop."""

    def __init__(
        self,
        source: Iterable[Any],
        stages: Sequence[Stage],
        start_method: StartMethod,
        maxsize: int | None,
    ) -> None:
        self.stages = stages
        self.start_method = start_method
        self.maxsize = maxsize
        self.ordered = all(stage.ordered for stage in stages)
        self.workers: list[_Worker] = []
        self.by_stage: list[list[_Worker]] = [[] for _ in stages]
        self.counts = [_Counts() for _ in stages]
        self.pending: list[deque[tuple[int, frames.Parts]]] = [deque() for _ in stages]
        self.batch_size = 1  # source items per batch: see _resize
        self.batch_span: dict[int, tuple[int, int]] = {}  # batch -> (first source item, count)
        self.next_batch = 0
        self.taken = 0  # source items taken into batches
        self.handed = 0  # source items whose outputs were handed out
        self.released = 0  # ... and that the consumer has moved past (the budget)
        self.streaming = False  # True: the consumer releases the budget (see release())
        self.ready: dict[int, list[Any]] = {}  # finished batches, for the reorder buffer
        self.next_out = 0  # the batch to hand out next (ordered)
        self.outputs: deque[list[Any]] = deque()
        self.held_counts: deque[int] = deque()  # source items behind each list in outputs
        self.held_bytes: deque[int] = deque()  # ... and their bytes, while the consumer has them
        self.batch_bytes: dict[int, int] = {}  # batch -> its largest message so far
        self.bytes_in_flight = 0  # the sum of batch_bytes, and of held_bytes
        self.item_bytes: int | None = None  # pickled bytes per item of the last batch taken
        self.items_out = 0  # items the consumer took (in lists from outputs) ...
        self.unread: Callable[[], int] = _none  # ... less those it has not read yet
        self.started = time.perf_counter()
        self.consumer_waiting = 0.0
        self.closed = False
        self.finished = False
        self.error: BaseException | None = None
        # the source: sliced when it is a sequence, else read by a helper thread
        self.sequence: Sequence[Any] | None = None
        self.thread: threading.Thread | None = None
        self.iterator: Iterator[Any] | None = None
        if isinstance(source, list | tuple | range):
            self.sequence = source
        else:
            self.iterator = iter(source)
        self.source_chunks: deque[list[Any]] = deque()
        self.pulled = 0
        self.source_done = False
        self.source_error: BaseException | None = None
        self.want_source = False
        self.thread_waiting = False
        self.budget = threading.Condition(threading.Lock())
        self.wakeup = _WakeUp()
        self.writer = frames.Writer()
        self.poll: select.poll | None = None
        self.finalizer = weakref.finalize(self, _kill, self.workers, self.writer, self.wakeup)
        self.progress: PipelineProgress | None = None  # progress=: reported by the router
        # stall_timeout= (see _check_stall)
        self.stall_timeout: float | None = None
        self.on_stall: Callable[[StallReport], object] | None = None
        self.last_moved = time.monotonic()
        self.next_stall_report = 0.0

    # -------------------------------------------------------------- start and stop

    def start(self) -> None:
        context = get_context(self.start_method)
        fork = self.start_method == "fork"
        payloads: list[bytes | None] = [
            None if fork else dump_function(stage.fn) for stage in self.stages
        ]
        try:
            for index, stage in enumerate(self.stages):
                for number in range(stage.max_workers):
                    self._start_worker(context, index, stage, payloads[index], number)
        except BaseException:
            self.abort()
            raise
        if self.iterator is not None:
            # it never takes a Ctrl-C meant for the main thread
            self.thread = quiet_thread(self._pull, name="parallelkit-pipeline-source")
            self.thread.start()

    def _start_worker(
        self, context: Any, index: int, stage: Stage, payload: bytes | None, number: int
    ) -> None:
        parent_end, child_end = context.Pipe(duplex=True)
        frames.enlarge_buffers(parent_end)
        frames.enlarge_buffers(child_end)

        def record(process: BaseProcess) -> None:
            worker = _Worker(process, parent_end, index)
            self.workers.append(worker)
            self.by_stage[index].append(worker)

        try:
            start_child(
                context,
                self.start_method,
                stage_worker,
                args=(child_end, stage.kind, stage.fn if payload is None else None, payload),
                kwargs={
                    **bootstrap_options(self.start_method),
                    "fast_exit": self.start_method == "spawn",
                },
                name=f"parallelkit-stage{index}-{number}",
                on_started=record,
            )
        except BaseException:
            if not any(w.conn is parent_end for w in self.workers):
                parent_end.close()
            raise
        finally:
            child_end.close()

    def abort(self) -> None:
        """Stop everything at once (cancel, error, Ctrl-C); idempotent."""
        if self.closed:
            return
        self.closed = True
        if _fuzz.ENABLED:
            _fuzz.point("router.abort")  # the source thread may be inside next() or waking us
        self._stop_source()
        self.finalizer()
        if self.progress is not None:
            self.progress.close()

    def _finish(self) -> None:
        """Every item is through: let the workers exit, then reap them."""
        if self.closed:
            return
        self.closed = True
        self.finished = True
        if _fuzz.ENABLED:
            _fuzz.point("router.finish")
        stop = frames.encode(None, STOP)
        for worker in self.workers:
            with contextlib.suppress(OSError):
                self.writer.send(worker.conn, stop)
        self.writer.close()
        if _fuzz.ENABLED:
            _fuzz.point("router.finish_stopped")  # the workers are exiting
        if self.progress is not None:
            self.report_progress()
            self.progress.close()
        stop_processes(
            [w.process for w in self.workers], join_timeout=STOP_TIMEOUT, what="pipeline stage"
        )
        self._stop_source()
        self.finalizer()

    def _stop_source(self) -> None:
        with self.budget:
            self.budget.notify_all()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)  # it may be inside the user's next(): it exits when that returns

    # -------------------------------------------------------------- the source thread

    def _pull(self) -> None:
        """The source thread: read the source in chunks into ``source_chunks``.

        A chunk starts at one item and doubles while the source fills it within
        ``CHUNK_SECONDS`` twice in a row (halving when it does not), so a fast source is read
        in C-speed runs of up to a batch while a slow trickle is passed on item by item.  (A
        source that turns slow after a fast run can hold back the items of one chunk until
        its next item comes.)  Reading stops while ``maxsize`` items are between the source
        and the consumer.
        """
        iterator = self.iterator
        assert iterator is not None
        chunks = self.source_chunks
        clock = time.perf_counter
        size = 1
        fast = 0  # chunks in a row that filled within CHUNK_SECONDS
        chunk: list[Any] = []
        try:
            while not self.closed:
                room = self._cap() - (self.pulled - self.released)
                if room <= 0:
                    with self.budget:
                        self.thread_waiting = True
                        if self._cap() - (self.pulled - self.released) <= 0 and not self.closed:
                            self.budget.wait(0.25)
                        self.thread_waiting = False
                    continue
                limit = min(size, room, self.batch_size)
                chunk = []
                append = chunk.append
                began = clock()
                for item in itertools.islice(iterator, limit):
                    append(item)
                took = clock() - began
                count = len(chunk)
                if count:
                    if _fuzz.ENABLED:
                        _fuzz.point("router.source_chunk")
                    chunks.append(chunk)
                    self.pulled += count
                    chunk = []
                    if self.want_source:
                        self.wakeup.wake()
                    else:
                        time.sleep(0)  # let the router have the GIL: it has work to route
                if count < limit:
                    break  # the source is exhausted
                if took < CHUNK_SECONDS:
                    fast += 1
                    if fast >= 2:  # twice in a row: one quick item proves no steady rate
                        size = min(2 * size, MAX_BATCH)
                else:
                    fast = 0
                    size = max(1, size // 2)
        except BaseException as exc:
            if chunk:  # what the source yielded before it raised is not lost
                chunks.append(chunk)
                self.pulled += len(chunk)
            self.source_error = exc
        finally:
            if self.closed:
                close = getattr(iterator, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()  # run the generator's finally blocks
            self.source_done = True
            self.wakeup.wake()

    def _cap(self) -> int:
        """Source items allowed between the source and the consumer."""
        if self.maxsize is not None:
            return self.maxsize
        items = self.batch_size * (2 * len(self.workers) + 4)
        if self.item_bytes is None:  # no item measured yet: it may be a large one
            return min(items, MIN_IN_FLIGHT)
        return max(MIN_IN_FLIGHT, min(items, BYTES_IN_FLIGHT // max(1, self.item_bytes)))

    # -------------------------------------------------------------- the router

    def drive(self, *, until_output: bool) -> None:
        """Route batches until the run ends (or, with ``until_output``, results are ready)."""
        if self.closed:
            return  # stopped (finished, failed or cancelled): nothing left to route
        try:
            while not self.finished:
                if until_output and self.outputs:
                    return
                self._dispatch()
                if self._all_done():
                    self._finish()
                    return
                self._wait_and_receive()
                if self.progress is not None:
                    self.report_progress()
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            self.abort()
            raise

    def _all_done(self) -> bool:
        if self.sequence is not None:
            exhausted = self.taken >= len(self.sequence)
        else:
            exhausted = self.source_done and not self.source_chunks
        if not exhausted or self.handed < self.taken:
            return False
        if self.source_error is not None:
            error = PipelineError(
                f"the pipeline's source raised {type(self.source_error).__name__}: "
                f"{self.source_error}",
                stage="source",
            )
            error.__cause__ = self.source_error
            raise error
        return True

    def _dispatch(self) -> None:
        # later stages first: finishing work frees the budget sooner
        for index in range(len(self.stages) - 1, -1, -1):
            pending = self.pending[index]
            while pending:
                worker = self._free_worker(index)
                if worker is None:
                    break
                batch, message = pending.popleft()
                self._send(worker, batch, message)
        self.want_source = False
        while (worker := self._free_worker(0)) is not None:
            taken = self._take_batch()
            if taken is None:
                return
            self._send(worker, *taken)

    def _free_worker(self, stage: int) -> _Worker | None:
        """An idle worker of ``stage``, else one with a single batch (its reader thread
        takes a second one in at once: see ``_stage._read``), else ``None``."""
        best: _Worker | None = None
        for worker in self.by_stage[stage]:
            held = len(worker.held)
            if held == 0:
                return worker
            if held == 1 and best is None:
                best = worker
        return best

    def _take_batch(self) -> tuple[int, frames.Parts] | None:
        in_flight = self.taken - self.released
        room = self._cap() - in_flight
        limit = min(self.batch_size, room)
        if limit <= 0:
            return None
        if (
            self.maxsize is None
            and self.bytes_in_flight >= BYTES_IN_FLIGHT
            and in_flight >= MIN_IN_FLIGHT
        ):
            return None  # the byte budget is spent; a batch coming back frees it
        start = self.taken
        items: Sequence[Any]
        if self.sequence is not None:
            items = self.sequence[start : start + limit]
            if not items:
                return None
        else:
            chunks = self.source_chunks
            self.want_source = True  # before looking: either we see its chunk or it wakes us
            if not chunks:
                return None
            self.want_source = False
            items = chunks.popleft()
            while chunks and len(items) + len(chunks[0]) <= limit:
                items += chunks.popleft()
        count = len(items)
        number = self.next_batch
        try:
            message = frames.encode(items, TASK, number, count)
        except Exception as exc:
            error = self._unpicklable_source_item(items, start, exc)
            raise error from error.__cause__
        self.next_batch += 1
        self.taken += count
        self.batch_span[number] = (start, count)
        self.counts[0].items_in += count
        nbytes = frames.size(message)
        self.batch_bytes[number] = nbytes
        self.bytes_in_flight += nbytes
        self.item_bytes = nbytes // count
        self._resize(nbytes, count)
        if self.thread_waiting:
            with self.budget:
                self.budget.notify()
        return number, message

    def _resize(self, nbytes: int, count: int) -> None:
        """Size the next batch: ~BATCH_BYTES of pickled items and ~BATCH_SECONDS of work in
        the slowest stage, doubling from one item until both are measured; never more than
        a share of ``maxsize`` that leaves work for every first-stage worker."""
        by_bytes = BATCH_BYTES // max(1, nbytes // count)
        slowest = 0.0  # nanoseconds per item in the slowest stage so far
        for counts in self.counts:
            if counts.items_in and counts.busy:
                slowest = max(slowest, counts.busy / counts.items_in)
        by_time = int(BATCH_SECONDS * 1e9 / slowest) if slowest else 2 * self.batch_size
        size = min(MAX_BATCH, by_bytes, by_time, 2 * self.batch_size)
        if self.maxsize is not None:
            size = min(size, self.maxsize // (2 * len(self.by_stage[0])))
        self.batch_size = max(1, size)

    def _unpicklable_source_item(
        self, items: Sequence[Any], start: int, exc: Exception
    ) -> PipelineError:
        found = locate_unpicklable(items)
        position, cause = found if found is not None else (0, exc)
        index = start + position
        serialization = SerializationError(
            f"item {index} of the source cannot be pickled: {cause}",
            what="argument",
            item_index=index,
        )
        serialization.__cause__ = cause
        error = PipelineError(
            f"item {index} of the pipeline's source cannot be sent to a worker: {cause}",
            stage="source",
            item=items[position],
            item_index=index,
        )
        error.__cause__ = serialization
        return error

    def _send(self, worker: _Worker, batch: int, message: frames.Parts) -> None:
        worker.held.append(batch)
        if _fuzz.ENABLED:
            _fuzz.point("router.before_send")
        try:
            self.writer.send(worker.conn, message)
        except OSError:
            leave_if_exiting()  # killed at interpreter exit (_lifecycle._quiet_exit): quietly
            # it died: its sentinel says how; wait a moment for the exit to be visible
            wait_exited([worker.process], time.monotonic() + 1.0)  # exitcode is known
            error = self._crashed(worker)
            raise error from error.__cause__

    def _poller(self) -> select.poll:
        """One poll object for the whole run: every pipe, every sentinel, the wake-up pipe.

        (``multiprocessing.connection.wait`` would build and fill a new selector on every
        call, which costs more than routing a small batch.)
        """
        if self.poll is None:
            self.poll = select.poll()
            fds = [w.conn.fileno() for w in self.workers]
            fds += [w.process.sentinel for w in self.workers]
            if self.thread is not None:
                fds.append(self.wakeup.fd)
            for fd in fds:
                self.poll.register(fd, select.POLLIN)
        return self.poll

    def _wait_and_receive(self) -> None:
        poller = self._poller()
        began = time.perf_counter()
        with waiting_on_children():
            ready = {fd for fd, _ in poller.poll(None if self.stall_timeout is None else 250)}
        self.consumer_waiting += time.perf_counter() - began
        if self.stall_timeout is not None:
            self._check_stall(bool(ready))
        if self.wakeup.fd in ready:
            self.wakeup.drain()
        if _fuzz.ENABLED:
            _fuzz.point("router.before_receive")  # a worker may die or send more meanwhile
        dead: list[_Worker] = []
        for worker in self.workers:
            if worker.conn.fileno() in ready:
                try:
                    while True:
                        self._receive(worker, frames.recv(worker.conn))
                        if not worker.held or not worker.conn.poll():
                            break
                except (EOFError, OSError):
                    dead.append(worker)
            elif worker.process.sentinel in ready:
                dead.append(worker)
        for worker in dead:
            leave_if_exiting()  # killed at interpreter exit (_lifecycle._quiet_exit): quietly
            if worker.conn.poll() if not worker.conn.closed else False:
                with contextlib.suppress(EOFError, OSError):
                    self._receive(worker, frames.recv(worker.conn))
            wait_exited([worker.process], time.monotonic() + 1.0)  # exitcode is known
            raise self._crashed(worker)

    def _receive(self, worker: _Worker, message: frames.Parts) -> None:
        kind, batch, n, busy, waiting = frames.header(message)
        if kind == ERROR:
            raise self._stage_error(worker, batch, n, message)
        worker.held.remove(batch)
        stage = worker.stage
        counts = self.counts[stage]
        counts.items_out += n
        counts.busy += busy
        counts.waiting += waiting
        nbytes = frames.size(message)
        grown = nbytes - self.batch_bytes.get(batch, nbytes)
        if grown > 0:  # a stage's outputs larger than its inputs weigh what they weigh
            self.batch_bytes[batch] = nbytes
            self.bytes_in_flight += grown
        if stage + 1 < len(self.stages) and n > 0:
            self.counts[stage + 1].items_in += n
            self.pending[stage + 1].append((batch, message))
            return
        if n == 0:
            self._deliver(batch, [])
        else:
            self._deliver(batch, frames.decode(message))

    def _deliver(self, batch: int, results: list[Any]) -> None:
        if not self.ordered:
            self._hand_out(batch, results)
            return
        self.ready[batch] = results
        while self.next_out in self.ready:
            number = self.next_out
            self.next_out += 1
            self._hand_out(number, self.ready.pop(number))

    def _hand_out(self, batch: int, results: list[Any]) -> None:
        _, count = self.batch_span.pop(batch)
        nbytes = self.batch_bytes.pop(batch, 0)
        self.handed += count
        if results:
            self.outputs.append(results)
            self.held_counts.append(count)
        if self.streaming and results:
            self.held_bytes.append(nbytes)
        else:
            self._release(count, nbytes)

    def release(self, count: int) -> None:
        """The consumer is done with the next batch it took (``count`` source items' results):
        it leaves the budget.

        A streaming consumer releases a batch when it moves on to the next one, so that what
        it holds counts against ``maxsize`` (and the byte budget) too.
        """
        self._release(count, self.held_bytes.popleft() if self.held_bytes else 0)

    def _release(self, count: int, nbytes: int) -> None:
        self.released += count
        self.bytes_in_flight -= nbytes
        if self.thread_waiting:
            with self.budget:
                self.budget.notify()

    # -------------------------------------------------------------- errors

    def _describe_batch(self, batch: int, stage: int) -> str:
        start, count = self.batch_span.get(batch, (0, 0))
        which = (
            f"source item {start}" if count == 1 else f"source items {start}..{start + count - 1}"
        )
        return which if stage == 0 else f"the outputs of {which}"

    def _stage_error(
        self, worker: _Worker, batch: int, position: int, message: frames.Parts
    ) -> PipelineError:
        record, shown, item_bytes = frames.decode(message)
        stage = self.stages[worker.stage]
        where = (
            f"in pipeline stage {stage.name!r} (worker pid {worker.process.pid}) on item {shown}"
        )
        cause = rebuild_exception(record, where=where)
        item: object = None
        if item_bytes is not None:
            with contextlib.suppress(Exception):
                item = pickle.loads(item_bytes)
        index = None
        if worker.stage == 0:
            index = self.batch_span.get(batch, (0, 0))[0] + position
        error = PipelineError(
            f"stage {stage.name!r} failed on item {shown}: {record.type_name}: {record.message}",
            stage=stage.name,
            item=item,
            item_index=index,
        )
        error.__cause__ = cause
        return error

    def _crashed(self, worker: _Worker) -> PipelineError:
        stage = self.stages[worker.stage]
        process = worker.process
        code = process.exitcode
        holding = (
            "while working on " + self._describe_batch(worker.held[0], worker.stage)
            if worker.held
            else "while idle"
        )
        crash = WorkerCrashedError(
            f"a worker of pipeline stage {stage.name!r} (pid {process.pid}) "
            f"{describe_exit(code)} {holding}",
            item_index=None,
            pid=process.pid,
            exitcode=code,
            signal=signal_name(code),
        )
        error = PipelineError(
            f"stage {stage.name!r}: worker pid {process.pid} {describe_exit(code)} {holding}",
            stage=stage.name,
        )
        error.__cause__ = crash
        return error

    def _check_stall(self, moving: bool) -> None:
        """``stall_timeout``: no batch came back from any stage for that long, while
        workers hold batches: report what each busy worker is doing (once a period)."""
        now = time.monotonic()
        busy = [w for w in self.workers if w.held]
        if moving or not busy:
            self.last_moved = now
            self.next_stall_report = now + (self.stall_timeout or 0.0)
            return
        if now < self.next_stall_report:
            return
        from parallelkit._observe.stalls import (  # noqa: PLC0415
            StallReport,
            WorkerStack,
            dump_stack,
            to_stderr,
        )

        stacks = []
        for worker in busy:
            batch = worker.held[0]
            stage = self.stages[worker.stage]
            first, count = self.batch_span.get(batch, (0, 0))
            stack, note = dump_stack(worker.process.pid)
            stacks.append(
                WorkerStack(
                    pid=worker.process.pid,
                    item_index=first if worker.stage == 0 and count == 1 else None,
                    doing=f"stage {stage.name!r}, on {self._describe_batch(batch, worker.stage)}",
                    stack=stack,
                    note=note,
                )
            )
        report = StallReport(now - self.last_moved, self.handed, tuple(stacks))
        self.next_stall_report = time.monotonic() + (self.stall_timeout or 0.0)
        if self.on_stall is None:
            to_stderr(report)
        else:
            self.on_stall(report)

    # -------------------------------------------------------------- summary

    def report_progress(self) -> None:
        """Tell ``progress=`` how far the run has got (in the consumer's thread)."""
        assert self.progress is not None
        self.progress.update(
            self.handed,
            tuple(
                StageProgress(stage.name, c.items_in, c.items_out)
                for stage, c in zip(self.stages, self.counts, strict=True)
            ),
        )

    def stats(self) -> PipelineStats:
        return PipelineStats(
            stages=tuple(
                StageStats(
                    name=stage.name,
                    workers=stage.max_workers,
                    items_in=c.items_in,
                    items_out=c.items_out,
                    busy_seconds=c.busy / 1e9,
                    waiting_seconds=c.waiting / 1e9,
                )
                for stage, c in zip(self.stages, self.counts, strict=True)
            ),
            source_items=self.pulled if self.sequence is None else self.taken,
            items_out=self.items_out - self.unread(),
            seconds=time.perf_counter() - self.started,
            consumer_waiting_seconds=self.consumer_waiting,
        )


def _none() -> int:
    return 0


def _kill(workers: list[_Worker], writer: frames.Writer, wakeup: _WakeUp) -> None:
    """Kill every worker at once and close what the run holds (also the GC backstop)."""
    stop_processes([w.process for w in workers], join_timeout=0, what="pipeline stage")
    writer.close()  # its writes to the dead workers fail at once
    for worker in workers:
        worker.conn.close()
    wakeup.close()


class _WakeUp:
    """A pipe the source thread writes a byte to, to wake the router from ``poll``.

    Closed under a lock, so that a source thread that returns from the user's ``next()``
    after the run ended never writes to a descriptor number the process has reused.
    """

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending
                    os.write(self._write_fd, b"\0")

    def drain(self) -> None:
        with self._lock:
            if not self._closed:
                os.read(self.fd, 4096)  # poll said it is readable: this does not block

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
                os.close(self._write_fd)
