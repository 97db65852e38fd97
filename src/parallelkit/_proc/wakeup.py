"""The wake-up pipe: how a thread wakes another that waits on its children's pipes.

A thread that supervises child processes waits in ``poll`` / ``wait`` on their pipes and
sentinels; another thread (a caller submitting work, a pipeline's source thread, a
progress watcher) writes a byte to this pipe to make that wait return.  Used by the map
engine and by a pipeline run.
"""

from __future__ import annotations

import contextlib
import os
import threading


class WakeUpPipe:
    """A pipe a thread writes a byte to, to wake the thread waiting on :attr:`fd`.

    Closed under a lock, so that a thread that wakes the waiter after it closed the pipe
    (a source thread returning from the user's ``next()``, a late ``submit``) never writes
    to a descriptor number the process has given to something else meanwhile.
    """

    __slots__ = ("_closed", "_lock", "_write_fd", "fd")

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        """Make :attr:`fd` readable (a no-op once closed)."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending
                    os.write(self._write_fd, b"\0")

    def drain(self) -> None:
        """Take the pending wake-ups (after a wait said :attr:`fd` is readable)."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # another thread drained it
                    os.read(self.fd, 4096)

    def close(self) -> None:
        """Close both ends; idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
                os.close(self._write_fd)
