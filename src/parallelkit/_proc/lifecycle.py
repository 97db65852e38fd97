"""Lifecycle plumbing shared by everything that owns processes.

- :func:`stop_processes`: join → terminate → kill escalation for a group of processes, all
  waited on together through their sentinels, warning when it had to escalate.
- :func:`wait_exited` / :func:`wait_reapable`: wait for processes to end and be reaped,
  with a deadline, never spinning and never in a blocking ``waitpid``.
- :func:`start_child`: start any parallelkit child process (pool worker, pipeline stage,
  channel server) through the one child main, with Ctrl-C held off until it ignores
  SIGINT itself.
- :func:`bootstrap_options`: what :func:`parallelkit._proc.child.bootstrap` needs to know about
  the parent, for a given start method.
- :func:`signal_name`: ``-9`` → ``"SIGKILL"``.
- interpreter exit while threads wait on children (:func:`waiting_on_children`) is quiet.

The forkserver's preload is :mod:`parallelkit._proc.forkserver`'s.
"""

from __future__ import annotations

import atexit
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.process
import multiprocessing.util  # registers its exit handler: ours must come after (runs before)
import os
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.process import BaseProcess
from typing import Any, Final

from parallelkit import _platform
from parallelkit._proc.identity import Identity
from parallelkit._util import timeline as _timeline
from parallelkit.errors import StartMethodError

TERMINATE_GRACE: Final = 1.0  # seconds a SIGTERMed process gets before SIGKILL
EXIT_JOIN_SECONDS: Final = 2.0  # at interpreter exit, how long threads get to leave our calls
# Interpreter exit (see _quiet_exit): set once the main thread has returned
_exiting = False
# Taken to close a Process and to set _exiting: from then on the processes are
# multiprocessing's exit handler's (it joins every child it finds), and no thread of ours
# closes one under it (see close_process).
_closing = threading.Lock()
_drivers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()  # threads that waited on children
_waiting: dict[threading.Thread, int] = {}  # ... and how many waits each is in right now


class _WaitingOnChildren:
    """Around every blocking wait on our children's pipes and sentinels (the map engine,
    a pipeline run): lets interpreter exit stop a thread that is inside one, quietly.

    Leaving it raises ``SystemExit`` once the interpreter is exiting, in a daemon thread
    (see :func:`_quiet_exit`); ``threading`` ends the thread without printing it.
    (A class, not a generator: it runs once per step of the engine.)
    """

    def __enter__(self) -> None:
        thread = threading.current_thread()
        _drivers.add(thread)
        _waiting[thread] = _waiting.get(thread, 0) + 1

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        thread = threading.current_thread()
        left = _waiting.pop(thread, 1) - 1
        if left:
            _waiting[thread] = left
        if et is None:
            leave_if_exiting()


def leave_if_exiting() -> None:
    """Raise ``SystemExit`` if the interpreter is exiting and this is a daemon thread (see
    :func:`_quiet_exit`): a thread whose workers were stopped for the exit leaves quietly."""
    if _exiting and _user_daemon(threading.current_thread()):
        raise SystemExit


def _user_daemon(thread: threading.Thread) -> bool:
    # parallelkit's own threads ("parallelkit-futures", ...) are ended by their owners'
    # finalizers, which also warn about work left pending
    return thread.daemon and not thread.name.startswith("parallelkit-")


def _quiet_exit() -> None:
    """At interpreter exit, before multiprocessing's own exit handler: stop the parallel
    work that daemon threads are still running, so that nothing is printed.

    multiprocessing's handler terminates every daemonic child and then joins them.  A
    daemon thread running ``run_parallel`` or ``Pipeline.run`` meanwhile saw its workers
    killed and raised (a traceback from the thread), closed processes the handler was
    about to join (``ValueError: process object is closed`` from the handler), or started
    replacements that died unpickling their start-up data (a traceback each).  Instead,
    such threads leave their wait with ``SystemExit`` (silent in a thread), start nothing
    more, and get a moment to unwind before multiprocessing's handler runs.
    """
    global _exiting
    with _closing:
        _exiting = True
    me = threading.current_thread()
    busy = [t for t in _waiting if t is not me and t.is_alive() and _user_daemon(t)]
    if not busy:
        return
    for process in multiprocessing.active_children():
        if process.name.startswith("parallelkit-"):
            try:
                process.kill()  # wakes the waiting threads: a sentinel fires
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + EXIT_JOIN_SECONDS
    for thread in [t for t in _drivers if t is not me and _user_daemon(t)]:
        thread.join(max(0.0, deadline - time.monotonic()))


