"""A pipeline's source: sliced when it is a sequence, else read by a helper thread.

``Source`` owns the source thread and the wake-up pipe the thread writes to, to wake the
router from its ``poll`` when items are ready and the router wants them.  The thread reads
only while the :class:`~parallelkit._pipeline.budget.Budget` has room, so that a consumer
that stops asking stops the source too.

The thread reads in chunks, but an item read is never held back for the rest of its
chunk: a router that finds no whole chunk takes the items of the one being filled (the
source may be waiting for the consumer before it yields the next item), and the thread
wakes the router as soon as it reads an item while the router waits for one.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

from parallelkit._pipeline.budget import MAX_BATCH, Budget
from parallelkit._proc.wakeup import WakeUpPipe
from parallelkit._util import fuzz as _fuzz
from parallelkit._util.threads import quiet_thread

__all__ = ("Source",)

CHUNK_SECONDS: Final = 0.001  # the source thread passes on what it read at least this often
JOIN_TIMEOUT: Final = 1.0  # seconds to wait for the source thread when the run stops


class Source:
    """The items of a run, taken in batches by the router (the consumer's thread)."""

    def __init__(self, source: Iterable[Any], budget: Budget) -> None:
        self.budget = budget
        self.sequence: Sequence[Any] | None = None
        self.iterator: Iterator[Any] | None = None
        if isinstance(source, list | tuple | range):
            self.sequence = source
        else:
            self.iterator = iter(source)
        self.thread: threading.Thread | None = None
        self.wakeup = WakeUpPipe()
        self.chunks: deque[list[Any]] = deque()  # read by the thread, not yet taken
        self.pulled = 0  # items the thread has read
        self.done = False  # the thread has ended
        self.error: BaseException | None = None  # what the source raised
        self.wanted = False  # the router found no chunk and waits for one: wake it
        # the chunk being filled, and how many of its items the router took already;
        # the thread publishes and retires it, the router takes from it, under ``lock``
        self.lock = threading.Lock()
        self.filling: list[Any] | None = None
        self.taken_early = 0
        self.closed = False

    def start(self) -> None:
        if self.iterator is not None:
            # it never takes a Ctrl-C meant for the main thread
            self.thread = quiet_thread(self._pull, name="parallelkit-pipeline-source")
            self.thread.start()

    @property
    def wakeup_fd(self) -> int | None:
        """The descriptor to poll for the thread's wake-ups (``None``: no thread)."""
        return None if self.thread is None else self.wakeup.fd

    def take(self, start: int, limit: int) -> Sequence[Any] | None:
        """Up to ``limit`` items from item ``start`` on (the next the router takes)."""
        if self.sequence is not None:
            items = self.sequence[start : start + limit]
            return items or None
        chunks = self.chunks
        self.wanted = True  # before looking: either we see its items or it wakes us
        if not chunks:
            with self.lock:
                if not chunks:
                    return self._take_filling(limit)
        self.wanted = False
        taken = chunks.popleft()
        while chunks and len(taken) + len(chunks[0]) <= limit:
            taken += chunks.popleft()
        return taken

    def _take_filling(self, limit: int) -> list[Any] | None:
        """Up to ``limit`` items of the chunk the thread is filling (under ``lock``): the
        source may be waiting for the consumer before it yields the next item."""
        filling = self.filling
        start = self.taken_early
        if filling is None or len(filling) <= start:
            return None
        taken = filling[start : start + limit]
        self.taken_early = start + len(taken)
        self.wanted = False
        return taken

    def exhausted(self, taken: int) -> bool:
        """``taken`` items were taken, and there are no more."""
        if self.sequence is not None:
            return taken >= len(self.sequence)
        return self.done and not self.chunks

    def items_read(self, taken: int) -> int:
        return taken if self.sequence is not None else self.pulled

    def stop(self) -> None:
        """Stop the thread (it may be inside the user's ``next()``: it exits when that
        returns); idempotent.  The wake-up pipe stays open until :meth:`close`."""
        self.closed = True
        self.budget.wake_all()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)

    def close(self) -> None:
        """Tell the thread to stop and close the wake-up pipe (also the GC backstop)."""
        self.closed = True
        self.wakeup.close()

    def _stopping(self) -> bool:
        return self.closed

    def _retire(self, chunk: list[Any]) -> None:
        """The thread is done filling ``chunk``: queue what the router did not take."""
        with self.lock:
            early = self.taken_early
            self.filling = None
            self.taken_early = 0
            if len(chunk) > early:
                self.chunks.append(chunk[early:] if early else chunk)
            self.pulled += len(chunk)

    def _pull(self) -> None:  # noqa: PLR0912,PLR0915 - the source thread's one loop
        """The source thread: read the source in chunks into ``chunks``.

        A chunk starts at one item and doubles while the source fills it within
        ``CHUNK_SECONDS`` twice in a row (halving when it does not), so a fast source is read
        in runs of up to a batch.  The router can take the items of a chunk being filled
        (see :meth:`take`), and is woken when an item comes while it waits, so that no item
        waits for the next one.  Reading stops while the budget has no room.
        """
        iterator = self.iterator
        assert iterator is not None
        budget = self.budget
        clock = time.perf_counter
        size = 1
        fast = 0  # chunks in a row that filled within CHUNK_SECONDS
        chunk: list[Any] = []
        try:
            while not self.closed:
                room = budget.cap() - (self.pulled - budget.released)
                if room <= 0:
                    budget.wait_for_room(self.pulled, self._stopping)
                    continue
                limit = min(size, room, budget.batch_size)
                chunk = self.filling = []
                append = chunk.append
                began = clock()
                for item in itertools.islice(iterator, limit):
                    append(item)
                    if self.wanted:  # the router waits: it takes what there is when it wakes
                        self.wanted = False
                        self.wakeup.wake()
                took = clock() - began
                count = len(chunk)
                if _fuzz.ENABLED:
                    _fuzz.point("router.source_chunk")  # the router may take from it
                self._retire(chunk)
                chunk = []
                if count:
                    if self.wanted:
                        self.wanted = False  # (it looks again, and sets it, when it wants)
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
            self._retire(chunk)  # what the source yielded before it raised is not lost
            self.error = exc
        finally:
            if self.closed:
                close = getattr(iterator, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()  # run the generator's finally blocks
            self.done = True
            self.wakeup.wake()
