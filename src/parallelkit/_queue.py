"""Queue: a typed, closable, batched queue between processes, for hand-made pipelines.

Built on a pipe and two locks, like ``multiprocessing.Queue``, with three differences:

- ``put`` pickles and writes in the caller (there is no feeder thread): an item that cannot
  be pickled raises *there*, and an item ``put`` returned from is in the pipe, not in a
  buffer a process may exit without flushing.
- batches: ``put_many`` sends a list of items as one message and ``get_many`` takes a
  message's worth at once; messages use the out-of-band framing of ``_frames``.
- closing: the queue knows how many producers it has; each calls ``close()`` when it is
  done, and once all have, consumers drain what is left and then see the end
  (:class:`~parallelkit.errors.QueueClosedError` from ``get``, the end of a ``for`` loop),
  with no sentinel values to count.

Like ``multiprocessing.Queue``, a ``Queue`` is shared by passing it to a process when the
process starts (``Process`` arguments, ``start_process``, an ``initializer``).  A consumer
killed in the middle of receiving a message leaves the stream unreadable for the others;
they get ``TimeoutError`` from ``get(timeout=...)`` rather than hang.  For stages of
workers that survive a crash, use :class:`~parallelkit.Pipeline`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Final, Generic, TypeVar

from . import _frames as frames
from ._checks import check_positive_int, check_timeout
from ._context import get_context
from ._serialize import check_single_host, locate_unpicklable
from ._types import StartMethod
from .errors import QueueClosedError, SerializationError

__all__ = ("Queue",)

T = TypeVar("T")

ITEMS: Final = 1
END: Final = 2
PUT_MANY_BATCH: Final = 1024  # items per message, at most, from put_many


def _deadline(timeout: float | None) -> float | None:
    timeout = check_timeout(timeout, zero_ok=True)
    if timeout is None:
        return None
    return time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Queue(Generic[T]):
    """A queue between processes: typed, batched, and closed by its producers.

    Args:
        maxsize: at most this many items are in the queue; ``put`` waits for room.  ``0``
            (the default): only the pipe's buffer bounds it (a writer waits when the pipe
            is full).
        producers: how many producers will call :meth:`close`; the queue ends for its
            consumers once all of them have.
        start_method: the start method of the processes that will share it (``None``: the
            platform default).

    Example::

        q: Queue[int] = Queue(producers=2)
        # each of two producer processes: q.put_many(range(10)); q.close()
        # a consumer:                     total = sum(q)   # ends after both closed
    """

    def __init__(
        self,
        maxsize: int = 0,
        *,
        producers: int = 1,
        start_method: StartMethod | None = None,
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be an int >= 0 (0: no limit), got {maxsize!r}")
        check_positive_int(producers, "producers")
        context = get_context(start_method)
        self._reader, self._writer = context.Pipe(duplex=False)
        self._read_lock = context.Lock()
        self._write_lock = context.Lock()
        self._room = context.BoundedSemaphore(maxsize) if maxsize else None
        # one producer at a time takes room for a batch (see _send)
        self._room_lock = context.Lock() if maxsize else None
        self._open = context.Value("q", producers)
        self._maxsize = maxsize
        self._local: deque[T] = deque()  # items of a batch this process took, not yet handed out
        self._closed = False
        self._ended = False

    # -------------------------------------------------------------- sharing

    def __getstate__(self) -> dict[str, Any]:
        # multiprocessing's objects refuse to be pickled except while a process starts
        check_single_host(self)
        state = dict(self.__dict__)
        state["_local"] = deque()
        state["_closed"] = False
        state["_ended"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -------------------------------------------------------------- producing

    def put(self, item: T, timeout: float | None = None) -> None:
        """Add ``item``; wait (up to ``timeout`` seconds) for room.

        Raises:
            SerializationError: ``item`` cannot be pickled (nothing was sent).
            TimeoutError: no room within ``timeout``.
            ValueError: this handle has closed the queue.
        """
        self._send([item], _deadline(timeout))

    def put_many(self, items: Iterable[T], timeout: float | None = None) -> None:
        """Add every item of ``items``, in batches of many items per message.

        Raises:
            SerializationError: an item cannot be pickled; the items of the batches before
                the one holding it were sent, and the error's ``item_index`` says which.
            TimeoutError: no room within ``timeout`` (as for :meth:`put`).
        """
        deadline = _deadline(timeout)
        limit = min(PUT_MANY_BATCH, self._maxsize or PUT_MANY_BATCH)
        batch: list[T] = []
        sent = 0
        for item in items:
            batch.append(item)
            if len(batch) >= limit:
                self._send(batch, deadline, first_index=sent)
                sent += len(batch)
                batch = []
        if batch:
            self._send(batch, deadline, first_index=sent)

    def _send(self, items: list[T], deadline: float | None, first_index: int = 0) -> None:
        if self._closed:
            raise ValueError("this queue handle was closed; it cannot put any more")
        try:
            parts = frames.encode(items, ITEMS)
        except Exception as exc:
            found = locate_unpicklable(items)
            position, cause = found if found is not None else (0, exc)
            index = first_index + position
            raise SerializationError(
                f"item {index} cannot be pickled to put it on the queue: {cause}",
                what="argument",
                item_index=index,
            ) from cause
        taken = 0
        try:
            if self._room is not None and self._room_lock is not None:
                # Room for a batch is taken a slot at a time, by one producer at a time:
                # two producers doing it together could each hold part of what its batch
                # needs and wait for the rest forever, with nothing sent for a consumer to
                # free.  (A batch is never larger than maxsize, so the holder always gets
                # the rest as the consumer takes what was sent before.)
                if not self._room_lock.acquire(timeout=_left(deadline)):
                    raise TimeoutError(f"no room in the queue (maxsize {self._maxsize})")
                try:
                    for _ in items:
                        if not self._room.acquire(timeout=_left(deadline)):
                            raise TimeoutError(f"no room in the queue (maxsize {self._maxsize})")
                        taken += 1
                finally:
                    self._room_lock.release()
            if not self._write_lock.acquire(timeout=_left(deadline)):
                raise TimeoutError("another producer held the queue for the whole timeout")
            try:
                frames.send(self._writer, parts)
            finally:
                self._write_lock.release()
        except BaseException:
            if self._room is not None:
                for _ in range(taken):
                    self._room.release()
            raise

    def close(self) -> None:
        """This producer is done; once every producer has closed, consumers see the end.

        Idempotent for one handle.  A process that only consumes need not call it.

        Raises:
            ValueError: more closes than the ``producers`` the queue was made for.
        """
        if self._closed:
            return
        with self._open.get_lock():
            if self._open.value <= 0:
                raise ValueError("every producer of this queue has closed it already")
            self._open.value -= 1
            last = self._open.value == 0
        self._closed = True
        if last:
            with self._write_lock:
                frames.send(self._writer, frames.encode(None, END))

    # -------------------------------------------------------------- consuming

    def get(self, timeout: float | None = None) -> T:
        """Take the next item; wait (up to ``timeout`` seconds) for one.

        Raises:
            QueueClosedError: every producer closed the queue and it is empty.
            TimeoutError: nothing arrived within ``timeout``.
        """
        if not self._local:
            self._receive(_deadline(timeout))
        return self._local.popleft()

    def get_many(self, max_items: int | None = None, timeout: float | None = None) -> list[T]:
        """Take at least one and at most ``max_items`` items (all of a batch by default).

        Raises:
            QueueClosedError: every producer closed the queue and it is empty.
            TimeoutError: nothing arrived within ``timeout``.
        """
        if max_items is not None:
            check_positive_int(max_items, "max_items")
        if not self._local:
            self._receive(_deadline(timeout))
        local = self._local
        count = len(local) if max_items is None else min(max_items, len(local))
        return [local.popleft() for _ in range(count)]

    def _receive(self, deadline: float | None) -> None:
        if self._ended:
            raise QueueClosedError("every producer closed the queue, and it is empty")
        if not self._read_lock.acquire(timeout=_left(deadline)):
            raise TimeoutError("another consumer held the queue for the whole timeout")
        try:
            if not self._reader.poll(_left(deadline)):
                raise TimeoutError("nothing arrived on the queue within the timeout")
            parts = frames.recv(self._reader)
            if frames.header(parts)[0] == END:
                # leave the end marker for the other consumers
                with self._write_lock:
                    frames.send(self._writer, parts)
                self._ended = True
                raise QueueClosedError("every producer closed the queue, and it is empty")
        finally:
            self._read_lock.release()
        items: list[T] = frames.decode(parts)
        if self._room is not None:
            for _ in items:
                self._room.release()
        self._local.extend(items)

    def __iter__(self) -> Iterator[T]:
        """The items, until every producer has closed the queue and it is empty."""
        while True:
            try:
                batch = self.get_many()
            except QueueClosedError:
                return
            yield from batch

    def __repr__(self) -> str:
        bound = f"maxsize={self._maxsize}" if self._maxsize else "unbounded"
        return f"<parallelkit.Queue {bound}, {self._open.value} producer(s) open>"
