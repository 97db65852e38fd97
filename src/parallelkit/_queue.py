"""Queue: a typed, closable, batched queue between processes, for hand-made pipelines.

What it promises (and how)::

    producers ──put / put_many──▶ datagram socket ──get / get_many──▶ consumers
                  │  (one message = one datagram,             ▲  (take items of the
                  │   written whole or not at all)            │   head message under
                  └── large message: the datagram carries ────┘   a record lock)
                      an anonymous file holding it

- **Every item reaches exactly one consumer that asks for it, or stays in the queue.**
  ``put_many`` sends many items per message, but ``get`` takes one item and
  ``get_many(n)`` at most ``n``: the rest of a message stays *in the socket*, at its
  head, with the number of its items already taken kept in shared memory (the *cursor*).
  The next consumer, whichever process it is, takes the next items of that message.  A
  handle keeps the items it decoded, so a consumer that takes one item at a time decodes
  each message once while nobody else takes from it; a handle's copy is only ever a cache:
  an item counts as taken when the shared cursor says so.
- **A put with a timeout returns or raises within it, whatever the item size.**  Messages
  travel as datagrams of a ``socketpair(AF_UNIX, SOCK_DGRAM)``: the kernel takes a datagram
  whole or not at all, and never blocks a non-blocking send.  A message larger than a
  quarter of the socket's buffer (or ``INLINE_MAX``) is written to an anonymous file
  (``memfd``) first, and the datagram carries the file's descriptor.  So ``put`` never
  leaves half a message behind: on :class:`TimeoutError` nothing of it was sent.
- **No lock is held while waiting, and a lock holder's death releases it.**  Consumers
  wait for data with ``poll`` and producers for room on a doorbell pipe, holding nothing.
  The two locks (consumers' ``READ``, counters' ``COUNT``) are POSIX record locks on the
  shared state file, held for a few system calls at a time; the kernel releases them when
  their holder dies, however it dies.
- Room: with ``maxsize`` the queue counts items put and taken in shared memory; without,
  producers wait only while the socket's buffer is full or more than
  ``UNBOUNDED_LARGE_BYTES`` of large messages wait for consumers.

The state file (one page, mapped by every process)::

    word 0  head id        the message whose items are partly taken (0: none)
    word 1  head cursor    how many of its items are taken
    word 2  open           producers that have not closed yet
    word 3  ended          1 once the last producer closed
    word 4  sent           items put (counted with maxsize only)
    word 5  taken          items taken (counted with maxsize only)
    word 6  waiters        producers waiting for room (they want the doorbell rung)
    word 7  large          bytes of large messages in the queue

A process that dies in the middle of an update errs on the side of room: counters are
advanced before the socket operation they stand for, so a consumer killed between the two
leaves the queue with a little more room than ``maxsize``, never less.

Like ``multiprocessing.Queue``, a ``Queue`` is shared by passing it to a process when the
process starts (``Process`` arguments, ``start_process``, an ``initializer``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import mmap
import os
import pickle
import select
import socket
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from multiprocessing import reduction
from multiprocessing.context import assert_spawning
from typing import Any, Final, Generic, TypeVar

from parallelkit._util import fuzz as _fuzz
from parallelkit._util.checks import check_positive_int, check_timeout
from parallelkit._util.context import get_context
from parallelkit._util.types import StartMethod
from parallelkit._wire import frames
from parallelkit._wire.codec import check_single_host, locate_unpicklable
from parallelkit.errors import QueueClosedError, SerializationError

__all__ = ("Queue",)

T = TypeVar("T")

ITEMS: Final = 1
END: Final = 2
HAS_FD: Final = 1  # flag: the body is in the file whose descriptor the datagram carries
PUT_MANY_BATCH: Final = 1024  # items per message, at most, from put_many
PUT_MANY_RUN: Final = 128  # items put_many takes from its input at a time, at most
BATCH_BYTES: Final = 1 << 20  # a message of several items is split above this many bytes
INLINE_MAX: Final = 16 << 20  # bytes: a larger message travels in an anonymous file
SOCKET_BUFFER: Final = 4 << 20  # bytes asked for (the kernel caps it at wmem_max)
UNBOUNDED_LARGE_BYTES: Final = 64 << 20  # bytes of large messages an unbounded queue holds
ROOM_RECHECK: Final = 0.05  # seconds: a producer waiting for room looks again at least this often
LOCK_BACKOFF_MAX: Final = 0.002  # seconds between tries of a busy lock, at most

# The datagram: kind, flags, number of parts, number of items, message id, body bytes; then
# the body (inline) or nothing (HAS_FD).  The body: a length per part, then the parts.
QHEAD: Final = struct.Struct("<BBHIqQ")
SIZE: Final = struct.Struct("<Q")

W_HEAD_ID, W_HEAD_CURSOR, W_OPEN, W_ENDED, W_SENT, W_TAKEN, W_WAITERS, W_LARGE = range(8)
STATE_BYTES: Final = mmap.PAGESIZE
READ_LOCK: Final = 0  # byte of the state file: consumers taking from the head
COUNT_LOCK: Final = 1  # byte of the state file: the counters and the producers' room

# plain ints: or-ing the socket module's flag enums costs more than the system call
_SEND_FLAGS: Final = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_NOWAIT: Final = int(socket.MSG_DONTWAIT)
_PEEK: Final = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_FD_SPACE: Final = socket.CMSG_SPACE(4)
_LOCK_TRY: Final = fcntl.LOCK_EX | fcntl.LOCK_NB
_CLOSED: Final = "every producer closed the queue, and it is empty"

# Message ids: unique per queue (the pid keeps forked children apart).  The pid is kept
# here, not asked for per message: getpid is a system call.
_ids = itertools.count(1)
_pid_bits = os.getpid() << 32


def _next_id() -> int:
    return _pid_bits | (next(_ids) & 0xFFFFFFFF)


# A message's first part when it is one small pickle (see _encode)
# A batch longer than this is looked at for large bytes only when its pickle is large (the
# look costs more than pickling small items); a shorter one before pickling, so that large
# bytes are not pickled in vain.
_SCAN_FIRST: Final = 64
_SMALL_HEAD: Final = frames.HEAD.pack(ITEMS, 0, 0, 0, 0, 0)
# ... and when it is one large pickle, in a part of its own
_PICKLE_HEAD: Final = frames.HEAD.pack(ITEMS, 0, 0, 0, 0, -1)
# where the pickle starts in the body of a message of one part
_PICKLE_AT: Final = SIZE.size + frames.HEAD.size


def _encode(items: list[Any]) -> frames.Parts:
    """``frames.encode(items, ITEMS)``, in one ``pickle.dumps`` when nothing goes out of band.

    The same parts as ``frames.encode`` would make (it is used whenever an item is or has a
    large buffer, or plain pickle refuses one), for a fraction of the cost of a small
    message.
    """
    if len(items) <= _SCAN_FIRST and _large_bytes(items):
        return frames.encode(items, ITEMS)  # large bytes travel out of band
    try:
        payload = pickle.dumps(items, 5, buffer_callback=_in_band)
    except Exception:  # _OutOfBand, or what only cloudpickle sends, or the error to report
        return frames.encode(items, ITEMS)
    if len(payload) < frames.OUT_OF_BAND_MIN:
        return [_SMALL_HEAD + payload]  # no large bytes in it, then
    if len(items) > _SCAN_FIRST and _large_bytes(items):
        return frames.encode(items, ITEMS)
    return [_PICKLE_HEAD, payload]


def _in_band(buffer: pickle.PickleBuffer) -> bool:
    with contextlib.suppress(BufferError):  # not contiguous: in band, as frames does
        if buffer.raw().nbytes >= frames.OUT_OF_BAND_MIN:
            raise _OutOfBand  # stop pickling: this one goes out of band
    return True


def _large_bytes(items: list[Any]) -> bool:
    for x in items:  # noqa: SIM110 - a plain loop costs less than any() over a generator
        if type(x) is bytes and len(x) >= frames.OUT_OF_BAND_MIN:
            return True
    return False


class _OutOfBand(Exception):
    """An item has a buffer to send out of band: ``frames.encode`` sends it."""


def _deadline(timeout: float | None) -> float | None:
    timeout = check_timeout(timeout, zero_ok=True)
    if timeout is None:
        return None
    return time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _poll_ms(seconds: float | None) -> int:
    return -1 if seconds is None else max(0, int(seconds * 1000 + 0.999))


def _anonymous_file() -> int:
    """A file in memory with no name: freed when the last descriptor to it closes."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd: int = memfd_create("parallelkit-queue", os.MFD_CLOEXEC)
        return fd
    with tempfile.TemporaryFile() as f:  # portable: an unlinked file
        return os.dup(f.fileno())


