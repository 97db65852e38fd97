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
