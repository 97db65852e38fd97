"""The pipeline router: one run of a pipeline, routing batches between its stages.

:mod:`parallelkit._pipeline.builder` (the public ``Pipeline``) runs a pipeline with a ``Run``.

::

    source ─▶ router ─▶ stage 1 workers ─▶ router ─▶ stage 2 workers ─▶ router ─▶ consumer
                 (the router is the consumer's own thread; one duplex stream per worker)

Every worker of every stage has its own duplex stream to the parent, as a pool worker does,
and the parent routes *batches* between stages: it forwards a finished batch's bytes to a
worker of the next stage without unpickling them.  Compared with workers sharing one
``multiprocessing.Queue`` per stage, this means:

- no shared lock a killed worker can leave held, and no feeder thread that can swallow an
  unpicklable item: the parent knows which batch every worker holds, so a crash names the
  stage, the worker and the source items involved, as soon as its sentinel fires;
- backpressure is exact: at most ``maxsize`` source items are between the source and the
  consumer (taken from the source and not yet handed out), however slow any stage or the
  consumer is; the source is read by a helper thread that stops when that budget is spent;
  without ``maxsize`` the budget counts bytes too, so that large items are not multiplied
  by stages and workers;
- batching adapts: a batch holds whatever the source has ready, up to a size set by the
  pickled bytes per item and the stages' speed, so a fast source moves thousands of small
  items per message while a slow trickle is sent one item at a time, at once;
- order is kept with a reorder buffer on batch numbers (a batch's outputs keep its number
  through every stage), so ``ordered=False`` only changes when results are handed out.

The router runs only while the consumer waits for results (``run()``, or ``next()`` on
the iterator): a consumer that stops asking stops the pipeline once the budget is spent.

``Run`` coordinates the parts, each of which owns its own state and resources:

- :mod:`~parallelkit._pipeline.processes` -- the stage processes, their streams and the
  poll object; :mod:`~parallelkit._pipeline.messages` -- what travels on the streams;
- :mod:`~parallelkit._pipeline.source` -- the source thread and its wake-up pipe;
- :mod:`~parallelkit._pipeline.budget` -- the items and bytes in flight, batch sizes;
- :mod:`~parallelkit._pipeline.batches` -- batch numbers, batches between stages, the
  reorder buffer and the consumer's outputs;
- :mod:`~parallelkit._pipeline.stats` -- per-stage counts, statistics, stall reports;
  :mod:`~parallelkit._pipeline.failures` -- the errors.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from parallelkit._pipeline import messages
from parallelkit._pipeline.batches import Batches
from parallelkit._pipeline.budget import Budget
from parallelkit._pipeline.failures import (
    source_failed,
    stage_failed,
    startup_failed,
    unpicklable_source_item,
    worker_crashed,
)
from parallelkit._pipeline.messages import ERROR, STARTUP_FAILED, TASK, Message
from parallelkit._pipeline.processes import Stage, StageProcesses, StageWorker, kill
from parallelkit._pipeline.source import Source
from parallelkit._pipeline.stats import PipelineStats, StageCounts
from parallelkit._proc import logs
from parallelkit._util import fuzz as _fuzz
from parallelkit._util.types import StartMethod
from parallelkit._wire.arena import ResultReader, ResultWriter
from parallelkit._wire.shm import Segment
from parallelkit.errors import PipelineError

if TYPE_CHECKING:
    from parallelkit._observe.progress import PipelineProgress
    from parallelkit._pipeline.stats import Busy, StallWatch

__all__ = ("Run",)

STALL_POLL_MS: Final = 250  # milliseconds: with stall_timeout, look for a stall this often


class Run:
    """One execution of a pipeline: the router loop over its parts (see the module)."""

    def __init__(
        self,
        source: Iterable[Any],
        stages: Sequence[Stage],
        start_method: StartMethod,
        maxsize: int | None,
        *,
        forward_logs: bool = True,
    ) -> None:
        self.stages = stages
        self.processes = StageProcesses(stages, start_method, forward_logs=forward_logs)
        self.processes.on_records = self._records
        self.budget = Budget(maxsize, sum(s.max_workers for s in stages), stages[0].max_workers)
        self.source = Source(source, self.budget)
        self.batches = Batches(len(stages), all(s.ordered for s in stages), self.budget)
        self.counts = [StageCounts(s.name, s.max_workers) for s in stages]
        self.items_out = 0  # items the consumer took (in lists from outputs) ...
        self.unread: Callable[[], int] = _none  # ... less those it has not read yet
        self.started = time.perf_counter()
        self.consumer_waiting = 0.0
        self.closed = False
        self.finished = False
        self.error: BaseException | None = None
        self.progress: PipelineProgress | None = None  # progress=: reported by the router
        self.stall: StallWatch | None = None  # stall_timeout=
        # the router's shared memory: source batches' large buffers out, the last stage's in
        self.writer = messages.shared_writer(heir=False)
        self.reader = ResultReader()
        processes = self.processes
        self.finalizer = weakref.finalize(
            self, _kill, processes.workers, processes.ledgers, self.source, self.writer, self.reader
        )

    # -------------------------------------------------------------- the consumer's side

    @property
    def outputs(self) -> deque[list[Any]]:
        """Lists of results ready for the consumer, in the order to hand them out."""
        return self.batches.outputs

    @property
    def held_counts(self) -> deque[int]:
        """The source items behind each list in :attr:`outputs`."""
        return self.batches.held_counts

    @property
    def streaming(self) -> bool:
        """True: the consumer releases the budget itself (:meth:`release`)."""
        return self.batches.streaming

    @streaming.setter
    def streaming(self, value: bool) -> None:
        self.batches.streaming = value

    def release(self, count: int) -> None:
        """The consumer is done with the next batch it took (``count`` source items' results):
        it leaves the budget.

        A streaming consumer releases a batch when it moves on to the next one, so that what
        it holds counts against ``maxsize`` (and the byte budget) too.
        """
        self.budget.release(count)

    # -------------------------------------------------------------- start and stop

    def start(self) -> None:
        payloads = self.processes.payloads()  # a function that cannot be sent: no process
        try:
            self.processes.start(payloads)
        except BaseException:
            self.abort()
            raise
        self.source.start()

    def abort(self) -> None:
        """Stop everything at once (cancel, error, Ctrl-C); idempotent."""
        if self.closed:
            return
        self.closed = True
        if _fuzz.ENABLED:
            _fuzz.point("router.abort")  # the source thread may be inside next() or waking us
        self.source.stop()
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
        self.processes.say_stop()
        if _fuzz.ENABLED:
            _fuzz.point("router.finish_stopped")  # the workers are exiting
        if self.progress is not None:
            self.report_progress()
            self.progress.close()
        self.processes.reap()
        self.source.stop()
        self.finalizer()

    # -------------------------------------------------------------- the router

    def drive(self, *, until_output: bool) -> None:
        """Route batches until the run ends (or, with ``until_output``, results are ready)."""
        if self.closed:
            return  # stopped (finished, failed or cancelled): nothing left to route
        try:
            while not self.finished:
                if until_output and self.batches.outputs:
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
        if not self.source.exhausted(self.budget.taken):
            return False
        if self.batches.handed < self.budget.taken:
            return False
        if self.source.error is not None:
            raise source_failed(self.source.error)
        return True

    def _dispatch(self) -> None:
        processes = self.processes
        # later stages first: finishing work frees the budget sooner
        for index in range(len(self.stages) - 1, -1, -1):
            pending = self.batches.pending[index]
            while pending:
                worker = processes.free_worker(index)
                if worker is None:
                    break
                batch, message = pending.popleft()
                processes.send(worker, batch, message)
        self.source.wanted = False
        while (worker := processes.free_worker(0)) is not None:
            taken = self._take_batch()
            if taken is None:
                return
            processes.send(worker, *taken)  # a dead worker: its sentinel says so

    def _take_batch(self) -> tuple[int, Message] | None:
        budget = self.budget
        limit = budget.next_limit()
        if limit <= 0:
            return None
        start = budget.taken
        items = self.source.take(start, limit)
        if items is None:
            return None
        count = len(items)
        try:
            message = messages.encode(
                items, TASK, self.batches.next_batch, count, writer=self.writer
            )
        except Exception as exc:
            error = unpicklable_source_item(items, start, exc)
            raise error from error.__cause__
        number = self.batches.add(start, count)
        self.counts[0].items_in += count
        budget.admit(number, count, message.size(), self.counts)
        return number, message

    def _wait_and_receive(self) -> None:
        began = time.perf_counter()
        wakeup_fd = self.source.wakeup_fd
        ready = self.processes.wait(None if self.stall is None else STALL_POLL_MS, wakeup_fd)
        self.consumer_waiting += time.perf_counter() - began
        if self.stall is not None:
            self.stall.check(bool(ready), self._busy, self.batches.handed)
        if wakeup_fd in ready:
            self.source.wakeup.drain()
        if _fuzz.ENABLED:
            _fuzz.point("router.before_receive")  # a worker may die or send more meanwhile
        for worker in self.processes.receive(ready, self._receive):
            self.processes.receive_last(worker, self._receive)
            raise self._crashed(worker)

    def _records(self, worker: StageWorker, records: list[dict[str, Any]]) -> None:
        """Log records of ``worker``: those of the first stage name their source item."""
        for fields in records:
            batch = fields.pop(logs.BATCH, None)
            position = fields.pop(logs.POSITION, 0)
            span = self.batches.span.get(batch) if batch is not None else None
            if worker.stage == 0 and span is not None:
                fields["item_index"] = span[0] + position
        logs.handle(records)

    def _receive(self, worker: StageWorker, message: Message) -> None:
        kind, batch = message.kind, message.batch
        n, busy, waiting = messages.fields(message)
        if kind == ERROR:
            stage = worker.stage
            index = self.batches.first_item(batch)[0] + n if stage == 0 else None
            raise stage_failed(self.stages[stage].name, worker.process.pid, index, message)
        if kind == STARTUP_FAILED:
            raise startup_failed(self.stages[worker.stage].name, worker.process.pid, message)
        worker.held.remove(batch)
        stage = worker.stage
        counts = self.counts[stage]
        counts.items_out += n
        counts.busy += busy
        counts.waiting += waiting
        self.budget.grow(batch, message.size())
        if stage + 1 < len(self.stages) and n > 0:
            self.counts[stage + 1].items_in += n
            self.batches.pending[stage + 1].append((batch, message))
            return
        self.batches.deliver(batch, messages.decode(message, self.reader) if n else [])

    # -------------------------------------------------------------- errors and reports

    def _crashed(self, worker: StageWorker) -> PipelineError:
        holding = (
            "while working on " + self.batches.describe(worker.held[0], worker.stage)
            if worker.held
            else "while idle"
        )
        return worker_crashed(self.stages[worker.stage].name, worker.process, holding)

    def _busy(self) -> list[Busy]:
        """The workers holding a batch, for a stall report."""
        busy: list[Busy] = []
        for worker in self.processes.workers:
            if worker.held:
                batch = worker.held[0]
                first, count = self.batches.first_item(batch)
                busy.append(
                    (
                        worker.process.pid,
                        first if worker.stage == 0 and count == 1 else None,
                        f"stage {self.stages[worker.stage].name!r}, on "
                        f"{self.batches.describe(batch, worker.stage)}",
                    )
                )
        return busy

    def report_progress(self) -> None:
        """Tell ``progress=`` how far the run has got (in the consumer's thread)."""
        assert self.progress is not None
        self.progress.update(self.batches.handed, tuple(c.progress() for c in self.counts))

    def stats(self) -> PipelineStats:
        return PipelineStats(
            stages=tuple(c.stats() for c in self.counts),
            source_items=self.source.items_read(self.budget.taken),
            items_out=self.items_out - self.unread(),
            seconds=time.perf_counter() - self.started,
            consumer_waiting_seconds=self.consumer_waiting,
        )


def _none() -> int:
    return 0


def _kill(
    workers: list[StageWorker],
    ledgers: list[Segment],
    source: Source,
    writer: ResultWriter,
    reader: ResultReader,
) -> None:
    """Kill every worker at once and close what the run holds (also the GC backstop):
    the workers' segments and then the router's are unlinked (see ``messages``)."""
    kill(workers, ledgers)
    source.close()
    writer.close(unlink=True)
    reader.close()