class _RecordLock:
    """One byte of the state file as a lock between processes, and between threads.

    A POSIX record lock (``lockf``): the kernel releases it when its holder dies.  Record
    locks belong to a process, so a thread lock keeps this process's threads apart.  Held
    only for a few system calls at a time, so a blocking wait is short; with a deadline,
    a busy lock is tried again after short sleeps.
    """

    def __init__(self, fd: int, byte: int) -> None:
        self.fd = fd
        self.byte = byte
        self.thread_lock = threading.Lock()

    def acquire(self, deadline: float | None) -> bool:
        if deadline is None:
            self.thread_lock.acquire()
        elif not self.thread_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            try:  # the usual case, free: one system call
                fcntl.lockf(self.fd, _LOCK_TRY, 1, self.byte)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if deadline is None:
                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, self.byte)
                    return True
                except OSError as exc:
                    # The kernel sees lock owners as processes: one thread of ours holding
                    # the other lock can look like a cycle that is none.  Try again below.
                    if exc.errno != errno.EDEADLK:
                        raise
            pause = 0.00005
            while deadline is None or time.monotonic() < deadline:
                left = pause if deadline is None else deadline - time.monotonic()
                time.sleep(max(0.0, min(pause, left)))
                if self._try():
                    return True
                pause = min(pause * 2, LOCK_BACKOFF_MAX)
        except BaseException:
            self.thread_lock.release()
            raise
        self.thread_lock.release()
        return False

    def _try(self) -> bool:
        try:
            fcntl.lockf(self.fd, _LOCK_TRY, 1, self.byte)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def release(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.byte)
        self.thread_lock.release()

    def after_fork(self) -> None:
        # the child holds no record lock, and no other thread: the thread lock is free
        self.thread_lock = threading.Lock()