_WAITING_ON_CHILDREN: Final = _WaitingOnChildren()


def waiting_on_children() -> _WaitingOnChildren:
    """The context manager to wait on children in (see :class:`_WaitingOnChildren`)."""
    return _WAITING_ON_CHILDREN


# Exit handlers run last registered, first run.  multiprocessing's is registered (imported
# above); weakref.finalize registers its own on first use, and the finalizers of our pools
# and pipelines kill their processes: make it register now, so that ours runs before both.
weakref.finalize(_quiet_exit, int)
atexit.register(_quiet_exit)


class SigintIgnored:
    """Unpickled in a child, ignores SIGINT there: the first argument of the child main.

    A forkserver child is forked by the server with Python's default SIGINT handler and
    nothing blocked, so a Ctrl-C on the process group could raise ``KeyboardInterrupt`` at
    the first line of the child main, before it ignores SIGINT, and print our frame.
    Unpickling the process object (the server's child reads it before it runs anything of
    ours) calls ``signal.signal`` itself, a builtin, so no frame of ours exists yet; a
    signal that arrived before is dropped by the interpreter once the handler is
    ``SIG_IGN``.  Under fork the object is not pickled (the parent blocked SIGINT around
    the fork instead), and under spawn it does early what the child main does anyway.
    """

    def __reduce__(self) -> tuple[Callable[..., object], tuple[int, int]]:
        return signal.signal, (int(signal.SIGINT), int(signal.SIG_IGN))


def bootstrap_options(start_method: str) -> dict[str, Any]:
    """``parent_pid`` and ``pdeathsig`` keyword arguments for ``_proc.child.bootstrap``.

    A forkserver child's parent is the server, so there is no pid to compare; the parent
    death signal fires when the *thread* that forked exits, so it is only safe from the main
    thread (or under forkserver, where the server's main thread forks).
    """
    return {
        "parent_pid": 0 if start_method == "forkserver" else os.getpid(),
        "pdeathsig": (
            start_method == "forkserver" or threading.current_thread() is threading.main_thread()
        ),
    }


