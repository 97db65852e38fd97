"""Insights into a parallel map: per-worker statistics and stall diagnosis.

``MapStats`` summarises who did what: for each worker, the items it ran and the seconds it
was busy (measured in the worker, around the user's function) or idle.  The process engine
keeps these counts per worker (``_engine._Worker.busy`` / ``tasks_done``); the other
backends per place a chunk ran (``ChunkEngine.tally``).

Stall diagnosis (``stall_timeout=``) is a *watcher* the engine calls after every step
(at least every ``WATCH_POLL`` seconds while a thread waits for results)::

    parent: no item of this job finished and no worker moved to another item for
            stall_timeout s ──SIGUSR1──▶ each busy worker: faulthandler (armed at start-up,
            see ``child.arm_stack_dump``) writes every thread's stack into an anonymous
            in-memory file ──/proc/<pid>/fd/<fd>──▶ parent reads it ──▶ StallReport
            ──▶ stderr, or the ``on_stall`` callback (outside the engine's lock)

faulthandler dumps from its C signal handler without waiting for the interpreter, so the
stack is there for a worker blocked in a C call (``time.sleep``, a lock, I/O) and for one
spinning in Python or in C code that holds the GIL.  Not covered: a stopped process
(SIGSTOP) or one in uninterruptible sleep, which cannot run a signal handler (the report
then says that the stack did not arrive), and platforms without ``/proc`` and
``memfd_create`` (no stacks; the items are still named).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Final

from parallelkit._proc import child, slots

if TYPE_CHECKING:
    from parallelkit._map.backends.choose import ChunkEngine
    from parallelkit._map.engine import Engine, _Worker
    from parallelkit._map.job import Job

__all__ = ("MapStats", "StallReport", "WorkerStack", "WorkerStats")

DUMP_WAIT: Final = 1.0  # seconds a worker gets to write its stacks
DUMP_SETTLE: Final = 0.05  # ... the dump is complete once the file stops growing this long


# ------------------------------------------------------------------ statistics


def text_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """``rows`` (the first one a header) as left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """What one worker did.

    Attributes:
        name: how the worker is named in errors (``"pid 1234"``, ``"thread 'T-1'"``, ...).
        pid: its process id, or ``None`` for a thread or a remote worker.
        items: items it ran (finished, failed or not).
        busy_seconds: time it spent running items, measured where they ran.
        idle_seconds: the rest of its life during the run (starting, waiting for work,
            moving chunks through pipes).
    """

    name: str
    pid: int | None
    items: int
    busy_seconds: float
    idle_seconds: float

    @property
    def utilisation(self) -> float:
        """Busy time as a share of busy and idle time (0 to 1)."""
        total = self.busy_seconds + self.idle_seconds
        return self.busy_seconds / total if total > 0 else 0.0


@dataclass(frozen=True, slots=True)
class MapStats:
    """The per-worker summary of a parallel map (or of a ``WorkerPool``'s life so far).

    Reached through ``ResultIterator.stats``, ``WorkerPool.stats`` and the ``on_stats=``
    callback of :func:`~parallelkit.run_parallel`.

    Attributes:
        workers: one :class:`WorkerStats` per worker that ran (including workers that
            were replaced), in the order they started.
        items: items run, over all workers.
        seconds: wall time.
    """

    workers: tuple[WorkerStats, ...]
    items: int
    seconds: float

    @property
    def busy_seconds(self) -> float:
        """Busy time summed over the workers."""
        return sum(w.busy_seconds for w in self.workers)

    @property
    def utilisation(self) -> float:
        """Busy time as a share of the workers' busy and idle time (0 to 1)."""
        total = self.busy_seconds + sum(w.idle_seconds for w in self.workers)
        return self.busy_seconds / total if total > 0 else 0.0

    def __str__(self) -> str:
        rows = [("worker", "items", "busy s", "idle s", "busy %")]
        for w in self.workers:
            rows.append(
                (
                    w.name,
                    str(w.items),
                    f"{w.busy_seconds:.3f}",
                    f"{w.idle_seconds:.3f}",
                    f"{100 * w.utilisation:.0f}",
                )
            )
        lines = text_table(rows)
        lines.append(
            f"{self.items} items on {len(self.workers)} workers in {self.seconds:.3f} s "
            f"({100 * self.utilisation:.0f}% busy)"
        )
        return "\n".join(lines)


class StatsBaseline:
    """What an engine's workers had done when a call started (its stats count from there)."""

    __slots__ = ("began", "items", "retired")

    def __init__(self, engine: Engine | ChunkEngine | None = None) -> None:
        from parallelkit._map.engine import Engine  # noqa: PLC0415 - the engine imports nothing from here

        self.began = time.monotonic()
        self.items: dict[int | None, tuple[int, float]] = {}
        self.retired = 0
        if isinstance(engine, Engine):
            self.retired = len(engine.retired)
            for w in engine.workers:
                self.items[w.pid] = (w.tasks_done, w.busy)