class _Cache:
    """Items of the head message this handle decoded, from ``next`` on not yet handed out."""

    __slots__ = ("count", "id", "items", "next")

    def __init__(self, message_id: int, count: int, items: list[Any], next_index: int) -> None:
        self.id = message_id
        self.count = count
        self.items = items
        self.next = next_index


class _Taken:
    """What a consumer took under the read lock, decoded after releasing it."""

    __slots__ = ("body", "count", "id", "nparts", "start", "stop")

    def __init__(
        self, body: Any, nparts: int, message_id: int, count: int, start: int, stop: int
    ) -> None:
        self.body = body
        self.nparts = nparts
        self.id = message_id
        self.count = count
        self.start = start
        self.stop = stop


def _release(
    views: list[memoryview], state: mmap.mmap, fd: int, sockets: tuple[socket.socket, ...]
) -> None:
    """The finalizer: holds what to free, never the handle."""
    for sock in sockets:
        sock.close()
    for view in views:
        view.release()
    views.clear()
    with contextlib.suppress(BufferError, ValueError):
        state.close()
    with contextlib.suppress(OSError):
        os.close(fd)


_HANDLES: weakref.WeakSet[Queue[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _pid_bits
    _pid_bits = os.getpid() << 32
    for handle in list(_HANDLES):
        handle._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be an int >= 0 (0: no limit), got {maxsize!r}")
        check_positive_int(producers, "producers")
        context = get_context(start_method)
        # producers send on _peer, consumers receive on _sock
        self._sock, self._peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            self._peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        buffer = self._peer.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self._inline_max = max(4096, min(INLINE_MAX, buffer // 4))
        self._bell_r, self._bell_w = context.Pipe(duplex=False)
        os.set_blocking(self._bell_r.fileno(), False)
        os.set_blocking(self._bell_w.fileno(), False)
        fd = _anonymous_file()
        os.ftruncate(fd, STATE_BYTES)
        self._maxsize = maxsize
        self._setup(fd)
        self._words[W_OPEN] = producers

    def _setup(self, fd: int) -> None:
        self._fd = fd
        self._state = mmap.mmap(fd, STATE_BYTES)
        self._words = memoryview(self._state).cast("q")
        self._views = [self._words]
        self._read_lock = _RecordLock(fd, READ_LOCK)
        self._count_lock = _RecordLock(fd, COUNT_LOCK)
        self._cache: _Cache | None = None
        self._closed = False
        self._ended = False
        self._finalizer = weakref.finalize(
            self, _release, self._views, self._state, fd, (self._sock, self._peer)
        )
        _HANDLES.add(self)

    def _after_fork(self) -> None:
        self._read_lock.after_fork()
        self._count_lock.after_fork()

    # -------------------------------------------------------------- sharing

    def __getstate__(self) -> dict[str, Any]:
        # like multiprocessing's queues: shared while a process starts, never pickled later
        assert_spawning(self)
        check_single_host(self)
        return {
            "sock": self._sock,
            "peer": self._peer,
            "bell_r": self._bell_r,
            "bell_w": self._bell_w,
            "fd": reduction.DupFd(self._fd),
            "maxsize": self._maxsize,
            "inline_max": self._inline_max,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._sock = state["sock"]
        self._peer = state["peer"]
        self._bell_r = state["bell_r"]
        self._bell_w = state["bell_w"]
        self._maxsize = state["maxsize"]
        self._inline_max = state["inline_max"]
        self._setup(state["fd"].detach())

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
            parts = _encode(items)
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
            fd = _anonymous_file()
            buffers = [None]
        try:
            if fd is not None:
                _write_all(fd, [sizes, *parts])
            buffers[0] = QHEAD.pack(
                ITEMS, 0 if fd is None else HAS_FD, len(parts), count, _next_id(), body
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

    def _put_message(
        self, buffers: list[Any], fd: int | None, count: int, large: int, deadline: float | None
    ) -> None:
        """Send one datagram when there is room; ``large``: bytes of its file (0: none)."""
        ancillary = (
            [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
        )
        counted = self._maxsize > 0 or large > 0
        words = self._words
        waiting = False
        while True:
            full = False
            if counted:
                if not self._count_lock.acquire(deadline):
                    if waiting:
                        self._stop_waiting()
                    raise TimeoutError(self._no_room())
                try:
                    if waiting:
                        words[W_WAITERS] = max(0, words[W_WAITERS] - 1)
                        waiting = False
                    if self._has_room(count, large):
                        if _fuzz.ENABLED:
                            _fuzz.point("queue.put.before_send")
                        if self._try_send(buffers, ancillary):
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
                if self._try_send(buffers, ancillary):
                    return
            left = _left(deadline)
            if left == 0:
                if waiting:
                    self._stop_waiting()
                raise TimeoutError(self._no_room())
            if full:
                if _fuzz.ENABLED:
                    _fuzz.point("queue.put.wait_room")
                self._wait_for_bell(left)
            else:
                poller = select.poll()
                poller.register(self._peer.fileno(), select.POLLOUT)
                # the socket says "writable" only below a quarter of its buffer; look again
                # now and then in case a datagram that fits would already go
                poller.poll(_poll_ms(ROOM_RECHECK if left is None else min(left, ROOM_RECHECK)))

    def _try_send_now(self, buffers: list[Any]) -> bool:
        """An unbounded queue's small message: nothing to count, send it if it goes."""
        if _fuzz.ENABLED:
            _fuzz.point("queue.put.before_send")
        return self._try_send(buffers, [])

    def _try_send(self, buffers: list[Any], ancillary: list[Any]) -> bool:
        try:
            self._peer.sendmsg(buffers, ancillary, _SEND_FLAGS)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # some systems say so for a full buffer
                return False
            raise
        return True

    def _has_room(self, count: int, large: int) -> bool:
        words = self._words
        if self._maxsize:  # the bound the user chose; large items count as one each
            return max(0, words[W_SENT] - words[W_TAKEN]) + count <= self._maxsize
        held = words[W_LARGE]
        return not large or held <= 0 or held + large <= UNBOUNDED_LARGE_BYTES

    def _no_room(self) -> str:
        if self._maxsize:
            return f"no room in the queue within the timeout (maxsize {self._maxsize})"
        return "no room in the queue within the timeout (its buffer is full)"

    def _wait_for_bell(self, left: float | None) -> None:
        poller = select.poll()
        poller.register(self._bell_r.fileno(), select.POLLIN)
        # a ring meant for another waiter may be taken by this one: look again now and then
        if poller.poll(_poll_ms(ROOM_RECHECK if left is None else min(left, ROOM_RECHECK))):
            with contextlib.suppress(BlockingIOError):
                os.read(self._bell_r.fileno(), 64)

    def _stop_waiting(self) -> None:
        self._count_lock.acquire(None)
        try:
            self._words[W_WAITERS] = max(0, self._words[W_WAITERS] - 1)
        finally:
            self._count_lock.release()

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
        # to find it empty posts the end again (see _take_locked).
        with contextlib.suppress(OSError):
            self._peer.send(QHEAD.pack(END, 0, 0, 0, 0, 0), _SEND_FLAGS)

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
        if self._ended:
            raise QueueClosedError(_CLOSED)
        while True:
            if not self._read_lock.acquire(deadline):
                raise TimeoutError("nothing could be taken from the queue within the timeout")
            try:
                if _fuzz.ENABLED:
                    _fuzz.point("queue.get.locked")
                taken = self._take_locked(limit)
            finally:
                self._read_lock.release()
            if isinstance(taken, list):
                return taken
            if taken is not None:
                return self._decode(taken)
            left = _left(deadline)
            if left == 0:
                raise TimeoutError("nothing arrived on the queue within the timeout")
            if _fuzz.ENABLED:
                _fuzz.point("queue.get.wait")
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN)
            poller.poll(_poll_ms(left))

    def _take_locked(self, limit: int | None) -> list[T] | _Taken | None:
        """Take up to ``limit`` items of the head message (the read lock held).

        Returns the items (from this handle's cache), what to decode, or ``None`` when
        the queue is empty.
        """
        words = self._words
        cache = self._cache
        head_id, cursor = words[W_HEAD_ID], words[W_HEAD_CURSOR]
        if cache is not None:
            if cache.id == head_id and cache.next == cursor:
                stop = cache.count if limit is None else min(cache.count, cursor + limit)
                if stop < cache.count:  # the usual case, inlined: not the last items
                    if self._maxsize:
                        self._account(stop - cursor, 0)
                    words[W_HEAD_CURSOR] = stop
                    cache.next = stop
                    return cache.items[cursor:stop]
                self._commit(head_id, cache.count, stop)
                items = cache.items[cursor:stop]
                cache.next = stop
                if stop == cache.count:
                    self._cache = None
                return items
            self._cache = None
        ended = words[W_ENDED]  # before looking: all items were sent before it was set
        while True:
            try:
                head = self._sock.recv(QHEAD.size, _PEEK)
            except BlockingIOError:
                if ended:
                    self._post_end()  # for consumers still waiting
                    self._ended = True
                    raise QueueClosedError(
                        "every producer closed the queue, and it is empty"
                    ) from None
                return None
            kind, flags, nparts, count, message_id, body = QHEAD.unpack(head)
            if kind == END:  # left in the socket for every other consumer
                self._ended = True
                raise QueueClosedError(_CLOSED)
            start = cursor if message_id == head_id else 0
            if start >= count:  # taken whole by a consumer that died before removing it
                self._remove(flags, body)
                words[W_HEAD_ID] = 0
                head_id = 0
                continue
            stop = count if limit is None else min(count, start + limit)
            if start == 0 and stop == count:
                if not flags & HAS_FD and body < frames.OUT_OF_BAND_MIN:  # _receive, inlined
                    if self._maxsize:
                        self._account(count, 0)
                    data = memoryview(self._sock.recv(QHEAD.size + body, _NOWAIT))
                    return _Taken(data[QHEAD.size :], nparts, message_id, count, 0, count)
                data = self._receive(flags, body, account=count)
                return _Taken(data, nparts, message_id, count, 0, count)
            data = self._receive(flags, body, peek=True)
            if _fuzz.ENABLED:
                _fuzz.point("queue.get.before_commit")
            self._commit(message_id, count, stop, flags=flags, body=body)
            return _Taken(data, nparts, message_id, count, start, stop)

    def _commit(
        self,
        message_id: int,
        count: int,
        stop: int,
        *,
        flags: int | None = None,
        body: int = 0,
    ) -> None:
        """Mark items up to ``stop`` of the head message taken; remove it once all are."""
        words = self._words
        start = words[W_HEAD_CURSOR] if words[W_HEAD_ID] == message_id else 0
        if stop == count:
            if flags is None:  # from the cache: what the socket holds, look again
                head = self._sock.recv(QHEAD.size, _PEEK)
                _, flags, _, _, _, body = QHEAD.unpack(head)
            self._account(stop - start, body if flags & HAS_FD else 0)
            words[W_HEAD_CURSOR] = count  # a consumer killed now leaves it taken, not lost
            words[W_HEAD_ID] = message_id
            self._remove(flags, body)
            words[W_HEAD_ID] = 0
        else:
            self._account(stop - start, 0)
            words[W_HEAD_CURSOR] = stop
            words[W_HEAD_ID] = message_id  # last: the cursor belongs to this message

    def _account(self, count: int, large: int) -> None:
        """Free room for ``count`` items and ``large`` bytes; ring for waiting producers."""
        if not (self._maxsize or large):
            return
        words = self._words
        self._count_lock.acquire(None)
        try:
            if self._maxsize:
                words[W_TAKEN] += count
            if large:
                words[W_LARGE] = max(0, words[W_LARGE] - large)
            waiters = words[W_WAITERS]
            if waiters:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._bell_w.fileno(), b"\0" * min(waiters, 64))
        finally:
            self._count_lock.release()

    def _receive(self, flags: int, body: int, *, account: int = 0, peek: bool = False) -> Any:
        """The head message's body (removed from the socket unless ``peek``)."""
        if not peek:
            self._account(account, body if flags & HAS_FD else 0)
        how = _PEEK if peek else _NOWAIT
        if not flags & HAS_FD and body < frames.OUT_OF_BAND_MIN:
            # small: no out-of-band buffer in it, and a fresh buffer costs less than the reuse
            return memoryview(self._sock.recv(QHEAD.size + body, how))[QHEAD.size :]
        if not flags & HAS_FD:
            # into this thread's reused buffer (a fresh one per message costs page faults);
            # _decode copies out what outlives it
            scratch = _scratch(QHEAD.size + body)
            self._sock.recvmsg_into([scratch], 0, how)
            return scratch[QHEAD.size : QHEAD.size + body]
        _, ancillary, _, _ = self._sock.recvmsg(QHEAD.size, _FD_SPACE, how)
        fds = _fds(ancillary)
        if not fds:
            raise OSError(
                errno.EMFILE,
                "a large message of the queue could not be received: this process has too "
                f"many open files{'' if peek else ' (the message is lost)'}",
            )
        try:
            buffer = bytearray(body)
            _read_all(fds[0], memoryview(buffer))
        finally:
            for fd in fds:
                os.close(fd)
        return memoryview(buffer)

    def _remove(self, flags: int, body: int) -> None:
        """Drop the head datagram (its items are all taken)."""
        ancillary_space = _FD_SPACE if flags & HAS_FD else 0
        _, ancillary, _, _ = self._sock.recvmsg(1, ancillary_space, _NOWAIT)
        for fd in _fds(ancillary):
            os.close(fd)

    def _decode(self, taken: _Taken) -> list[T]:
        body = taken.body
        items: list[T]
        if taken.nparts == 1:
            # a pickle alone (frames.decode's first case, inlined): the header says no
            # out-of-band buffer, and there is none to copy out of a reused buffer
            items = pickle.loads(body[_PICKLE_AT:])
        else:
            items = frames.decode(self._parts(body, taken.nparts))
        if taken.stop < taken.count:
            self._cache = _Cache(taken.id, taken.count, items, taken.stop)
        if taken.start == 0 and taken.stop == len(items):
            return items
        return items[taken.start : taken.stop]

    @staticmethod
    def _parts(body: memoryview, nparts: int) -> list[Any]:
        sizes = struct.unpack_from(f"<{nparts}Q", body)
        offset = SIZE.size * nparts
        parts: list[Any] = []
        for size in sizes:
            parts.append(body[offset : offset + size])
            offset += size
        if isinstance(body.obj, bytearray) and body.obj is getattr(_scratch_local, "buffer", None):
            # the buffers an object is rebuilt on must be its own, not the reused buffer's
            nbuf = frames.HEAD.unpack_from(parts[0])[5]
            first = 1 if nbuf >= 0 else 2
            nbuf = nbuf if nbuf >= 0 else -1 - nbuf
            for i in range(nbuf):
                _, writable = frames.SPEC.unpack_from(
                    parts[0], frames.HEAD.size + frames.SPEC.size * i
                )
                raw = parts[first + i]
                parts[first + i] = bytearray(raw) if writable else bytes(raw)
        return parts

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


_scratch_local = threading.local()


def _scratch(nbytes: int) -> memoryview:
    """This thread's reused receive buffer, at least ``nbytes`` long."""
    buffer: bytearray | None = getattr(_scratch_local, "buffer", None)
    if buffer is None or len(buffer) < nbytes:
        buffer = _scratch_local.buffer = bytearray(max(nbytes, 256 * 1024))
    return memoryview(buffer)


def _fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds


def _write_all(fd: int, buffers: list[Any]) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        n = os.writev(fd, views[:512])
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                del views[0]
            else:
                views[0] = views[0][n:]
                n = 0
        while views and not len(views[0]):
            del views[0]


def _read_all(fd: int, view: memoryview) -> None:
    offset = 0
    while offset < len(view):
        n = os.preadv(fd, [view[offset:]], offset)
        if n == 0:
            raise EOFError("a large message of the queue ended early")
        offset += n
