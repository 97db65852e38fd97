"""The bounds on what is between a pipeline's source and its consumer, and batch sizing.

At most ``maxsize`` source items are between the source and the consumer (taken from the
source and not yet released by the consumer).  Without ``maxsize`` the bound is set from
the workers and the batch size, and the budget counts bytes too (``BYTES_IN_FLIGHT``: a
batch weighs its largest message at any stage so far), so that large items are not
multiplied by stages and workers.

``Budget`` owns no thread or descriptor.  The router (the consumer's thread) changes it;
the source thread reads it and waits on its condition for room (``wait_for_room``), and
the router wakes it (``notify``) whenever room may have grown.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

from parallelkit._pipeline.stats import StageCounts

__all__ = ("BATCH_BYTES", "BATCH_SECONDS", "BYTES_IN_FLIGHT", "MAX_BATCH", "Budget")

MAX_BATCH: Final = 4096  # items per message, at most
BATCH_BYTES: Final = 256 * 1024  # aim for messages about this size
BATCH_SECONDS: Final = 0.005  # ... and for batches that keep the slowest stage this busy
# maxsize=None: besides the items bound, at most about this many bytes (the largest pickled
# message of each batch) between the source and the consumer, however many stages and
# workers there are; never fewer than MIN_IN_FLIGHT items, so that the stages overlap
BYTES_IN_FLIGHT: Final = 64 << 20
MIN_IN_FLIGHT: Final = 2  # items
ROOM_POLL: Final = 0.25  # seconds the source thread waits for room before looking again


class Budget:
    """Source items and bytes in flight; the size of the next batch."""

    def __init__(self, maxsize: int | None, workers: int, first_stage_workers: int) -> None:
        self.maxsize = maxsize
        self.workers = workers  # stage workers in all
        self.first_stage_workers = first_stage_workers
        self.batch_size = 1  # source items per batch: see resize
        self.item_bytes: int | None = None  # pickled bytes per item of the last batch taken
        self.taken = 0  # source items taken into batches
        self.released = 0  # ... whose outputs the consumer has moved past
        self.batch_bytes: dict[int, int] = {}  # batch -> its largest message so far
        self.held_bytes: deque[int] = deque()  # bytes of the batches the consumer holds
        self.bytes_in_flight = 0  # the sum of batch_bytes, and of held_bytes
        self.room = threading.Condition(threading.Lock())  # the source thread waits on it
        self.thread_waiting = False

    def cap(self) -> int:
        """Source items allowed between the source and the consumer."""
        if self.maxsize is not None:
            return self.maxsize
        items = self.batch_size * (2 * self.workers + 4)
        if self.item_bytes is None:  # no item measured yet: it may be a large one
            return min(items, MIN_IN_FLIGHT)
        return max(MIN_IN_FLIGHT, min(items, BYTES_IN_FLIGHT // max(1, self.item_bytes)))

    # ---------------------------------------------------------------- the source thread

    def wait_for_room(self, pulled: int, stopping: Callable[[], bool]) -> None:
        """In the source thread, with ``pulled`` items read: wait a while for room."""
        with self.room:
            self.thread_waiting = True
            if self.cap() - (pulled - self.released) <= 0 and not stopping():
                self.room.wait(ROOM_POLL)
            self.thread_waiting = False

    def notify(self) -> None:
        """Room may have grown: wake the source thread if it waits for it."""
        if self.thread_waiting:
            with self.room:
                self.room.notify()

    def wake_all(self) -> None:
        with self.room:
            self.room.notify_all()

    # ---------------------------------------------------------------- the router

    def next_limit(self) -> int:
        """Source items the next batch may take (0: the budget is spent)."""
        in_flight = self.taken - self.released
        limit = min(self.batch_size, self.cap() - in_flight)
        if limit <= 0:
            return 0
        if (
            self.maxsize is None
            and self.bytes_in_flight >= BYTES_IN_FLIGHT
            and in_flight >= MIN_IN_FLIGHT
        ):
            return 0  # the byte budget is spent; a batch coming back frees it
        return limit

    def admit(self, batch: int, count: int, nbytes: int, counts: Sequence[StageCounts]) -> None:
        """Batch ``batch`` took ``count`` source items, ``nbytes`` on the wire."""
        self.taken += count
        self.batch_bytes[batch] = nbytes
        self.bytes_in_flight += nbytes
        self.item_bytes = nbytes // count
        self.resize(nbytes, count, counts)
        self.notify()

    def resize(self, nbytes: int, count: int, counts: Sequence[StageCounts]) -> None:
        """Size the next batch: ~BATCH_BYTES of pickled items and ~BATCH_SECONDS of work in
        the slowest stage, doubling from one item until both are measured; never more than
        a share of ``maxsize`` that leaves work for every first-stage worker."""
        by_bytes = BATCH_BYTES // max(1, nbytes // count)
        slowest = 0.0  # nanoseconds per item in the slowest stage so far
        for stage in counts:
            if stage.items_in and stage.busy:
                slowest = max(slowest, stage.busy / stage.items_in)
        by_time = int(BATCH_SECONDS * 1e9 / slowest) if slowest else 2 * self.batch_size
        size = min(MAX_BATCH, by_bytes, by_time, 2 * self.batch_size)
        if self.maxsize is not None:
            size = min(size, self.maxsize // (2 * self.first_stage_workers))
        self.batch_size = max(1, size)

    def grow(self, batch: int, nbytes: int) -> None:
        """A stage's message for ``batch`` is ``nbytes``: larger outputs weigh what they weigh."""
        grown = nbytes - self.batch_bytes.get(batch, nbytes)
        if grown > 0:
            self.batch_bytes[batch] = nbytes
            self.bytes_in_flight += grown

    def handed_out(self, batch: int, count: int, *, held: bool) -> None:
        """``batch`` (``count`` source items) went to the consumer; ``held``: it keeps the
        batch's weight until it releases it (a streaming consumer), else it leaves now."""
        nbytes = self.batch_bytes.pop(batch, 0)
        if held:
            self.held_bytes.append(nbytes)
        else:
            self._release(count, nbytes)

    def release(self, count: int) -> None:
        """The consumer is done with the oldest batch it held (``count`` source items)."""
        self._release(count, self.held_bytes.popleft() if self.held_bytes else 0)

    def _release(self, count: int, nbytes: int) -> None:
        self.released += count
        self.bytes_in_flight -= nbytes
        self.notify()
