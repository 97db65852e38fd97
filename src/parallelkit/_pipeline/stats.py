"""What a pipeline run reports: per-stage counts and statistics, and stall reports.

``StageCounts`` are kept by the router (the consumer's thread) as batches come back;
``PipelineStats`` / ``StageStats`` are the public summary built from them, and by
:mod:`parallelkit._pipeline.backends` for pipelines on other backends.  ``StallWatch``
decides when a run has stalled and sends the report (``stall_timeout=``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from parallelkit._observe.progress import StageProgress
from parallelkit._observe.stalls import StallClock
from parallelkit._observe.table import text_table

if TYPE_CHECKING:
    from parallelkit._observe.stalls import StallReport

__all__ = ("PipelineStats", "StageCounts", "StageStats", "StallWatch")


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


class StageCounts:
    """One stage's running totals (items in and out, its workers' busy and waiting ns)."""

    __slots__ = ("busy", "items_in", "items_out", "name", "waiting", "workers")

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers
        self.items_in = 0
        self.items_out = 0
        self.busy = 0
        self.waiting = 0

    def stats(self) -> StageStats:
        return StageStats(
            name=self.name,
            workers=self.workers,
            items_in=self.items_in,
            items_out=self.items_out,
            busy_seconds=self.busy / 1e9,
            waiting_seconds=self.waiting / 1e9,
        )

    def progress(self) -> StageProgress:
        return StageProgress(self.name, self.items_in, self.items_out)


# (pid, the source item it is on when that is one item, what it is doing in words)
Busy = tuple[int | None, int | None, str]


class StallWatch:
    """``stall_timeout``: when no batch came back from any stage for that long while
    workers hold batches, report what each busy worker is doing (once a period)."""

    def __init__(self, timeout: float, on_stall: Callable[[StallReport], object] | None) -> None:
        self.on_stall = on_stall
        self.clock = StallClock(timeout)

    def check(self, moving: bool, busy: Callable[[], Sequence[Busy]], done: int) -> None:
        """After each wait: ``moving`` if something came back; ``busy()`` lists the busy
        workers (empty: nothing can stall); ``done`` is the source items handed out."""
        now = time.monotonic()
        clock = self.clock
        workers = busy() if not moving else ()
        if moving or not workers:
            clock.moved(now)
            return
        if not clock.due(now):
            return
        from parallelkit._observe.stalls import StallReport, WorkerStack, dump_stack, to_stderr  # noqa: PLC0415

        stacks = []
        for pid, item_index, doing in workers:
            stack, note = dump_stack(pid)
            stacks.append(
                WorkerStack(pid=pid, item_index=item_index, doing=doing, stack=stack, note=note)
            )
        report = StallReport(now - clock.since, done, tuple(stacks))
        clock.reported()
        if self.on_stall is None:
            to_stderr(report)
        else:
            self.on_stall(report)
