"""Who is to blame: a worker that died, an item that ran too long, an item that will not pickle.

::

    sentinel fired ──▶ the engine reaps and forgets the worker ──▶ Blame.worker_exited:
      the progress slot says    ├─ chunk not taken: blameless, runs elsewhere
      (TAKEN, POS)              ├─ among untracked items: run again, tracked
                                ├─ (un)pickling a chunk: split it, item by item
                                └─ item POS: WorkerCrashedError for it, the rest run again
    step ──▶ Blame.check_timeouts: an item late ──▶ SIGTERM (then SIGKILL) ──▶ the same
                                   path, with TaskTimeoutError for the item
    a scheduled task cancelled ──▶ Blame.stop: the same, its job already settled

:class:`Blame` owns the count of workers dying at start-up (the pool gives up on a long run
of them) and reads the progress slots; it owns no process: it asks the engine to retry a
chunk or break the pool, and stops a late worker through its process.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from parallelkit._proc import child, slots
from parallelkit._proc.lifecycle import describe_exit, signal_name
from parallelkit._wire.codec import ExceptionRecord, rebuild_exception
from parallelkit.errors import (
    SerializationError,
    SerializedWhat,
    TaskTimeoutError,
    WorkerCrashedError,
)

if TYPE_CHECKING:
    from parallelkit._map.engine import Engine
    from parallelkit._map.handle import WorkerHandle
    from parallelkit._map.job import Chunk

STARTUP_DEATHS_LIMIT: Final = 5  # workers dying before any result, per worker slot...
STARTUP_DEATHS_SECONDS: Final = 0.5  # ...for at least this long, and the pool gives up
UNTAKEN_RETRIES: Final = 3  # times a chunk is sent again after workers died before taking it
KILL_GRACE_NS: Final = 500_000_000  # nanoseconds from SIGTERM to SIGKILL for a late worker


class Blame:
    """Attributes the engine's worker deaths and timeouts (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.startup_deaths = 0  # since the last result
        self.first_startup_death = 0.0

    def worker_exited(self, w: WorkerHandle, exitcode: int | None) -> None:  # noqa: PLR0911,PLR0912 - one case per branch, read top to bottom (split, it would be read across functions)
        """``w`` exited (reaped and forgotten, its replies read): settle what it held."""
        engine = self.engine
        if exitcode == child.EXIT_MAIN_GUARD:
            engine.break_pool(
                WorkerCrashedError(
                    f"worker pid {w.pid} {child.main_guard_note(engine.start_method)}",
                    pid=w.pid,
                    exitcode=exitcode,
                )
            )
            return
        if not w.chunks:
            if not w.stopping and engine.broken is None and w.tasks_done == 0:
                self.startup_death(w, exitcode)
            return
        head = w.chunks.popleft()
        head.job.in_flight -= 1
        for other in reversed(w.chunks):  # pipelined chunks it never started: run elsewhere
            other.job.in_flight -= 1
            if not other.job.cancelled:
                engine.retry(other)
        w.chunks.clear()
        job = head.job
        if job.cancelled:
            return
        pos = engine.words[w.slot * slots.SLOT_WORDS + slots.POS]
        size = head.stop - head.start
        if w.killed_for is not None and w.killed_at is not None:
            killed, killed_pos = w.killed_at
            if killed is not head:
                # the chunk it was stopped for finished (its result is in) and this one
                # had started before the signal landed: not to blame, it runs elsewhere
                engine.retry(head)
                return
            job.split_around(head, max(0, min(killed_pos, size - 1)), w.killed_for)
            return
        taken = engine.words[w.slot * slots.SLOT_WORDS + slots.TAKEN] == head.cid
        starting = pos == slots.POS_STARTING
        if not taken and (starting or head.untaken < UNTAKEN_RETRIES):
            # It died before it had the chunk whole (at start-up, or idle: killed between
            # two calls): the chunk is blameless and runs elsewhere.  (Deaths at start-up
            # are counted below; a chunk that keeps killing workers as they read it, too
            # large for memory, is blamed after a few.)
            engine.retry(head)  # first: giving up below fails the jobs that are queued
            if not starting:
                head.untaken += 1
            elif w.tasks_done == 0:
                self.startup_death(w, exitcode)
            return
        if not taken:
            pos = slots.POS_RECEIVING  # what the slot says is about an earlier chunk
        if pos == slots.POS_UNTRACKED and not head.tracked:
            # it died among tiny items run without noting each one: run the chunk again,
            # noting each, so a crash names its item (an item that crashes every time does)
            head.tracked = True
            engine.retry(head)
            return
        if pos in (slots.POS_RECEIVING, slots.POS_SENDING) and size > 1:
            # died unpickling the chunk or pickling its results: run its items one by one
            # to find the culprit
            job.split_around(head, 0, None)
            return
        doing = {slots.POS_RECEIVING: "receiving", slots.POS_SENDING: "sending the result of"}.get(
            pos, "running"
        )
        pos = max(pos, 0)
        index = head.start + pos
        error = WorkerCrashedError(
            f"worker pid {w.pid} {describe_exit(exitcode)} while {doing} item {index}"
            + (" (without sending a result)" if exitcode == 0 else ""),
            item_index=index,
            pid=w.pid,
            exitcode=exitcode,
            signal=signal_name(exitcode),
        )
        job.split_around(head, pos, error)

    def startup_death(self, w: WorkerHandle | None, exitcode: int | None) -> None:
        """A worker died before its first result (``None``: before it was handed its work)."""
        # Give up only on a run of deaths that is both long and lasting: a broken
        # initializer, not a passing storm (signals sent to the whole process group).
        now = time.monotonic()
        if self.startup_deaths == 0:
            self.first_startup_death = now
        self.startup_deaths += 1
        if (
            self.startup_deaths >= STARTUP_DEATHS_LIMIT * self.engine.max_workers
            and now - self.first_startup_death >= STARTUP_DEATHS_SECONDS
        ):
            self.engine.break_pool(
                WorkerCrashedError(
                    "worker processes keep dying at start-up (last: "
                    + (
                        "one that died before it could be handed its work"
                        if w is None
                        else f"pid {w.pid} {describe_exit(exitcode)}"
                    )
                    + "); is the initializer or the environment killing them?",
                    pid=None if w is None else w.pid,
                    exitcode=exitcode,
                    signal=signal_name(exitcode),
                )
            )

    def check_timeouts(self) -> None:
        """Stop each worker whose item overran its timeout (SIGTERM, SIGKILL after a grace)."""
        engine = self.engine
        now = time.monotonic_ns()
        for w in engine.workers:
            if w.killed_for is not None:
                # SIGTERMed earlier: SIGKILL once the grace is over
                if now - w.head_since > KILL_GRACE_NS and w.process.exitcode is None:
                    w.process.kill()
                continue
            if not w.chunks:
                continue
            head = w.chunks[0]
            job = head.job
            if job.timeout is None:
                continue
            slot = w.slot * slots.SLOT_WORDS
            if engine.words[slot + slots.TAKEN] != head.cid:
                # not received yet (the worker is starting, in its initializer, or still
                # reading an earlier chunk): no item of it runs, none is late
                continue
            started = max(engine.words[slot + slots.STARTED_NS], w.head_since)
            if (now - started) / 1e9 < job.timeout:
                continue
            pos = engine.words[slot + slots.POS]
            index = head.start + max(pos, 0)
            what = "the task" if job.alone else f"item {index}"
            self.stop(
                w,
                pos,
                TaskTimeoutError(
                    f"{what} ran longer than its timeout of {job.timeout:g} s; "
                    f"its worker (pid {w.pid}) was stopped",
                    item_index=None if job.alone else index,
                    timeout=job.timeout,
                ),
            )

    @staticmethod
    def stop(w: WorkerHandle, pos: int, error: BaseException) -> None:
        """Stop ``w`` because of what it runs (a timeout, a cancelled task): SIGTERM now,
        SIGKILL once the grace is over (:meth:`check_timeouts`); when it has exited, its
        head chunk's item ``pos`` fails with ``error`` (unless its job was cancelled) --
        if that chunk is still its head: one it started after, as the signal travelled,
        runs again elsewhere (:meth:`worker_exited`)."""
        w.killed_for = error
        w.killed_at = (w.chunks[0], pos)
        w.head_since = time.monotonic_ns()  # from now on: the grace before SIGKILL
        w.process.terminate()

    def next_deadline(self) -> float | None:
        """Seconds until the earliest item timeout (None: no timeouts pending)."""
        engine = self.engine
        now = time.monotonic_ns()
        best: float | None = None
        for w in engine.workers:
            if not w.chunks or w.killed_for is not None:
                continue
            job = w.chunks[0].job
            if job.timeout is None:
                continue
            started = max(engine.words[w.slot * slots.SLOT_WORDS + slots.STARTED_NS], w.head_since)
            left = (started - now) / 1e9 + job.timeout
            best = left if best is None else min(best, left)
        return best


def blame_or_split(chunk: Chunk, what: SerializedWhat, problem: str, cause: BaseException) -> None:
    """A chunk failed to (un)pickle as a whole: blame its item if it has only one,
    otherwise run its items one by one to find the culprit."""
    if chunk.stop - chunk.start > 1:
        chunk.job.split_around(chunk, 0, None)
        return
    subject = f"the result of item {chunk.start}" if what == "result" else f"item {chunk.start}"
    error = SerializationError(
        f"{subject} {problem}: {type(cause).__name__}: {cause}",
        what=what,
        item_index=chunk.start,
    )
    error.__cause__ = cause
    chunk.job.split_around(chunk, 0, error)


def rebuild(record: ExceptionRecord, index: int, pid: int | None) -> BaseException:
    """The exception an item raised in worker ``pid``, rebuilt here and naming the item."""
    exc = rebuild_exception(record, where=f"in worker pid {pid} on item {index}")
    if isinstance(exc, SerializationError) and exc.item_index is None:
        exc.item_index = index
    return exc
