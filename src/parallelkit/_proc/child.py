"""What every parallelkit child process runs first, whatever its role.

:func:`bootstrap` prepares any child (pool worker, pipeline stage, channel server): it
ignores SIGINT (the parent handles Ctrl-C and tears everything down), exits when the
parent dies (no orphans, even when the parent is SIGKILLed) and runs the user's
initializer.  :func:`arm_stack_dump` lets the parent read a stalled child's stacks;
:func:`exit_without_teardown` ends a spawned child quickly.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Final, NoReturn

from parallelkit._util.threads import THREAD_BLOCKED

STACK_FILE_NAME: Final = "parallelkit-stacks"

# exit codes of a worker that decided to stop
EXIT_PARENT_DIED: Final = 70
EXIT_INIT_FAILED: Final = 71
EXIT_MAIN_GUARD: Final = 72
EXIT_INTERRUPTED: Final = 73  # a Ctrl-C reached us before we could ignore it (forkserver)


def _find_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes  # noqa: PLC0415 - see below

        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


# Looked up once, at import: fork and forkserver children inherit it instead of each opening
# libc again.  Not in a spawn child (multiprocessing is unpickling what it runs when it
# imports us): importing ctypes there costs more than the watcher thread that does the job.
_prctl = None if getattr(multiprocessing.current_process(), "_inheriting", False) else _find_prctl()
PR_SET_PDEATHSIG: Final = 1


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL us when the thread that created us exits; False if we cannot
    (or, in a spawn child, would rather not load ctypes for it)."""
    if _prctl is None:
        return False
    try:
        return _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except Exception:  # a libc without prctl: the watcher thread does it
        return False


def _watch_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(EXIT_PARENT_DIED)


def bootstrap(
    *,
    parent_pid: int,
    pdeathsig: bool,
    initializer: Callable[..., object] | None,
    initargs: Sequence[object],
) -> None:
    """Prepare a parallelkit child process; raises whatever the initializer raises.

    When we are to die with our parent: ``PR_SET_PDEATHSIG`` where the kernel can tie us to
    it (``parent_pid`` is our parent: fork and spawn, started from the main thread), and a
    thread waiting on the parent's sentinel otherwise (forkserver, whose children's parent
    is the server; other platforms).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the parent blocked SIGINT while it started us (see Engine._start_worker), or more
    # (a thread of ours started us: see THREAD_BLOCKED)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, THREAD_BLOCKED)
    tied = _set_parent_death_signal() if pdeathsig else False
    parent = multiprocessing.parent_process()
    if not (tied and parent_pid) and parent is not None and parent.sentinel is not None:
        threading.Thread(
            target=_watch_parent,
            args=(parent.sentinel,),
            name="parallelkit-parent-watch",
            daemon=True,
        ).start()
    if parent_pid and os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_DIED)  # the parent died before we got here (or before prctl)
    if initializer is not None:
        initializer(*initargs)


def arm_stack_dump() -> int:
    """Dump every thread's stack to an anonymous in-memory file on SIGUSR1; its fd, or -1.

    The parent reads the file through ``/proc/<pid>/fd/<fd>`` when a run stalls (see
    :mod:`parallelkit._observe.stalls`).  faulthandler writes from its C signal handler, so this
    works while the worker blocks in C code or spins in Python.  Nothing is on disk and the
    file goes away with the process.
    """
    previous = signal.getsignal(signal.SIGUSR1)
    chain = callable(previous)  # an initializer's own handler still runs, after the dump
    if not chain:  # until the dump is armed, a SIGUSR1 is dropped rather than fatal
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        fd = os.memfd_create(STACK_FILE_NAME, os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux
        if previous is not None:
            signal.signal(signal.SIGUSR1, previous)
        return -1
    faulthandler.register(signal.SIGUSR1, file=fd, all_threads=True, chain=chain)
    return fd


def refuse_to_start_in_bootstrap() -> NoReturn:
    """We are a spawn/forkserver child importing the parent's ``__main__``, which starts work.

    Starting processes here would fail (and each child would print a traceback); exit with a
    code the parent recognises, after one line that says what to do.  In the forkserver,
    importing the main module once for all its children (``_forkserver_main``), raise
    instead: the server goes on, and each child meets the same code and exits here.
    """
    server = sys.modules.get("parallelkit._proc.forkserver_main")
    if server is not None and getattr(server, "importing_main", False):
        raise RuntimeError("parallel work started while the forkserver imports __main__")
    sys.stderr.write(
        "parallelkit: this process was started to run tasks, but importing the main module "
        'started parallel work again; guard it with `if __name__ == "__main__":`\n'
    )
    sys.stderr.flush()
    os._exit(EXIT_MAIN_GUARD)


def exit_without_teardown() -> None:
    """End a spawned worker the way the interpreter would, minus tearing down its modules.

    A spawned worker that returns goes through ``sys.exit`` and the whole interpreter
    finalization, several times slower from its last message to its exit than this way
    (``docs/performance.md``) -- time every one-shot map under spawn waits for. What a
    program may rely on still happens, in the interpreter's order: non-daemon threads are
    joined, ``atexit`` handlers run (multiprocessing's own finalizers among them), standard
    streams are flushed.  (fork and forkserver children already end with ``os._exit`` in
    multiprocessing, which runs their own ``atexit`` handlers first from Python 3.13
    (gh-83856) and none before; this is not for them: before 3.13 a forked worker's
    handlers are the parent's, which must not run here.)
    """
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None:  # pragma: no cover - another Python: exit the usual way
        return
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and not thread.daemon:
            with contextlib.suppress(RuntimeError):
                thread.join()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(0)
