"""The map capability's statistics and stall watch, over its engines.

``engine_stats`` fills a :class:`~parallelkit._observe.stats.MapStats` with what each worker
did since a call began: the process engine keeps these counts per worker
(``_map.handle.WorkerHandle.busy`` / ``tasks_done``); the other backends per place a chunk ran
(``ChunkEngine.tally``).

Stall diagnosis (``stall_timeout=``) is a *watcher* the engine calls after every step
(at least every ``WATCH_POLL`` seconds while a thread waits for results)::

    parent: no item of this job finished and no worker moved to another item for
            stall_timeout s ──SIGUSR1──▶ each busy worker: faulthandler (armed at start-up,
            see ``child.arm_stack_dump``) writes every thread's stack into an anonymous
            in-memory file ──/proc/<pid>/fd/<fd>──▶ parent reads it ──▶ StallReport
            ──▶ stderr, or the ``on_stall`` callback (outside the engine's lock)

How the stacks are read, and what is not covered: :mod:`parallelkit._observe.stalls`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from parallelkit._observe.stalls import StallClock, StallReport, WorkerStack, dump_stack, to_stderr
from parallelkit._observe.stats import AutoChoice, MapStats, WorkerStats
from parallelkit._proc import slots

if TYPE_CHECKING:
    from parallelkit._map.backends.choose import ChunkEngine
    from parallelkit._map.engine import Engine
    from parallelkit._map.handle import WorkerHandle
    from parallelkit._map.job import Job

__all__ = ("StallWatch", "StatsBaseline", "engine_stats")


class StatsBaseline:
    """What an engine's workers had done when a call started (its stats count from there)."""

    __slots__ = ("began", "choice", "items", "probe", "retired")

    def __init__(
        self, engine: Engine | ChunkEngine | None = None, *, began: float | None = None
    ) -> None:
        from parallelkit._map.engine import Engine  # noqa: PLC0415 - the engine imports nothing from here

        self.began = time.monotonic() if began is None else began
        self.items: dict[int | None, tuple[int, float]] = {}
        self.retired = 0
        # backend="auto": what it chose, and (where, items, busy seconds) of what ran in
        # the caller before the engine (its probe, and a serial rest)
        self.choice: AutoChoice | None = None
        self.probe: list[tuple[str, int, float]] = []
        if isinstance(engine, Engine):
            self.retired = len(engine.retired)
            for w in engine.workers:
                self.items[w.pid] = (w.tasks_done, w.busy)


def engine_stats(engine: Engine | ChunkEngine, baseline: StatsBaseline) -> MapStats:
    """The stats of ``engine``'s workers since ``baseline`` (and of ``backend="auto"``'s
    probe, the first row, if it ran one)."""
    stats = _engine_stats(engine, baseline)
    if not baseline.probe and baseline.choice is None:
        return stats
    here = tuple(
        WorkerStats(
            name=where.removeprefix("in "),
            pid=None,
            items=items,
            busy_seconds=busy,
            idle_seconds=max(0.0, stats.seconds - busy),
        )
        for where, items, busy in baseline.probe
    )
    workers = (*here, *stats.workers)
    return MapStats(workers, sum(w.items for w in workers), stats.seconds, baseline.choice)


def _engine_stats(engine: Engine | ChunkEngine, baseline: StatsBaseline) -> MapStats:
    from parallelkit._map.engine import Engine  # noqa: PLC0415

    now = time.monotonic()
    wall = now - baseline.began
    if not isinstance(engine, Engine):  # another backend: per place chunks ran
        others = tuple(
            WorkerStats(
                name=where.removeprefix("in ").removeprefix("on "),
                pid=_pid_of(where),
                items=int(items),
                busy_seconds=busy,
                idle_seconds=max(0.0, wall - busy),
            )
            for where, (items, busy) in engine.tally.items()
        )
        return MapStats(others, sum(w.items for w in others), wall)
    rows = list(engine.retired[baseline.retired :])
    rows += [(w.pid, w.tasks_done, w.busy, now - w.born) for w in list(engine.workers)]
    workers: list[WorkerStats] = []
    for pid, items, total_busy, lifetime in rows:
        before_items, before_busy = baseline.items.get(pid, (0, 0.0))
        busy = total_busy - before_busy
        workers.append(
            WorkerStats(
                name=f"pid {pid}",
                pid=pid,
                items=items - before_items,
                busy_seconds=busy,
                idle_seconds=max(0.0, min(lifetime, wall) - busy),
            )
        )
    return MapStats(tuple(workers), sum(w.items for w in workers), wall)


def _pid_of(where: str) -> int | None:
    if where.startswith("in process pid "):
        with contextlib.suppress(ValueError):
            return int(where.removeprefix("in process pid "))
    return None


class StallWatch:
    """Watches one job on the process engine; a watcher (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        job: Job,
        stall_timeout: float,
        on_stall: Callable[[StallReport], object] | None,
        done: Callable[[], int],
    ) -> None:
        self.engine = engine
        self.job = job
        self.on_stall = on_stall
        self.done = done
        self.key: object = None
        self.clock = StallClock(stall_timeout)
        self.offsets: dict[tuple[int | None, int], int] = {}

    def _busy(self) -> list[tuple[WorkerHandle, int, int]]:
        """(worker, chunk start, position word) for each worker running this job."""
        engine = self.engine
        out: list[tuple[WorkerHandle, int, int]] = []
        for w in engine.workers:
            if w.chunks and w.chunks[0].job is self.job and not w.dead:
                pos = engine.words[w.slot * slots.SLOT_WORDS + slots.POS]
                out.append((w, w.chunks[0].start, pos))
        return out

    def __call__(self) -> None:
        """Called by the engine after each step, under its mutex."""
        now = time.monotonic()
        busy = self._busy()
        key = (self.done(), tuple((id(w), start, pos) for w, start, pos in busy))
        clock = self.clock
        if key != self.key or not busy:
            self.key = key
            clock.moved(now)
            return
        if not clock.due(now):
            return
        report = StallReport(
            seconds=now - clock.since,
            items_done=self.done(),
            workers=tuple(self._describe(w, start, pos) for w, start, pos in busy),
        )
        clock.reported()  # at most one per period
        on_stall = self.on_stall
        if on_stall is None:
            self.engine.defer(lambda: to_stderr(report))
        else:
            self.engine.defer(lambda: on_stall(report))

    def _describe(self, w: WorkerHandle, start: int, pos: int) -> WorkerStack:
        pid = w.pid
        index: int | None = None
        if pos == slots.POS_RECEIVING:
            doing = f"receiving the chunk that starts at item {start}"
        elif pos == slots.POS_SENDING:
            doing = f"sending the results of the chunk that starts at item {start}"
        elif pos == slots.POS_STARTING:
            doing = "starting (initializer)"
        elif pos == slots.POS_UNTRACKED:  # not with a stall timeout set (TRACKED), but be exact
            doing = f"running tiny items of the chunk that starts at item {start}"
        else:
            index = start + pos
            doing = f"running item {index}"
        if pos == slots.POS_STARTING:
            return WorkerStack(pid, index, doing, "", "its stack dump is not armed yet")
        fd = self.engine.words[w.slot * slots.SLOT_WORDS + slots.DUMP_FD]
        stack, note = dump_stack(pid, fd)
        return WorkerStack(pid, index, doing, stack, note)