def check_can_start_children(start_method: str) -> None:
    """Refuse to start children from here, before anything is built for them.

    In a spawn/forkserver child importing the parent's main module, which starts work:
    one line and ``EXIT_MAIN_GUARD`` (``child.refuse_to_start_in_bootstrap``), whatever
    the role, rather than a traceback from each child.  Then :func:`check_main_importable`.

    Raises:
        StartMethodError: see :func:`check_main_importable`.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        from parallelkit._proc.child import refuse_to_start_in_bootstrap  # noqa: PLC0415

        refuse_to_start_in_bootstrap()
    check_main_importable(start_method)


def check_main_importable(start_method: str) -> None:
    """Refuse, before any child starts, a start method whose children cannot start here.

    Under spawn and forkserver, multiprocessing has each child run the main script again
    from its file.  A script piped to ``python -`` names the file ``<stdin>``: every child
    would die printing a ``FileNotFoundError`` traceback.  (``python -c`` and interactive
    sessions have no file, and children do not run them: those work.)

    Raises:
        StartMethodError: what to do instead.
    """
    if start_method == "fork":
        return
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    path = getattr(main, "__file__", None)
    if getattr(spec, "name", None) is not None or not isinstance(path, str):
        return  # run with -m (imported by name), or no file to run again (-c, a REPL)
    original = getattr(multiprocessing.process, "ORIGINAL_DIR", None)
    if not os.path.isabs(path) and original is not None:
        path = os.path.join(original, path)
    if os.path.isfile(path):
        return
    raise StartMethodError(
        f"{start_method!r} worker processes cannot start here: each one runs the main "
        f"script again from its file, and the main module's file {main.__file__!r} does "  # type: ignore[union-attr]
        "not exist (a script piped to `python -`?). Save the script to a file and run "
        "that; or put the task functions in a module and start the work with `python -c` "
        "or `python -m` (functions defined in __main__ then travel by value, with "
        "cloudpickle); or use start_method='fork'"
    )


def start_child(  # noqa: PLR0912 - each start method's way to start a child, in one place
    context: multiprocessing.context.BaseContext,
    start_method: str,
    loop: Callable[..., object],
    conn: object,
    *,
    args: Sequence[object] = (),
    name: str,
    parent_end: object = None,
    init_payload: bytes | None = None,
    fn: Callable[..., object] | None = None,
    fn_payload: bytes | None = None,
    report: Callable[..., object] | None = None,
    on_started: Callable[[BaseProcess], None] | None = None,
    threads_ok: bool = False,
    logs: Any = None,
    identity: Identity | None = None,
) -> BaseProcess:
    """Start a daemonic child process that runs the role ``loop`` through the one child
    main (:func:`parallelkit._proc.child.child_main`, which documents the arguments), and
    return it.

    ``parent_end`` is closed in the child under fork (elsewhere it is not inherited).
    fork and spawn children inherit this thread's signal mask: with SIGINT blocked until
    the child ignores it (``_proc.child.bootstrap``), a Ctrl-C during start-up cannot make a
    child print a KeyboardInterrupt traceback.  (Not for forkserver: its server process,
    shared with the user's own processes, would inherit the mask for good.)
    ``identity``: what ``worker_info()`` answers in the child (``_proc.identity``).
    ``on_started`` runs before the mask is restored, so that a Ctrl-C raised then finds the
    new process already recorded by the caller.  ``threads_ok``: the caller knows the only
    other threads are parallelkit's own, idle ones; silence Python 3.12's fork-with-threads
    warning.  ``logs``: a :class:`parallelkit._proc.logs.LogPipe` whose child end the
    child sends its log records through (closed here once the child started); ``None``:
    the child's logging is left as it is.
    """
    from parallelkit._proc.child import child_main  # noqa: PLC0415 - not for every user of this module

    kwargs = {
        **bootstrap_options(start_method),
        "parent_end": parent_end if start_method == "fork" else None,
        "init_payload": init_payload,
        "fn": fn,
        "fn_payload": fn_payload,
        "report": report,
        "fast_exit": start_method == "spawn",
        "identity": identity,
    }
    if logs is not None:
        kwargs["log_sock"] = logs.child
        kwargs["log_levels"] = logs.sent
        if start_method == "fork":
            kwargs["log_parent_end"] = logs.sock
    # counted as busy by _quiet_exit: a child half started at exit would die noisily
    with _WAITING_ON_CHILDREN:
        leave_if_exiting()  # no new child once the interpreter exits
        check_can_start_children(start_method)
        if start_method == "forkserver":
            # not at import: a spawned channel server imports this module, not the server
            from parallelkit._proc.forkserver import start_forkserver  # noqa: PLC0415

            if _timeline.ENABLED:
                _timeline.stamp("parent.forkserver_ensure")
            start_forkserver()
            if _timeline.ENABLED:
                _timeline.stamp("parent.forkserver_running")
        process: BaseProcess = context.Process(  # type: ignore[attr-defined]
            target=child_main,
            args=(SigintIgnored(), loop, conn, tuple(args)),
            kwargs=kwargs,
            name=name,
            daemon=True,
        )
        # SIGINT held off while the child starts (not under forkserver: the server forks
        # it).  The mask to restore is read before it changes, and the change made inside
        # the try: a Ctrl-C raised at any point here cannot leave SIGINT blocked.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        try:
            if start_method != "forkserver":
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            if _timeline.ENABLED:
                _timeline.stamp(f"parent.start {name}")
            if threads_ok and start_method == "fork":
                with warnings.catch_warnings():
                    warnings.filterwarnings(
                        "ignore", message=r".*multi-threaded.*fork", category=DeprecationWarning
                    )
                    process.start()
            else:
                process.start()
            if _timeline.ENABLED:
                _timeline.stamp(f"parent.started {name}")
            if on_started is not None:
                on_started(process)
        finally:
            # a Ctrl-C that arrived meanwhile is raised here, with the child known
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            if logs is not None:
                logs.child_started()  # the child has its own copy (or never will)
    return process


def signal_name(exitcode: int | None) -> str | None:
    """The signal that ended a process with this exit code, or ``None``."""
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def describe_exit(exitcode: int | None) -> str:
    name = signal_name(exitcode)
    if name is not None:
        return f"killed by {name}"
    if exitcode is None:
        return "still running"
    return f"exited with code {exitcode}"


def wait_reapable(procs: Sequence[BaseProcess], deadline: float) -> None:
    """Wait, until ``deadline`` at most, for one of ``procs`` -- processes whose sentinel has
    fired -- to become reapable (its ``exitcode`` set), without spinning and without
    blocking past the deadline.

    A fork or spawn child's sentinel reads EOF as soon as its descriptors close, which is
    before the kernel has made it a zombie that ``waitpid(WNOHANG)`` can reap, a window
    that grows when exiting children share the cores.  Polling ``exitcode`` in that window
    spins on a core the exiting children need (``docs/performance.md``);
    a blocking ``waitpid`` (what ``Process.join`` does after its sentinel fires) would wait
    for ever for a child that closed its descriptors and went on running.  A pidfd
    (Linux 5.3) reads ready exactly when its process is reapable, and ``wait`` takes a
    timeout; where there is none, 1 ms sleeps between polls.
    """
    exiting = [p for p in procs if p.exitcode is None]
    if len(exiting) < len(procs):
        return
    pidfds: list[int] = []
    try:
        for p in exiting:
            fd = None if p.pid is None else _platform.pidfd_open(p.pid)
            if fd is None:
                break
            pidfds.append(fd)
        watch = pidfds if len(pidfds) == len(exiting) else None
        while (remaining := deadline - time.monotonic()) > 0:
            if watch is not None:
                multiprocessing.connection.wait(watch, remaining)
            else:
                time.sleep(min(0.001, remaining))
            if any(p.exitcode is not None for p in exiting):
                return
    finally:
        for fd in pidfds:
            os.close(fd)


def wait_exited(procs: list[BaseProcess], deadline: float) -> list[BaseProcess]:
    """Wait until every process has exited and is reaped, or the deadline passes; return
    the living (never a blocking ``waitpid``: see :func:`wait_reapable`)."""
    alive = [p for p in procs if p.exitcode is None]
    while alive:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready = multiprocessing.connection.wait([p.sentinel for p in alive], remaining)
        if ready:
            wait_reapable([p for p in alive if p.sentinel in ready], deadline)
        alive = [p for p in alive if p.exitcode is None]
    return alive


def _started_and_open(process: BaseProcess) -> bool:
    try:
        return process.pid is not None
    except ValueError:  # closed: already reaped
        return False


def stop_processes(
    procs: Iterable[BaseProcess],
    *,
    join_timeout: float,
    what: str = "worker",
    warn: bool = True,
    close: bool = True,
) -> None:
    """End ``procs``: wait ``join_timeout`` for them to exit, then SIGTERM, then SIGKILL.

    ``join_timeout=0`` kills at once without a warning (a deliberate abort).  Every
    process is reaped and, unless ``close=False`` (the caller still wants to read its
    ``exitcode``), closed afterwards; processes not started, or already closed, are
    skipped.
    """
    procs = [p for p in procs if _started_and_open(p)]
    if join_timeout <= 0:  # a deliberate abort: no grace, no warning
        for p in procs:
            if p.exitcode is None:
                p.kill()
        alive = wait_exited(procs, time.monotonic() + 10.0)
    else:
        alive = wait_exited(procs, time.monotonic() + join_timeout)
    if alive:
        if warn and join_timeout > 0:
            warnings.warn(
                f"{len(alive)} parallelkit {what} process(es) did not exit within "
                f"{join_timeout:g} s of being asked to; terminating them",
                ResourceWarning,
                stacklevel=3,
            )
        for p in alive:
            p.terminate()
        alive = wait_exited(alive, time.monotonic() + TERMINATE_GRACE)
        for p in alive:
            p.kill()
        wait_exited(alive, time.monotonic() + 10.0)
    for p in procs:
        p.join(0)
        if close and p.exitcode is not None:
            close_process(p)


def close_process(process: BaseProcess) -> None:
    """``process.close()``, unless the interpreter is exiting.

    multiprocessing's exit handler joins every child it finds alive; a thread of ours that
    is still unwinding (a daemon thread's map, past our exit handler's grace period) must
    not close one under it (``ValueError: process object is closed`` from the handler).
    The lock makes the check and the close one step with respect to :func:`_quiet_exit`.
    """
    with _closing:
        if not _exiting:
            process.close()
