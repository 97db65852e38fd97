"""Queue: a typed, closable, batched queue between processes, for hand-made pipelines.

What it promises (and how)::

    producers ──put / put_many──▶ datagram socket ──get / get_many──▶ consumers
                  │  (one message = one datagram,             ▲  (take items of the
                  │   written whole or not at all)            │   head message under
                  └── large message: the datagram carries ────┘   a record lock)
                      an anonymous file holding it

- **Every item reaches exactly one consumer that asks for it, or stays in the queue**:
  the rest of a partly taken message stays at the socket's head, with a shared cursor
  (``cursor.py``).
- **A put with a timeout returns or raises within it, whatever the item size**: one
  message is one datagram, taken by the kernel whole or not at all; a large one travels
  in an anonymous file (``datagrams.py``).  On :class:`TimeoutError` nothing of it was sent.
- **No lock is held while waiting, and a lock holder's death releases it**: consumers wait
  for data with ``poll``, producers for room on a doorbell pipe, holding nothing; the two
  locks are record locks on the shared state page (``state.py``).
- Room: with ``maxsize`` the queue counts items put and taken in the shared page; without,
  producers wait only while the socket's buffer is full or more than
  ``UNBOUNDED_LARGE_BYTES`` of large messages wait for consumers.

Why datagrams, and not the wire's framed stream (``_wire.stream.FrameStream``, which the
pool, pipelines and channels use): a stream joins two peers, and a Queue has many
producers and many consumers at once, any of which may come and go; on one shared stream
their frames would interleave, and each would need a lock held for a whole message's
write.  A stream also takes a message in pieces, so a put with a timeout could leave half
a message sent (the next writer would have to wait for its rest, or the stream would be
lost).  A datagram is sent whole or not at all by one system call that never blocks, so a
put either happened or left nothing behind, and a consumer killed in the middle of a get
leaves whole messages for the others.  What the datagrams carry is the wire's encoding
(``_wire.frames``: the codec's one rule for what goes out of band).

Like ``multiprocessing.Queue``, a ``Queue`` is shared by passing it to a process when the
process starts (``Process`` arguments, ``start_process``, an ``initializer``).
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import sys
import time
import weakref
from collections.abc import Iterable, Iterator
from multiprocessing import reduction
from multiprocessing.context import assert_spawning
from typing import Any, Final, Generic, TypeVar

from parallelkit._queue import datagrams
from parallelkit._queue.cursor import CLOSED, Cursor
from parallelkit._queue.datagrams import HAS_FD, ITEMS, QHEAD, SIZE, encode, next_id, try_send
from parallelkit._queue.state import (
    ROOM_RECHECK,
    W_ENDED,
    W_LARGE,
    W_OPEN,
    W_SENT,
    W_WAITERS,
    State,
    anonymous_file,
    poll_ms,
    release,
)
from parallelkit._util import fuzz as _fuzz
from parallelkit._util.checks import check_positive_int, check_queue_maxsize, check_timeout
from parallelkit._util.context import get_context
from parallelkit._util.types import StartMethod
from parallelkit._wire import frames
from parallelkit._wire.codec import check_single_host, locate_unpicklable
from parallelkit.errors import QueueClosedError, SerializationError

__all__ = ("Queue",)

T = TypeVar("T")

PUT_MANY_BATCH: Final = 1024  # items per message, at most, from put_many
PUT_MANY_RUN: Final = 128  # items put_many takes from its input at a time, at most
BATCH_BYTES: Final = 1 << 20  # a message of several items is split above this many bytes


def _deadline(timeout: float | None) -> float | None:
    timeout = check_timeout(timeout, zero_ok=True)
    if timeout is None:
        return None
    return time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _release(
    views: list[memoryview], page: Any, fd: int, sockets: tuple[socket.socket, ...]
) -> None:
    """The finalizer: holds what to free, never the handle."""
    for sock in sockets:
        sock.close()
    release(views, page, fd)


class Queue(Generic[T]):
    """A queue between processes: typed, batched, and closed by its producers.

    Guarantees:

    - An item put into the queue reaches exactly one consumer that asks for it, or stays
      in the queue.  :meth:`get` takes one item, :meth:`get_many` at most ``max_items``;
      the other items of a batch stay in the queue for every consumer, even when the
      consumer that took the first of them stops or is killed.
    - :meth:`put` with a ``timeout`` returns or raises :class:`TimeoutError` within that
      timeout, whatever the item's size and whatever the consumers do (the time it takes
      to pickle the item aside); after the error, nothing of the item is in the queue.
    - :meth:`get` with a ``timeout`` returns an item or raises :class:`TimeoutError`
      within that timeout, and then took nothing.
    - A consumer or producer killed at any moment (waiting, or in the middle of a call)
      leaves the queue usable by the others: no lock is held while waiting, and the locks
      held for a moment are released by the kernel when their holder dies.  An item a
      consumer was taking when it was killed is lost with it.

    Args:
        maxsize: at most this many items are in the queue; ``put`` waits for room.  ``0``
            (the default): no limit on the number of items; producers wait only while
            the socket's buffer is full, or while more than 64 MiB of large items wait
            for consumers.
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
        check_queue_maxsize(maxsize)
        check_positive_int(producers, "producers")
        context = get_context(start_method)
        # producers send on _peer, consumers receive on _sock
        self._sock, self._peer, self._inline_max = datagrams.socket_pair()
        self._setup(State.create(*context.Pipe(duplex=False), maxsize))
        self._words[W_OPEN] = producers

    def _setup(self, state: State) -> None:
        self._state = state
        self._maxsize = state.maxsize
        self._words = state.words
        self._read_lock = state.read_lock
        self._count_lock = state.count_lock
        self._cursor = Cursor(self._sock, self._peer, state)
        self._closed = False
        self._finalizer = weakref.finalize(
            self, _release, state.views, state.page, state.fd, (self._sock, self._peer)
        )

    # -------------------------------------------------------------- sharing

    def __getstate__(self) -> dict[str, Any]:
        # like multiprocessing's queues: shared while a process starts, never pickled later
        assert_spawning(self)
        check_single_host(self)
        state = self._state
        return {
            "sock": self._sock,
            "peer": self._peer,
            "bell_r": state.bell_r,
            "bell_w": state.bell_w,
            "fd": reduction.DupFd(state.fd),
            "maxsize": self._maxsize,
            "inline_max": self._inline_max,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._sock = state["sock"]
        self._peer = state["peer"]
        self._inline_max = state["inline_max"]
        self._setup(State(state["fd"].detach(), state["bell_r"], state["bell_w"], state["maxsize"]))

    # -------------------------------------------------------------- producing

    def put(self, item: T, timeout: float | None = None) -> None:
        """Add ``item``; wait (up to ``timeout`` seconds) for room.

        Raises:
            SerializationError: ``item`` cannot be pickled (nothing was sent).
            TimeoutError: no room within ``timeout``; nothing of ``item`` was put.
            ValueError: this handle has closed the queue.
        """
        self._send([item], None if timeout is None else _deadline(timeout))

    def put_many(self, items: Iterable[T], timeout: float | None = None) -> None:
        """Add every item of ``items``, in batches of many items per message.

        Raises:
            SerializationError: an item cannot be pickled; the items of the batches before
                the one holding it were sent, and the error's ``item_index`` says which.
            TimeoutError: no room within ``timeout`` (as for :meth:`put`); the items of
                the batches sent before were put, and the message says how many.
        """
        deadline = _deadline(timeout)
        limit = min(PUT_MANY_BATCH, self._maxsize or PUT_MANY_BATCH)
        source = iter(items)
        sent = 0
        try:
            while True:
                # A batch ends at `limit` items or at BATCH_BYTES by a cheap guess.  Items are
                # pulled in runs (C loops) of at most PUT_MANY_RUN, each small enough by the
                # sizes seen so far not to overshoot much, so that a generator of large
                # objects is not drained far ahead of what is sent.  A run's size is guessed
                # from its first and last items: getsizeof costs more than pickling a small
                # item, so calling it on every item would double the cost of a batch.
                batch: list[T] = []
                guess = 0
                run = 1
                while True:
                    more = list(itertools.islice(source, run))
                    if more:
                        batch += more
                        each = max(sys.getsizeof(more[0]), sys.getsizeof(more[-1]))
                        guess += len(more) * each
                    if len(more) < run or len(batch) >= limit or guess >= BATCH_BYTES:
                        break
                    each = guess // len(batch) + 1
                    run = (BATCH_BYTES - guess) // (2 * each)
                    run = max(1, min(limit - len(batch), PUT_MANY_RUN, run))
                if batch:
                    self._send(batch, deadline, first_index=sent)
                    sent += len(batch)
                if len(more) < run:
                    break
        except TimeoutError as exc:
            if sent:
                exc.add_note(f"the first {sent} items were put before the timeout")
            raise

    def _send(self, items: list[T], deadline: float | None, first_index: int = 0) -> None:
        if self._closed:
            raise ValueError("this queue handle was closed; it cannot put any more")
        try:
            parts = encode(items)
        except Exception as exc:
            found = locate_unpicklable(items)
            position, cause = found if found is not None else (0, exc)
            index = first_index + position
            raise SerializationError(
                f"item {index} cannot be pickled to put it on the queue: {cause}",
                what="argument",
                item_index=index,
            ) from cause
        size = len(parts[0]) if len(parts) == 1 else frames.size(parts)
        if len(items) > 1 and size > BATCH_BYTES:
            # A partly taken message is read again by other consumers: keep those small.
            # (put_many guessed the size too low: split once, by the measured size.)
            step = max(1, min(len(items) // 2, len(items) * BATCH_BYTES // size))
            for start in range(0, len(items), step):
                self._send(items[start : start + step], deadline, first_index + start)
            return
        self._deliver(parts, size, len(items), deadline)

    def _deliver(self, parts: frames.Parts, size: int, count: int, deadline: float | None) -> None:
        if len(parts) == 1:
            sizes = SIZE.pack(size)
        else:
            sizes = b"".join(SIZE.pack(memoryview(p).nbytes) for p in parts)
        body = len(sizes) + size
        fd: int | None = None
        if QHEAD.size + body <= self._inline_max:
            buffers: list[Any] = [None, sizes, *parts]
        else:
            fd = anonymous_file()
            buffers = [None]
        try:
            if fd is not None:
                datagrams.write_all(fd, [sizes, *parts])
            buffers[0] = QHEAD.pack(
                ITEMS, 0 if fd is None else HAS_FD, len(parts), count, next_id(), body
            )
            if fd is not None:
                self._put_message(buffers, fd, count, body, deadline)
            else:
                try:
                    if self._maxsize or not self._try_send_now(buffers):
                        self._put_message(buffers, None, count, 0, deadline)
                except OSError as exc:
                    if exc.errno != errno.EMSGSIZE:
                        raise
                    # the system's datagrams are smaller than we thought: go by file
                    self._inline_max = QHEAD.size
                    self._deliver(parts, size, count, deadline)
        finally:
            if fd is not None:
                os.close(fd)

    def _put_message(  # noqa: PLR0912 - a hot path kept in one frame (a helper call costs more than its branches)
        self, buffers: list[Any], fd: int | None, count: int, large: int, deadline: float | None
    ) -> None:
        """Send one datagram when there is room; ``large``: bytes of its file (0: none)."""
        ancillary = datagrams.fd_ancillary(fd)
        state = self._state
        counted = self._maxsize > 0 or large > 0
        words = self._words
        waiting = False
        while True:
            full = False
            if counted:
                if not self._count_lock.acquire(deadline):
                    if waiting:
                        state.stop_waiting()
                    raise TimeoutError(state.no_room())
                try:
                    if waiting:
                        words[W_WAITERS] = max(0, words[W_WAITERS] - 1)
                        waiting = False
                    if state.has_room(count, large):
                        if _fuzz.ENABLED:
                            _fuzz.point("queue.put.before_send")
                        if try_send(self._peer, buffers, ancillary):
                            # after the send: a producer killed in between leaves more room
                            if self._maxsize:
                                words[W_SENT] += count
                            if large:
                                words[W_LARGE] += large
                            return
                    else:
                        full = True
                        words[W_WAITERS] += 1
                        waiting = True
                finally:
                    self._count_lock.release()
            else:
                if _fuzz.ENABLED:
                    _fuzz.point("queue.put.before_send")
                if try_send(self._peer, buffers, ancillary):
                    return
            left = _left(deadline)
            if left == 0:
                if waiting:
                    state.stop_waiting()
                raise TimeoutError(state.no_room())
            if full:
                if _fuzz.ENABLED:
                    _fuzz.point("queue.put.wait_room")
                state.wait_for_bell(left)
            else:
                poller = select.poll()
                poller.register(self._peer.fileno(), select.POLLOUT)
                # the socket says "writable" only below a quarter of its buffer; look again
                # now and then in case a datagram that fits would already go
                poller.poll(poll_ms(ROOM_RECHECK if left is None else min(left, ROOM_RECHECK)))

    def _try_send_now(self, buffers: list[Any]) -> bool:
        """An unbounded queue's small message: nothing to count, send it if it goes."""
        if _fuzz.ENABLED:
            _fuzz.point("queue.put.before_send")
        return try_send(self._peer, buffers, [])

    def close(self) -> None:
        """This producer is done; once every producer has closed, consumers see the end.

        Idempotent for one handle.  A process that only consumes need not call it.  Never
        waits for a consumer.

        Raises:
            ValueError: more closes than the ``producers`` the queue was made for.
        """
        if self._closed:
            return
        words = self._words
        self._count_lock.acquire(None)
        try:
            if words[W_OPEN] <= 0:
                raise ValueError("every producer of this queue has closed it already")
            words[W_OPEN] -= 1
            last = words[W_OPEN] == 0
            if last:
                words[W_ENDED] = 1
        finally:
            self._count_lock.release()
        self._closed = True
        if last:
            if _fuzz.ENABLED:
                _fuzz.point("queue.close.before_end")
            self._post_end()

    def _post_end(self) -> None:
        # Best effort: a full socket has data to wake the consumers, and the last of them
        # to find it empty posts the end again (see Cursor.take_locked).
        datagrams.post_end(self._peer)

    # -------------------------------------------------------------- consuming

    def get(self, timeout: float | None = None) -> T:
        """Take the next item; wait (up to ``timeout`` seconds) for one.

        Raises:
            QueueClosedError: every producer closed the queue and it is empty.
            TimeoutError: nothing arrived within ``timeout``; nothing was taken.
        """
        item: T = self._take(1, None if timeout is None else _deadline(timeout))[0]
        return item

    def get_many(self, max_items: int | None = None, timeout: float | None = None) -> list[T]:
        """Take at least one and at most ``max_items`` items (``None``: the rest of a batch).

        Raises:
            QueueClosedError: every producer closed the queue and it is empty.
            TimeoutError: nothing arrived within ``timeout``; nothing was taken.
        """
        if max_items is not None:
            check_positive_int(max_items, "max_items")
        return self._take(max_items, _deadline(timeout))

    def _take(self, limit: int | None, deadline: float | None) -> list[T]:
        cursor = self._cursor
        if cursor.ended:
            raise QueueClosedError(CLOSED)
        while True:
            if not self._read_lock.acquire(deadline):
                raise TimeoutError("nothing could be taken from the queue within the timeout")
            try:
                if _fuzz.ENABLED:
                    _fuzz.point("queue.get.locked")
                taken = cursor.take_locked(limit)
            finally:
                self._read_lock.release()
            if isinstance(taken, list):
                return taken
            if taken is not None:
                return cursor.decode(taken)
            left = _left(deadline)
            if left == 0:
                raise TimeoutError("nothing arrived on the queue within the timeout")
            if _fuzz.ENABLED:
                _fuzz.point("queue.get.wait")
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN)
            poller.poll(poll_ms(left))

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
        return f"<parallelkit.Queue {bound}, {self._words[W_OPEN]} producer(s) open>"
