"""A Queue's shared state: one page every process maps, its two record locks, the doorbell.

The page (words of 8 bytes)::

    word 0  head id        the message whose items are partly taken (0: none)
    word 1  head cursor    how many of its items are taken
    word 2  open           producers that have not closed yet
    word 3  ended          1 once the last producer closed
    word 4  sent           items put (counted with maxsize only)
    word 5  taken          items taken (counted with maxsize only)
    word 6  waiters        producers waiting for room (they want the doorbell rung)
    word 7  large          bytes of large messages in the queue

The two locks (consumers' ``READ``, counters' ``COUNT``) are POSIX record locks on a byte
of the page's file each, held for a few system calls at a time; the kernel releases them
when their holder dies, however it dies.  Producers waiting for room hold nothing: they
count themselves in ``waiters`` and wait on the doorbell pipe, which whoever frees room
rings.  Who reads and writes which word is the business of ``queue.py`` (producers,
``close``) and ``cursor.py`` (consumers).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import select
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import Final

from parallelkit import _platform

W_HEAD_ID, W_HEAD_CURSOR, W_OPEN, W_ENDED, W_SENT, W_TAKEN, W_WAITERS, W_LARGE = range(8)
STATE_BYTES: Final = mmap.PAGESIZE
READ_LOCK: Final = 0  # byte of the state file: consumers taking from the head
COUNT_LOCK: Final = 1  # byte of the state file: the counters and the producers' room
UNBOUNDED_LARGE_BYTES: Final = 64 << 20  # bytes of large messages an unbounded queue holds
ROOM_RECHECK: Final = 0.05  # seconds: a producer waiting for room looks again at least this often
LOCK_BACKOFF_MAX: Final = 0.002  # seconds between tries of a busy lock, at most

_LOCK_TRY: Final = fcntl.LOCK_EX | fcntl.LOCK_NB


def anonymous_file() -> int:
    """A file in memory with no name: freed when the last descriptor to it closes."""
    return _platform.anonymous_file("parallelkit-queue")


def poll_ms(seconds: float | None) -> int:
    """``seconds`` (``None``: for ever) as ``poll``'s timeout, rounded up."""
    return -1 if seconds is None else max(0, int(seconds * 1000 + 0.999))


class RecordLock:
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


class State:
    """One handle's map of the shared page, its locks, and the doorbell; the room rules.

    ``maxsize`` (0: unbounded) decides what is counted: with a bound, items put and taken;
    without, only the bytes of large messages (``UNBOUNDED_LARGE_BYTES`` at most).
    """

    def __init__(self, fd: int, bell_r: Connection, bell_w: Connection, maxsize: int) -> None:
        self.fd = fd
        self.bell_r = bell_r
        self.bell_w = bell_w
        self.maxsize = maxsize
        self.page = mmap.mmap(fd, STATE_BYTES)
        self.words = memoryview(self.page).cast("q")
        self.views = [self.words]
        self.read_lock = RecordLock(fd, READ_LOCK)
        self.count_lock = RecordLock(fd, COUNT_LOCK)
        _STATES.add(self)

    @classmethod
    def create(cls, bell_r: Connection, bell_w: Connection, maxsize: int) -> State:
        """A new page (all words 0)."""
        os.set_blocking(bell_r.fileno(), False)
        os.set_blocking(bell_w.fileno(), False)
        fd = anonymous_file()
        os.ftruncate(fd, STATE_BYTES)
        return cls(fd, bell_r, bell_w, maxsize)

    def after_fork(self) -> None:
        self.read_lock.after_fork()
        self.count_lock.after_fork()

    def has_room(self, count: int, large: int) -> bool:
        """Whether ``count`` items with ``large`` bytes in files fit (the count lock held)."""
        words = self.words
        if self.maxsize:  # the bound the user chose; large items count as one each
            return max(0, words[W_SENT] - words[W_TAKEN]) + count <= self.maxsize
        held = words[W_LARGE]
        return not large or held <= 0 or held + large <= UNBOUNDED_LARGE_BYTES

    def no_room(self) -> str:
        """What a producer's ``TimeoutError`` says."""
        if self.maxsize:
            return f"no room in the queue within the timeout (maxsize {self.maxsize})"
        return "no room in the queue within the timeout (its buffer is full)"

    def account(self, count: int, large: int) -> None:
        """Free room for ``count`` items and ``large`` bytes; ring for waiting producers."""
        if not (self.maxsize or large):
            return
        words = self.words
        self.count_lock.acquire(None)
        try:
            if self.maxsize:
                words[W_TAKEN] += count
            if large:
                words[W_LARGE] = max(0, words[W_LARGE] - large)
            waiters = words[W_WAITERS]
            if waiters:
                with contextlib.suppress(BlockingIOError):
                    os.write(self.bell_w.fileno(), b"\0" * min(waiters, 64))
        finally:
            self.count_lock.release()

    def wait_for_bell(self, left: float | None) -> None:
        poller = select.poll()
        poller.register(self.bell_r.fileno(), select.POLLIN)
        # a ring meant for another waiter may be taken by this one: look again now and then
        if poller.poll(poll_ms(ROOM_RECHECK if left is None else min(left, ROOM_RECHECK))):
            with contextlib.suppress(BlockingIOError):
                os.read(self.bell_r.fileno(), 64)

    def stop_waiting(self) -> None:
        self.count_lock.acquire(None)
        try:
            self.words[W_WAITERS] = max(0, self.words[W_WAITERS] - 1)
        finally:
            self.count_lock.release()


def release(views: list[memoryview], page: mmap.mmap, fd: int) -> None:
    """Unmap and close a handle's state (from its finalizer: holds nothing of the handle)."""
    for view in views:
        view.release()
    views.clear()
    with contextlib.suppress(BufferError, ValueError):
        page.close()
    with contextlib.suppress(OSError):
        os.close(fd)


_STATES: weakref.WeakSet[State] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for state in list(_STATES):
        state.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
