"""The iterator over a streamed map's results (``imap_parallel``, ``WorkerPool.imap``).

It hands out the job's results a chunk at a time; closing it stops the job and, when the
call started its own engine, the engine too.
"""

from __future__ import annotations

import weakref
from collections.abc import Generator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from parallelkit._map.job import Job, handed_out, iterate, stop
from parallelkit._map.stats import StatsBaseline, engine_stats
from parallelkit._observe.stats import MapStats

if TYPE_CHECKING:
    from parallelkit._map.backends.driver import ChunkEngine
    from parallelkit._map.engine import Engine
    from parallelkit._map.progress import Watch

_Y = TypeVar("_Y")

__all__ = ("ResultIterator",)


class ResultIterator(Iterator[_Y]):
    """The iterator ``imap_parallel`` and ``WorkerPool.imap`` return.

    Closing it (``close()``, ``with``, or breaking out of a ``for`` loop over a generator
    that holds it) stops the work: no new items are started and, for ``imap_parallel``,
    the workers are stopped.
    """

    _chunks: Generator[list[Any], None, None]
    _current: Iterator[_Y]
    _engine: Engine | ChunkEngine
    _job: Job
    _closed: bool
    _baseline: StatsBaseline
    _finalizer: weakref.finalize[..., ResultIterator[_Y]] | None
    _watch: Watch | None
    _stats: MapStats | None  # taken when the work stops

    def __init__(self) -> None:
        raise TypeError("a ResultIterator is made by imap_parallel() or WorkerPool.imap()")

    @classmethod
    def _start(
        cls,
        engine: Engine | ChunkEngine,
        job: Job,
        *,
        owns_engine: bool,
        watch: Watch | None = None,
        baseline: StatsBaseline | None = None,
    ) -> ResultIterator[_Y]:
        # Not __init__: the engine and the job are private types, and a public constructor
        # taking them would put them in the public API (pyright --verifytypes).
        self = cls.__new__(cls)
        self._chunks = iterate(engine, job)
        self._current = iter(())
        self._engine = engine
        self._job = job
        self._closed = False
        self._baseline = baseline or StatsBaseline(engine)
        self._stats = None
        self._finalizer = (
            weakref.finalize(self, engine.shutdown, graceful=False) if owns_engine else None
        )
        self._watch = watch
        if watch is not None:
            weakref.finalize(self, watch.close)  # dropped (a `for` loop left by `break`)
        return self

    def __iter__(self) -> Iterator[_Y]:
        # A generator that hands out each chunk with ``yield from`` over a list iterator:
        # a ``for`` loop then gets each result without a Python-level call per item.  Its
        # frame holds ``self``, so the work lives as long as the loop does; leaving the
        # loop drops it (and, if nothing else holds this iterator, stops the work).
        return self._delegate()

    def _delegate(self) -> Generator[_Y, None, None]:
        while True:
            yield from self._current  # a list iterator: closing us leaves it resumable
            if not self._advance():
                return

    def _advance(self) -> bool:
        """Move to the next chunk of results; False when there are no more."""
        if self._closed:
            return False
        try:
            self._current = handed_out(next(self._chunks))
        except StopIteration:
            self.close()
            return False
        except BaseException:
            self.close()
            raise
        return True

    def __next__(self) -> _Y:
        while True:
            for value in self._current:
                return value
            if not self._advance():
                raise StopIteration

    @property
    def stats(self) -> MapStats:
        """Items and busy/idle seconds per worker, for this map so far.

        On a :class:`WorkerPool`, this counts what the pool's workers did while this
        iterator ran (work submitted to the pool at the same time included).
        """
        if self._stats is not None:
            return self._stats
        return engine_stats(self._engine, self._baseline)

    def close(self) -> None:
        """Stop the work; idempotent."""
        if self._closed:
            return
        self._closed = True
        finished = self._job.finished and self._job.error is None
        self._current = iter(())
        self._stats = engine_stats(self._engine, self._baseline)
        try:
            self._chunks.close()
            # a generator closed before it started runs no finally: stop the job here too
            stop(self._engine, self._job)
            self._job.release()
            if self._finalizer is not None:
                self._finalizer.detach()
                self._engine.shutdown(graceful=finished)
        finally:
            if self._watch is not None:
                self._watch.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
