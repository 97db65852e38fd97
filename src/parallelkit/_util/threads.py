"""Threads of ours: they block every asynchronous signal, so Ctrl-C stays the main thread's."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Final

# Asynchronous signals, which Python handles in the main thread only.  A thread of ours
# blocks them all (see Engine.submit_future): a process-directed SIGINT that the kernel
# gave to it would be noted, but the main thread, asleep in a lock, would not wake to
# raise KeyboardInterrupt until something else woke it.  Children it starts inherit the
# mask (across exec too): bootstrap() unblocks them.
THREAD_BLOCKED: Final = frozenset(signal.valid_signals()) - {
    signal.SIGKILL,
    signal.SIGSTOP,
    # synchronous: raised by the faulting thread itself, must stay deliverable
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
    signal.SIGABRT,
    signal.SIGPIPE,
}


def quiet_thread(
    target: Callable[..., object], *, name: str, args: tuple[object, ...] = ()
) -> threading.Thread:
    """A daemon thread of ours (not started) that first blocks every asynchronous signal
    (see THREAD_BLOCKED).  It blocks them itself: the starting thread's mask is never
    touched, so a Ctrl-C at any moment cannot leave the main thread with signals blocked."""

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, THREAD_BLOCKED)
        target(*args)

    return threading.Thread(target=run, name=name, daemon=True)


class Mutex:
    """A non-reentrant lock that knows exactly whether the calling thread holds it.

    A Ctrl-C is raised in the main thread between two bytecodes, which can be right after
    an ``acquire()`` or a ``release()`` returned, before the code that records it runs: code
    that releases a lock around a wait (``release(); try: wait() finally: acquire()``) can
    then unwind holding it or not.  The owner of an ``RLock`` is set in C together with the
    lock, so :meth:`held` is exact at any moment, and :meth:`hold` restores the state an
    exception handler needs.  Re-entry is refused, as a plain ``Lock`` would deadlock (or, not
    blocking, fail): a caller that tries the lock from inside a section it already holds
    (garbage collection running a finalizer) is told it is busy.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def held(self) -> bool:
        """Whether the calling thread holds the lock."""
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]  # C, not in typeshed

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock._is_owned():  # type: ignore[attr-defined]  # see held()
            if not blocking:
                return False
            raise RuntimeError("parallelkit: Mutex.acquire() by the thread that holds it")
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def hold(self) -> None:
        """Acquire unless the calling thread holds the lock already; a KeyboardInterrupt
        while waiting for it is dropped (the caller is unwinding from one already)."""
        while not self._lock._is_owned():  # type: ignore[attr-defined]  # see held()
            try:
                self._lock.acquire()
            except KeyboardInterrupt:
                continue

    def __enter__(self) -> bool:
        try:
            return self.acquire()
        except BaseException:  # a Ctrl-C as acquire() returned: the block will not run
            if self.held():
                self._lock.release()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.release()
