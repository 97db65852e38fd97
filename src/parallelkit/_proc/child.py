"""The one child main every parallelkit child process runs, whatever its role.

:func:`child_main` is the target of every child (pool worker, pipeline stage, channel
server; started by :func:`parallelkit._proc.lifecycle.start_child`)::

    close our copy of the parent's end (fork)
    bootstrap: SIGINT ignored, die with the parent, may start children of its own,
               who we are (worker_info), the user's initializer
    load the function (unpickled, or inherited through fork)     ─┐ a failure: one start-up
                                                                  ─┘ failure, exit 71
    arm the stack dump (the parent reads a stalled child's stacks)
    run the role's loop: loop(conn, fn, dump_fd, *args)
    the loop returned (told to stop): the exit hooks (the user's finalizer)
    spawn: exit without the interpreter's teardown

The role's loop lives in its capability package (``_map.worker``, ``_pipeline.stage``,
``_channel.process``) and arrives as a module-level function: pickled by reference, so a
spawned child imports exactly the role it runs, and this layer imports none of them.
A start-up failure travels as one record (:func:`startup_failure`), carried by the role's
transport (``report``) and turned back into an exception by :func:`startup_error`.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

from parallelkit import _platform
from parallelkit._proc import identity as _identity
from parallelkit._util import fuzz as _fuzz
from parallelkit._util import timeline as _timeline
from parallelkit._util.threads import THREAD_BLOCKED

if TYPE_CHECKING:
    from parallelkit._wire.codec import ExceptionRecord

STACK_FILE_NAME: Final = "parallelkit-stacks"

# exit codes of a worker that decided to stop
EXIT_PARENT_DIED: Final = 70
EXIT_INIT_FAILED: Final = 71
EXIT_MAIN_GUARD: Final = 72
EXIT_INTERRUPTED: Final = 73  # a Ctrl-C reached us before we could ignore it (forkserver)

# what failed while a child started (the phase of a start-up failure)
INITIALIZER: Final = "initializer"
FUNCTION: Final = "function"

# (phase, what the child captured): what a child that could not start tells its parent
StartupFailure = tuple[str, "ExceptionRecord"]


# Looked up once, at import: fork and forkserver children inherit it instead of each opening
# libc again.  Not in a spawn child (multiprocessing is unpickling what it runs when it
# imports us): importing ctypes there costs more than the watcher thread that does the job.
_prctl = (
    None
    if getattr(multiprocessing.current_process(), "_inheriting", False)
    else _platform.find_prctl()
)
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


def _watch_parent(sentinel: int, parent_pid: int) -> None:
    """Exit when the parent (``parent_pid``) has died: its sentinel, our end of a pipe whose
    other end only the parent holds, reads EOF.

    A task may close the sentinel under us (``os.closerange``, a daemonising library) or
    put another file at its number.  Then the wake-up says nothing about the parent, and we
    watch on by asking the kernel each second whether the parent is still there (the
    parent's deadline stops us if it gave up on us: ``lifecycle.stop_processes``).
    """
    tied = os.getppid() == parent_pid  # it started us: fork or spawn
    ours = None
    with contextlib.suppress(OSError):
        ours = _file_identity(sentinel)
        multiprocessing.connection.wait([sentinel])
    with contextlib.suppress(OSError):
        if ours is not None and _file_identity(sentinel) == ours:
            os._exit(EXIT_PARENT_DIED)
    while (os.getppid() == parent_pid) if tied else _exists(parent_pid):
        time.sleep(1.0)
    os._exit(EXIT_PARENT_DIED)


def _file_identity(fd: int) -> tuple[int, int]:
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


def _exists(pid: int) -> bool:
    """Whether process ``pid`` exists (our parent when it did not start us itself: the
    forkserver did; an exited parent not yet reaped by its own parent counts as there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, under another user
        return True
    return True


def bootstrap(
    *,
    parent_pid: int,
    pdeathsig: bool,
    initializer: Callable[..., object] | None,
    initargs: Sequence[object],
    identity: _identity.Identity | None = None,
) -> None:
    """Prepare a parallelkit child process; raises whatever the initializer raises.

    The child may start processes of its own (nested parallelism, ``docs/nesting.md``):
    multiprocessing refuses children to a daemonic process because they would outlive it,
    and ours do not -- every child parallelkit starts dies with its parent, as this one
    does.  ``identity``: what :func:`parallelkit.worker_info` answers here.

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
            args=(parent.sentinel, parent.pid),
            name="parallelkit-parent-watch",
            daemon=True,
        ).start()
    if parent_pid and os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_DIED)  # the parent died before we got here (or before prctl)
    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]  # see above
    _forget_inherited_forkserver()
    if identity is not None:
        _identity.become(identity)
    if initializer is not None:
        initializer(*initargs)


def _forget_inherited_forkserver() -> None:
    """A forked child inherits its parent's record of the forkserver, which multiprocessing
    checks with ``waitpid`` (not our child: ``ChildProcessError``); work this child starts
    under forkserver gets a server of its own, which ends with this child."""
    server = getattr(sys.modules.get("multiprocessing.forkserver"), "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is None:
        return
    with contextlib.suppress(OSError, TypeError):
        os.close(server._forkserver_alive_fd)
    server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None


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
        fd = _platform.anonymous_file(STACK_FILE_NAME)
    except OSError:
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


def main_guard_note(start_method: str | None = None) -> str:
    """What a parent says of a child that exited with :data:`EXIT_MAIN_GUARD`."""
    workers = "the workers" if start_method is None else f"{start_method!r} workers"
    return (
        "could not start: the main module starts parallel work when it is imported, and "
        f"{workers} import it again. Put the code that starts the work under "
        '`if __name__ == "__main__":`'
    )


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


def child_main(  # noqa: PLR0912 - the one child main: each step of a child's life in order
    sigint_ignored: object,
    loop: Callable[..., object],
    conn: Any,
    args: tuple[object, ...],
    *,
    parent_pid: int,
    pdeathsig: bool,
    parent_end: Any = None,
    init_payload: bytes | None = None,
    fn: Callable[..., object] | None = None,
    fn_payload: bytes | None = None,
    report: Callable[[Any, StartupFailure], object] | None = None,
    fast_exit: bool = False,
    log_sock: Any = None,
    log_levels: Any = None,
    log_parent_end: Any = None,
    identity: _identity.Identity | None = None,
) -> None:
    """The target of every parallelkit child process (see the module docstring).

    Args:
        sigint_ignored: ``lifecycle.SigintIgnored()``, which ignored SIGINT in this child
            as it was unpickled (forkserver, spawn); unused here.
        loop: the role's loop, a module-level function: ``loop(conn, fn, dump_fd, *args)``.
        conn: the child's end of its connection to the parent.
        args: the loop's further arguments.
        parent_pid: see :func:`bootstrap` (``lifecycle.bootstrap_options``).
        pdeathsig: see :func:`bootstrap`.
        parent_end: fork: our copy of the parent's end, closed first (else the child
            would keep its own connection open, and never see the parent hang up).
        init_payload: the pickled ``(initializer, initargs, finalizer, finalargs)``, or
            ``None``; the finalizer runs when the loop returns (not when the child is
            killed: see :func:`parallelkit._proc.identity.run_exit_hooks`).
        fn: the role's function, inherited through fork; or ``fn_payload``, pickled.
        fn_payload: see ``fn``.
        report: sends a start-up failure to the parent over ``conn``, the role's way;
            ``None``: the parent learns of it from the exit code only.
        fast_exit: a spawned child: end without the interpreter's teardown.
        log_sock: the child's end of its log socket: its records go to the parent
            (:mod:`parallelkit._proc.logs`), from before the initializer on; ``None``:
            logging is left as the child finds it.
        log_levels: the parent's logger levels (``logs.current_levels``) with ``log_sock``.
        log_parent_end: fork: our copy of the parent's end of the log socket, closed.
        identity: what :func:`parallelkit.worker_info` answers in the child.
    """
    if _timeline.ENABLED:
        _timeline.stamp("child.main")
    if parent_end is not None:
        parent_end.close()  # close, don't shut down: the parent still uses its own
    if log_parent_end is not None:
        log_parent_end.close()
    phase = INITIALIZER
    try:
        if log_sock is not None:
            from parallelkit._proc import logs  # noqa: PLC0415 - only when records go up

            logs.install(log_sock, log_levels)
        initializer, initargs, finalizer, finalargs = (
            (None, (), None, ()) if init_payload is None else pickle.loads(init_payload)
        )
        bootstrap(
            parent_pid=parent_pid,
            pdeathsig=pdeathsig,
            initializer=initializer,
            initargs=initargs,
            identity=identity,
        )
        if finalizer is not None:
            _identity.at_worker_exit(lambda: finalizer(*finalargs))
        phase = FUNCTION
        if fn_payload is not None:
            fn = pickle.loads(fn_payload)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) and signal.getsignal(signal.SIGINT) is not (
            signal.SIG_IGN
        ):
            # A Ctrl-C that came before bootstrap() ignored SIGINT (a forkserver child is
            # not started with it blocked): not a failure of ours.  Exit like a child
            # killed at start-up.
            os._exit(EXIT_INTERRUPTED)
        if report is not None:
            with contextlib.suppress(Exception):  # the parent gone: nobody to tell
                report(conn, startup_failure(phase, exc))
        os._exit(EXIT_INIT_FAILED)
    if _fuzz.ENABLED:
        _fuzz.point("child.before_loop")
    loop(conn, fn, arm_stack_dump(), *args)
    if _fuzz.ENABLED:  # the parent waits for the exit hooks as for the exit itself
        _fuzz.point("child.before_exit_hooks")
    _identity.run_exit_hooks()
    if _timeline.ENABLED:
        cpu = os.times()
        _timeline.stamp(f"child.exit (cpu {(cpu.user + cpu.system) * 1e3:.1f} ms)")
    if fast_exit:
        exit_without_teardown()


def startup_failure(phase: str, exc: BaseException) -> StartupFailure:
    """What a child that could not start sends its parent (see :func:`startup_error`)."""
    from parallelkit._wire.codec import capture_exception  # noqa: PLC0415 - failure path only

    return (phase, capture_exception(exc))


def startup_error(failure: StartupFailure, pid: int | None) -> BaseException:
    """The exception a parent raises for a child's start-up failure.

    The initializer's own exception (its type, the child's traceback as ``__cause__``); a
    function that cannot be unpickled in the child is a
    :class:`~parallelkit.errors.SerializationError` caused by the unpickling's error.
    """
    from parallelkit._wire.codec import rebuild_exception  # noqa: PLC0415 - parent side
    from parallelkit.errors import SerializationError  # noqa: PLC0415

    phase, record = failure
    if phase == INITIALIZER:
        return rebuild_exception(record, where=f"in the initializer of worker pid {pid}")
    cause = rebuild_exception(record, where=f"in worker pid {pid}")
    error = SerializationError(
        f"worker pid {pid} cannot unpickle the function: {type(cause).__name__}: {cause}",
        what="function",
    )
    error.__cause__ = cause
    return error
