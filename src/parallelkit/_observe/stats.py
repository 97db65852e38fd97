"""Per-worker statistics of a parallel map: what each worker ran and how busy it was.

The records here are what users see (``MapStats``, ``WorkerStats``); the map capability
fills them from its engine (``parallelkit._map.stats``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from parallelkit._observe.table import text_table

__all__ = ("AutoChoice", "MapStats", "WorkerStats")


@dataclass(frozen=True, slots=True)
class AutoChoice:
    """Where ``backend="auto"`` ran a call, and why (see :doc:`/backends`).

    Attributes:
        backend: ``"serial"``, ``"thread"`` or ``"process"``.
        workers: threads or processes the rest of the items ran on (1 for serial).
        probed: items it ran first in the calling thread to measure them; their results
            are part of the call's, and they count in the stats.
        seconds_per_item: their measured wall time per item, or ``None`` when nothing was
            measured (an option that only processes honour decided it).
        predicted: predicted seconds for the items after the probe, per backend it
            weighed.
        reason: one line saying why.
    """

    backend: Literal["serial", "thread", "process"]
    workers: int
    probed: int
    seconds_per_item: float | None
    predicted: dict[str, float] = field(default_factory=dict)
    reason: str = ""


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
        choice: what ``backend="auto"`` chose, and why; ``None`` for other backends.
    """

    workers: tuple[WorkerStats, ...]
    items: int
    seconds: float
    choice: AutoChoice | None = None

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
        if self.choice is not None:
            lines.append(f"backend='auto' chose {self.choice.backend}: {self.choice.reason}")
        return "\n".join(lines)