def engine_stats(engine: Engine | ChunkEngine, baseline: StatsBaseline) -> MapStats:
    """The stats of ``engine``'s workers since ``baseline``."""
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


# ------------------------------------------------------------------ stall diagnosis


@dataclass(frozen=True, slots=True)
class WorkerStack:
    """One busy worker, as a stall report shows it.

    Attributes:
        pid: the worker's process id.
        item_index: the index (in the input) of the item it is running, or ``None`` if
            it is between items (receiving a chunk or sending its results).
        doing: what it is doing, in words (``"running item 17"``).
        stack: every thread's Python stack, as :mod:`faulthandler` prints it (most recent
            call first); empty when it could not be had (see :attr:`note`).
        note: why ``stack`` is empty, else ``""``.
    """

    pid: int | None
    item_index: int | None
    doing: str
    stack: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class StallReport:
    """What the workers were doing when a map stalled (``on_stall=`` receives it).

    Attributes:
        seconds: how long no item had finished and no worker had moved to another item.
        items_done: items finished so far.
        workers: one :class:`WorkerStack` per worker busy with this map.
    """

    seconds: float
    items_done: int
    workers: tuple[WorkerStack, ...]

    def __str__(self) -> str:
        lines = [
            f"parallelkit: no item has finished for {self.seconds:.1f} s "
            f"({self.items_done} done); what each busy worker is doing:"
        ]
        for w in self.workers:
            lines.append(f"--- worker pid {w.pid}: {w.doing}")
            if w.stack:
                lines.append(w.stack.rstrip("\n"))
            else:
                lines.append(f"(no stack: {w.note})")
        return "\n".join(lines) + "\n"


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
        self.stall_timeout = stall_timeout
        self.on_stall = on_stall
        self.done = done
        self.key: object = None
        self.since = time.monotonic()  # the last sign of progress
        self.next_report = self.since + stall_timeout
        self.offsets: dict[tuple[int | None, int], int] = {}

    def _busy(self) -> list[tuple[_Worker, int, int]]:
        """(worker, chunk start, position word) for each worker running this job."""
        engine = self.engine
        out: list[tuple[_Worker, int, int]] = []
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
        if key != self.key or not busy:
            self.key = key
            self.since = now
            self.next_report = now + self.stall_timeout
            return
        if now < self.next_report:
            return
        report = StallReport(
            seconds=now - self.since,
            items_done=self.done(),
            workers=tuple(self._describe(w, start, pos) for w, start, pos in busy),
        )
        self.next_report = time.monotonic() + self.stall_timeout  # at most one per period
        on_stall = self.on_stall
        if on_stall is None:
            self.engine.defer(lambda: to_stderr(report))
        else:
            self.engine.defer(lambda: on_stall(report))

    def _describe(self, w: _Worker, start: int, pos: int) -> WorkerStack:
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


def _find_stack_fd(pid: int) -> int:
    """The fd of ``pid``'s stack-dump file (``child.arm_stack_dump``), or -1."""
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if child.STACK_FILE_NAME in os.readlink(f"/proc/{pid}/fd/{name}"):
                    return int(name)
    except OSError:
        pass
    return -1


def dump_stack(pid: int | None, fd: int | None = None) -> tuple[str, str]:
    """Have worker ``pid`` dump every thread's stack; ``(stack, "")`` or ``("", why not)``.

    ``fd``: its stack-dump file descriptor if known, else it is looked up.
    """
    if pid is None:
        return "", "the worker has no process id"
    if fd is None:
        fd = _find_stack_fd(pid)
    if fd < 0:
        if not os.path.isdir(f"/proc/{pid}/fd"):
            return "", "stack dumps need Linux (/proc and memfd_create)"
        return "", "the worker has not armed its stack dump yet"
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if child.STACK_FILE_NAME not in os.readlink(path):
            return "", "the worker has not armed its stack dump yet"
        with open(path, "rb") as f:
            offset = f.seek(0, os.SEEK_END)
            os.kill(pid, signal.SIGUSR1)
            text = _read_dump(f, offset)
    except OSError as exc:
        return "", f"could not read it ({type(exc).__name__}: {exc})"
    if not text:
        return "", f"the worker did not write it within {DUMP_WAIT:g} s (stopped?)"
    return text, ""


def _read_dump(f: BinaryIO, offset: int) -> str:
    """Read what the worker appends after ``offset`` until it stops growing."""
    deadline = time.monotonic() + DUMP_WAIT
    size = offset
    stable_since: float | None = None
    while True:
        now = time.monotonic()
        new = os.fstat(f.fileno()).st_size
        if new > size:
            size = new
            stable_since = now
        elif stable_since is not None and now - stable_since >= DUMP_SETTLE:
            break
        if now >= deadline:
            break
        time.sleep(0.005)
    if size == offset:
        return ""
    f.seek(offset)
    return f.read(size - offset).decode("utf-8", "replace")


def to_stderr(report: StallReport) -> None:
    """Where a stall report goes without ``on_stall``."""
    stream = sys.stderr
    if stream is not None:
        stream.write(str(report))
        stream.flush()
