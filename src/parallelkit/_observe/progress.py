"""Progress records (``Progress``, ``StageProgress``) and the reporters that show them: a tqdm
bar (``progress=True``, the ``progress`` extra) or the user's callable.  The map capability
counts (``parallelkit._map.progress``); pipelines report from their router.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

__all__ = ("PipelineProgress", "Progress", "ProgressOption", "StageProgress")


@dataclass(frozen=True, slots=True)
class StageProgress:
    """How far one pipeline stage has got.

    Attributes:
        name: the stage's name.
        items_in: items it has received.
        items_out: items it has passed on.
    """

    name: str
    items_in: int
    items_out: int


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a run has got; what a ``progress=`` callable receives.

    Attributes:
        done: items finished (for a pipeline: source items whose outputs came out of the
            last stage).  Grows with every event and ends at ``total`` when the run
            completes.
        total: the number of items, when the input has a length; else ``None``.
        elapsed: seconds since the run started.
        stages: for a pipeline, one :class:`StageProgress` per stage; else empty.
    """

    done: int
    total: int | None
    elapsed: float
    stages: tuple[StageProgress, ...] = ()

    @property
    def fraction(self) -> float | None:
        """``done / total`` (0 to 1), or ``None`` without a total."""
        if self.total is None:
            return None
        return self.done / self.total if self.total else 1.0


ProgressOption: TypeAlias = bool | Callable[[Progress], object]


class Reporter(Protocol):
    def update(self, done: int, stages: tuple[StageProgress, ...]) -> None: ...
    def close(self) -> None: ...


class _CallbackReporter:
    def __init__(self, fn: Callable[[Progress], object], total: int | None) -> None:
        self.fn = fn
        self.total = total
        self.began = time.monotonic()
        self.last: tuple[int, tuple[StageProgress, ...]] | None = None

    def update(self, done: int, stages: tuple[StageProgress, ...]) -> None:
        if (done, stages) == self.last:
            return
        self.last = (done, stages)
        self.fn(Progress(done, self.total, time.monotonic() - self.began, stages))

    def close(self) -> None:
        pass


class _BarReporter:
    def __init__(self, total: int | None, desc: str | None) -> None:
        from tqdm import tqdm  # noqa: PLC0415 - optional, imported when asked for

        class Bar(tqdm):  # type: ignore[misc]  # tqdm is untyped
            # no monitor thread: it would outlive the bar, and fork workers would be forked
            # from a process running it (Python 3.12 warns about that, rightly)
            monitor_interval = 0

        self.bar: Any = Bar(total=total, desc=desc, unit="item", dynamic_ncols=True)
        self.done = 0
        self.stages: tuple[StageProgress, ...] = ()
        self.closed = False

    def update(self, done: int, stages: tuple[StageProgress, ...]) -> None:
        if self.closed:
            return
        if stages != self.stages:
            self.stages = stages
            self.bar.set_postfix_str(
                " ".join(f"{s.name}={s.items_out}" for s in stages), refresh=False
            )
        if done > self.done:
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.bar.close()


def make_reporter(
    progress: ProgressOption, total: int | None, desc: str | None = None
) -> Reporter | None:
    if progress is False:
        return None
    if progress is True:
        return _BarReporter(total, desc)
    return _CallbackReporter(progress, total)


def total_of(items: object) -> int | None:
    """The number of items, when the input has a ``len()``."""
    if isinstance(items, Sized):
        try:
            return len(items)
        except TypeError:
            return None
    return None


class PipelineProgress:
    """Reports a pipeline run's progress from its router (see ``parallelkit._pipeline.run.Run``)."""

    def __init__(self, progress: ProgressOption, total: int | None) -> None:
        self.reporter = make_reporter(progress, total)
        self.closed = False

    def update(self, done: int, stages: tuple[StageProgress, ...]) -> None:
        if self.reporter is not None and not self.closed:
            self.reporter.update(done, stages)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.reporter is not None:
                self.reporter.close()
