"""The workers' progress slots: int64 words in memory shared between the parent and its
workers, one cache line per worker.  A worker writes where it is (the item it runs, or a
phase); the parent reads them to name the item a dead or late worker was on, to time items
out, and to report progress and stalls."""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any, Final

from parallelkit import _platform

# progress slot layout (int64 words, one cache line per worker)
SLOT_WORDS: Final = 8
POS: Final = 0  # position in the chunk of the item being run, or one of:
POS_STARTING: Final = -1  # not yet ready for work (start-up, initializer)
POS_RECEIVING: Final = -2  # unpickling a chunk
POS_SENDING: Final = -3  # pickling and sending a chunk's results
POS_UNTRACKED: Final = -4  # running tiny items without noting each one (see _run_chunk)
STARTED_NS: Final = 1  # time.monotonic_ns() when the chunk was taken, then (TIMED) each item
DUMP_FD: Final = 2  # the worker's stack-dump file descriptor (see arm_stack_dump), or -1
# the id of the last chunk the worker has received whole (0: none yet): a worker that dies
# before its chunk's id is here never had it, and the chunk is not to blame
TAKEN: Final = 3


class ProgressSlots:
    """The workers' progress slots: int64 words in memory shared with them.

    Under fork, an anonymous shared mapping the workers inherit.  Otherwise an anonymous file
    (``_platform.anonymous_file``): a child
    receives a copy of its descriptor as it is started (pickled as multiprocessing's
    ``DupFd``, as a ``RawArray``'s arena is) and maps it -- without the ctypes and
    ``multiprocessing.heap`` imports a ``RawArray`` would cost each spawn worker.
    :attr:`for_child` is what to pass a worker; :attr:`mm` is the parent's mapping.
    """

    def __init__(self, words: int, *, inherited: bool) -> None:
        self.size = max(8 * words, mmap.PAGESIZE)
        self.fd = -1
        if inherited:
            self.mm = mmap.mmap(-1, self.size)  # MAP_SHARED | MAP_ANONYMOUS
        else:
            self.fd = _platform.anonymous_file("parallelkit-progress")
            try:
                os.ftruncate(self.fd, self.size)
                self.mm = mmap.mmap(self.fd, self.size)
            except BaseException:
                os.close(self.fd)
                raise
        self.for_child: Any = self.mm if inherited else self

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction  # noqa: PLC0415 - only while starting a child

        return (_attach_slots, (reduction.DupFd(self.fd), self.size))

    def close(self) -> None:
        """Close the descriptor and the mapping (which holds a descriptor of its own)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(BufferError):  # a view still open: it goes with the view
            self.mm.close()


def _attach_slots(dup: Any, size: int) -> mmap.mmap:
    fd = dup.detach()
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)
