"""Test aids for parallel code: a leak check and hypothesis strategies.

:func:`check_no_leaks` fails a block of code that leaves something behind: a child process
(or any descendant), a Python thread, a POSIX semaphore or shared-memory segment in
``/dev/shm``, or, on request, an open file descriptor.  What a pool created before the
block starts inside it (workers started on first use) is the pool's, not a leak.  It is
what parallelkit's own test suite runs around every test, and it works for any
multiprocessing code, not only parallelkit's::

    import parallelkit as pk
    from parallelkit.testing import check_no_leaks

    def test_squares() -> None:
        with check_no_leaks():
            assert pk.run_parallel(abs, [-1, -2]) == [1, 2]

As a pytest fixture that checks every test (put it in ``conftest.py``)::

    import pytest
    from parallelkit.testing import check_no_leaks

    @pytest.fixture(autouse=True)
    def no_leaks():
        with check_no_leaks(kill=True):
            yield

The hypothesis strategies :func:`start_methods`, :func:`worker_counts` and
:func:`chunksizes` draw the knobs of a parallel call for property-based tests::

    from hypothesis import given, strategies as st
    from parallelkit.testing import chunksizes, start_methods, worker_counts

    @given(st.lists(st.integers()), start_methods(), worker_counts(), chunksizes())
    def test_matches_map(items, start_method, workers, chunksize):
        with check_no_leaks():
            result = pk.run_parallel(
                abs, items, start_method=start_method, max_workers=workers, chunksize=chunksize
            )
        assert result == list(map(abs, items))

hypothesis is needed only for the strategies (it comes with the ``test`` extra:
``pip install 'parallelkit[test]'``); the leak check needs nothing beyond the standard
library and uses psutil when it is installed.

.. versionadded:: 0.1
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, Self, TypeVar

from parallelkit import _platform
from parallelkit._util import owners as _owners
from parallelkit._util.context import available_start_methods
from parallelkit._wire.shm import NAME_RE, remove_stale_segments

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from parallelkit._util.types import StartMethod

__all__ = (
    "LeakCheck",
    "LeakError",
    "check_no_leaks",
    "chunksizes",
    "remove_stale_segments",
    "start_methods",
    "worker_counts",
)

_P = ParamSpec("_P")
_R = TypeVar("_R")

SHM_DIR: Final = Path("/dev/shm")
"""Where Linux keeps POSIX semaphores (``sem.<name>``) and shared-memory segments."""

SHM_PREFIXES: Final = ("sem.mp-", "psm_", "pk")
"""The ``/dev/shm`` names the check watches: multiprocessing's semaphores
(``sem.mp-*``), ``multiprocessing.shared_memory`` segments (``psm_*``) and parallelkit's
own (``pk*``)."""

_FIRST_POLL: Final = 0.01
_MAX_POLL: Final = 0.1


class LeakError(AssertionError):
    """A block of code left processes, threads, semaphores, segments or fds behind.

    An :class:`AssertionError`, so test runners report it as a failed test.

    Attributes:
        processes: process ids of the leaked descendant processes.
        threads: the leaked :class:`threading.Thread` objects.
        shm: the names of the leaked entries in ``/dev/shm``.
        fds: the leaked file descriptors (only when the check was asked to watch them).
    """

    def __init__(
        self,
        message: str,
        *,
        processes: tuple[int, ...] = (),
        threads: tuple[threading.Thread, ...] = (),
        shm: tuple[str, ...] = (),
        fds: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message)
        self.processes = processes
        self.threads = threads
        self.shm = shm
        self.fds = fds


# ------------------------------------------------------------------------------ snapshots


@dataclass(frozen=True, slots=True)
class _Process:
    """One descendant process; ``(pid, started)`` tells a reused pid apart."""

    pid: int
    started: float
    ppid: int
    zombie: bool
    command: str

    @property
    def key(self) -> tuple[int, float]:
        return (self.pid, self.started)

    def describe(self) -> str:
        state = "zombie: exited but never waited for" if self.zombie else "running"
        return f"child process {self.pid} ({state}): {self.command}"


@dataclass(frozen=True, slots=True)
class _Snapshot:
    processes: dict[tuple[int, float], _Process]
    threads: frozenset[threading.Thread]
    shm: frozenset[str]
    fds: dict[int, str]
    owned: _owners.Owned  # what owners older than the block hold now

    def owns_process(self, pid: int) -> bool:
        return pid in self.owned.pids

    def owns_segment(self, name: str) -> bool:
        if name in self.owned.segments:
            return True
        # a worker's own segments carry its pid: pk_<pid>_<random>
        match = NAME_RE.fullmatch(name)
        return match is not None and int(match.group(1)) in self.owned.pids


def _psutil() -> ModuleType | None:
    try:
        import psutil  # noqa: PLC0415 - optional, imported lazily
    except ImportError:
        return None
    module: ModuleType = psutil  # untyped: give it a type here
    return module


def _helper_pids() -> set[int]:
    """The long-lived helpers multiprocessing starts once per interpreter.

    The resource tracker and the forkserver live until the interpreter exits, by design;
    they are not leaks.  (The forkserver's *children* are workers, and can be.)
    """
    pids: set[int] = set()
    for module, holder, attribute in (
        ("multiprocessing.resource_tracker", "_resource_tracker", "_pid"),
        ("multiprocessing.forkserver", "_forkserver", "_forkserver_pid"),
    ):
        try:
            state = getattr(importlib.import_module(module), holder, None)
        except ImportError:  # pragma: no cover - a platform without it (Windows)
            continue
        pid = getattr(state, attribute, None)
        if isinstance(pid, int):
            pids.add(pid)
    return pids


def _start_time(process: Any) -> float:
    """When a psutil process started, as a value that never changes.  psutil's
    ``create_time()`` is wall-clock time: it adds the boot time, read again each time, and
    that moves whenever the system clock is adjusted, so one process could look like two
    (and be called a leak, and killed).  Where ``/proc`` says, the clock ticks since boot."""
    info = _read_proc_stat(int(process.pid))
    return info[1] if info is not None else float(process.create_time())


def _descendants_psutil(psutil: ModuleType) -> list[_Process]:
    found: list[_Process] = []
    for child in psutil.Process().children(recursive=True):
        try:
            with child.oneshot():
                zombie = str(child.status()) == str(psutil.STATUS_ZOMBIE)
                try:
                    command = " ".join(str(part) for part in child.cmdline())
                except psutil.ZombieProcess:  # a zombie's command line is gone
                    command = ""
                found.append(
                    _Process(
                        pid=int(child.pid),
                        started=_start_time(child),
                        ppid=int(child.ppid()),
                        zombie=zombie,
                        command=command or str(child.name()),
                    )
                )
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone meanwhile, or not ours
            continue
    return found


def _read_proc_stat(pid: int) -> tuple[int, float, bool, str] | None:
    """``(ppid, start time, zombie, command)`` from ``/proc/<pid>``, or ``None`` if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    close = stat.rfind(")")
    name = stat[stat.find("(") + 1 : close]
    fields = stat[close + 2 :].split()
    state, ppid, started = fields[0], int(fields[1]), float(fields[19])
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        raw = b""
    command = raw.replace(b"\0", b" ").decode(errors="replace").strip() or name
    return ppid, started, state == "Z", command


def _descendants_proc() -> list[_Process]:
    by_parent: dict[int, list[_Process]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        info = _read_proc_stat(int(entry.name))
        if info is not None:
            ppid, started, zombie, command = info
            process = _Process(int(entry.name), started, ppid, zombie, command)
            by_parent.setdefault(ppid, []).append(process)
    found: list[_Process] = []
    parents = [os.getpid()]
    while parents:
        children = by_parent.get(parents.pop(), [])
        found.extend(children)
        parents.extend(child.pid for child in children)
    return found


def _descendants_multiprocessing() -> list[_Process]:
    # Neither psutil nor /proc: only the processes multiprocessing itself started.
    return [
        _Process(p.pid, 0.0, os.getpid(), False, p.name)
        for p in multiprocessing.active_children()
        if p.pid is not None
    ]


def _descendants() -> dict[tuple[int, float], _Process]:
    psutil = _psutil()
    if psutil is not None:
        found = _descendants_psutil(psutil)
    elif Path("/proc/self/stat").exists():
        found = _descendants_proc()
    else:  # pragma: no cover - neither psutil nor Linux
        found = _descendants_multiprocessing()
    helpers = _helper_pids()
    return {p.key: p for p in found if p.pid not in helpers}


def _shm_entries() -> frozenset[str]:
    names: list[str] = []
    for directory in {SHM_DIR, _platform.SEGMENT_DIR}:
        with contextlib.suppress(OSError):
            names += os.listdir(directory)
    return frozenset(name for name in names if name.startswith(SHM_PREFIXES))


def _shm_path(name: str) -> Path:
    """Where the leak-checked entry ``name`` is: ours in the segment directory."""
    return (_platform.SEGMENT_DIR if name.startswith("pk") else SHM_DIR) / name


def _open_fds() -> dict[int, str]:
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():  # pragma: no cover - not Linux
        fd_dir = Path("/dev/fd")
    fds: dict[int, str] = {}
    for name in os.listdir(fd_dir):
        try:
            fds[int(name)] = os.readlink(fd_dir / name)
        except (OSError, ValueError):
            # The descriptor listdir itself used is already closed by now; skip it.
            continue
    return fds


def _snapshot(*, fds: bool, mark: int = 0) -> _Snapshot:
    """What exists now; with ``mark``, also what owners registered before it hold."""
    processes = _descendants()
    threads = frozenset(threading.enumerate())
    shm = _shm_entries()
    # Owners last: a worker a pool starts meanwhile is then in the owner's list (or in
    # neither), never among the processes alone.
    owned = _owners.owned_before(mark) if mark else _owners.Owned()
    return _Snapshot(
        processes=processes,
        threads=threads,
        shm=shm,
        fds=_open_fds() if fds else {},
        owned=owned,
    )


# ------------------------------------------------------------------------------ the check


@dataclass(frozen=True, slots=True)
class _Leaks:
    processes: tuple[_Process, ...]
    threads: tuple[threading.Thread, ...]
    shm: tuple[str, ...]
    fds: tuple[tuple[int, str], ...]

    def __bool__(self) -> bool:
        return bool(self.processes or self.threads or self.shm or self.fds)

    def describe(self, grace: float) -> str:
        lines = [p.describe() for p in self.processes]
        lines += [f"thread {t.name!r} (ident {t.ident}, daemon={t.daemon})" for t in self.threads]
        lines += [f"{_shm_path(name)}" for name in self.shm]
        lines += [f"file descriptor {fd} -> {target}" for fd, target in self.fds]
        count = len(lines)
        noun = "leak" if count == 1 else "leaks"
        return f"{count} {noun} still there {grace:g} s after the block ended:\n  " + (
            "\n  ".join(lines)
        )


def _diff(before: _Snapshot, after: _Snapshot) -> _Leaks:
    """What is in ``after`` but not ``before``, less what older owners hold in ``after``."""
    owned_threads = set(after.owned.threads)
    return _Leaks(
        processes=tuple(
            p
            for key, p in sorted(after.processes.items())
            if key not in before.processes and not after.owns_process(p.pid)
        ),
        threads=tuple(
            sorted(
                after.threads - before.threads - owned_threads,
                key=lambda t: (t.name, t.ident or 0),
            )
        ),
        shm=tuple(sorted(name for name in after.shm - before.shm if not after.owns_segment(name))),
        fds=tuple(
            (fd, target) for fd, target in sorted(after.fds.items()) if before.fds.get(fd) != target
        ),
    )


def _still_there(leaks: _Leaks, now: _Snapshot) -> _Leaks:
    """What of ``leaks`` remains in ``now`` (and no older owner holds); ignores whatever
    appeared since."""
    owned_threads = set(now.owned.threads)
    return _Leaks(
        processes=tuple(
            now.processes[p.key]
            for p in leaks.processes
            if p.key in now.processes and not now.owns_process(p.pid)
        ),
        threads=tuple(t for t in leaks.threads if t in now.threads and t not in owned_threads),
        shm=tuple(name for name in leaks.shm if name in now.shm and not now.owns_segment(name)),
        fds=tuple((fd, target) for fd, target in leaks.fds if now.fds.get(fd) == target),
    )


def _kill(processes: tuple[_Process, ...], mark: int, *, timeout: float = 2.0) -> list[_Process]:
    """SIGKILL those of ``processes`` the block provably owns, reap them; those killed.

    A process is killed only if it is still the one the block started (same pid *and*
    start time, so a reused pid is spared) and no owner older than the block holds it.
    """
    now = _snapshot(fds=False, mark=mark)
    if not now.owned.complete:  # an older pool could not say what it holds: kill nothing
        return []
    doomed = [
        p
        for p in processes
        if p.key in now.processes
        and not now.processes[p.key].zombie
        and not now.owns_process(p.pid)
    ]
    for process in doomed:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except OSError:
            continue
    deadline = time.monotonic() + timeout
    pending = {p.key for p in doomed}
    while pending and time.monotonic() < deadline:
        multiprocessing.active_children()  # reaps the ones multiprocessing owns
        alive = _descendants()
        pending = {key for key in pending if key in alive and not alive[key].zombie}
        if pending:
            time.sleep(_FIRST_POLL)
    multiprocessing.active_children()
    return doomed


# ------------------------------------------------------------------------------ ownership
#
# A pool that starts its workers on first use, created before a checked block and first
# used inside it: its workers are not the block's leaks.  parallelkit's own pools register
# with ``_owners`` when they are created.  The standard library's lazily starting owners
# (thread and process pool executors, multiprocessing queues and their feeder thread) are
# stamped the same way from the first check on: their constructors are wrapped to register
# each new instance, and those that existed already are found once, by one look at every
# object the collector tracks.


def _thread_pool_owned(executor: object) -> _owners.Owned:
    return _owners.Owned(threads=tuple(getattr(executor, "_threads", None) or ()))


def _process_pool_owned(executor: object) -> _owners.Owned:
    processes = getattr(executor, "_processes", None) or {}
    manager = getattr(executor, "_executor_manager_thread", None)
    feeder = getattr(getattr(executor, "_call_queue", None), "_thread", None)
    return _owners.Owned(
        pids=tuple(pid for pid in list(processes) if isinstance(pid, int)),
        threads=tuple(t for t in (manager, feeder) if isinstance(t, threading.Thread)),
    )


def _queue_owned(queue: object) -> _owners.Owned:
    feeder = getattr(queue, "_thread", None)
    return _owners.Owned(threads=(feeder,) if isinstance(feeder, threading.Thread) else ())


_STAMPING_LOCK = threading.Lock()
_stamping = False


def _stamp_stdlib_owners() -> None:
    """From now on, register every standard-library owner; register those there already."""
    global _stamping
    with _STAMPING_LOCK:
        if _stamping:
            return
        import concurrent.futures.process  # noqa: PLC0415 - only once a check is used
        import concurrent.futures.thread  # noqa: PLC0415
        import multiprocessing.queues  # noqa: PLC0415

        kinds: tuple[tuple[type, Callable[[object], _owners.Owned]], ...] = (
            (concurrent.futures.thread.ThreadPoolExecutor, _thread_pool_owned),
            (concurrent.futures.process.ProcessPoolExecutor, _process_pool_owned),
            (multiprocessing.queues.Queue, _queue_owned),
        )
        for cls, owned in kinds:
            _register_on_init(cls, owned)
        # Type by type, never isinstance(): that asks a proxy for __class__, and a dead
        # weakref.proxy raises.
        kind_of: dict[type, Callable[[object], _owners.Owned] | None] = {}
        for obj in gc.get_objects():
            cls = type(obj)
            if cls not in kind_of:
                kind_of[cls] = next((o for k, o in kinds if issubclass(cls, k)), None)
            owned_fn = kind_of[cls]
            if owned_fn is not None:
                _owners.register(obj, owned_fn)
        _stamping = True


def _register_on_init(cls: type, owned: Callable[[object], _owners.Owned]) -> None:
    original = vars(cls)["__init__"]  # each of these classes defines its own

    @functools.wraps(original)
    def init(self: object, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        _owners.register(self, owned)

    setattr(cls, "__init__", init)  # noqa: B010 - mypy forbids assigning a method directly


class LeakCheck:
    """The context manager (and decorator) that :func:`check_no_leaks` returns.

    Entering takes a snapshot; leaving waits up to ``grace`` seconds for everything that
    appeared inside the block to go away, then raises :class:`LeakError` naming what is
    left.  Things that appear after the block ended (say, started by another thread) are
    not blamed on it.

    If the block itself raised an exception, that exception propagates unchanged, with a
    note listing any leaks added to it; ``KeyboardInterrupt`` and other exceptions that are
    not :class:`Exception` skip the check.
    """

    def __init__(self, *, grace: float = 5.0, fds: bool = False, kill: bool = False) -> None:
        if grace < 0:
            raise ValueError(f"grace must be >= 0 seconds, got {grace}")
        self.grace = grace
        self.fds = fds
        self.kill = kill
        self._before: _Snapshot | None = None
        self._mark = 0

    def __enter__(self) -> Self:
        if self._before is not None:
            raise RuntimeError("this LeakCheck is already in use; create one per block")
        _stamp_stdlib_owners()
        self._mark = _owners.mark()
        self._before = _snapshot(fds=self.fds)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        before, self._before = self._before, None
        if before is None:  # pragma: no cover - __exit__ without __enter__
            raise RuntimeError("LeakCheck.__exit__ called without __enter__")
        if exc is not None and not isinstance(exc, Exception):
            return
        leaks = self._wait(before)
        if not leaks:
            return
        message = leaks.describe(self.grace)
        if self.kill and leaks.processes:
            killed = _kill(leaks.processes, self._mark)
            spared = len(leaks.processes) - len(killed)
            if not spared:
                message += "\n(the leaked processes were killed)"
            else:
                message += (
                    f"\n({len(killed)} of the leaked processes killed; {spared} not: gone, "
                    "pid reused, or taken over by a pool older than the block meanwhile)"
                )
        if exc is not None:
            exc.add_note(f"parallelkit.testing: {message}")
            return
        raise LeakError(
            message,
            processes=tuple(p.pid for p in leaks.processes),
            threads=leaks.threads,
            shm=leaks.shm,
            fds=tuple(fd for fd, _ in leaks.fds),
        )

    def _wait(self, before: _Snapshot) -> _Leaks:
        multiprocessing.active_children()  # joins (reaps) finished multiprocessing children
        leaks = _diff(before, _snapshot(fds=self.fds, mark=self._mark))
        deadline = time.monotonic() + self.grace
        pause = _FIRST_POLL
        while leaks and time.monotonic() < deadline:
            # Objects dropped in a reference cycle release their processes, semaphores and
            # segments only when the collector runs their finalizers.
            gc.collect()
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _MAX_POLL)
            multiprocessing.active_children()
            leaks = _still_there(leaks, _snapshot(fds=self.fds, mark=self._mark))
        return leaks

    def __call__(self, func: Callable[_P, _R]) -> Callable[_P, _R]:
        """Use the check as a decorator: each call of ``func`` is checked on its own."""

        @functools.wraps(func)
        def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with LeakCheck(grace=self.grace, fds=self.fds, kill=self.kill):
                return func(*args, **kwargs)

        return checked


def check_no_leaks(*, grace: float = 5.0, fds: bool = False, kill: bool = False) -> LeakCheck:
    """Fail if a block leaves processes, threads, semaphores or segments behind.

    Watched, as differences between a snapshot taken on entry and one taken on exit:

    - descendant processes of this process (children and their children, so that a
      forkserver's workers count), except multiprocessing's own long-lived helpers, the
      resource tracker and the forkserver, which live until the interpreter exits;
      finished multiprocessing children are reaped first;
    - Python threads (by identity);
    - POSIX semaphores and shared-memory segments in ``/dev/shm`` whose names start with
      ``sem.mp-``, ``psm_`` or ``pk`` (parallelkit's own segments: in its portable
      directory instead where there is no ``/dev/shm``, or in portable mode);
    - with ``fds=True``, open file descriptors of this process.

    What a pool created *before* the block starts inside it (its workers start on first
    use) is not the block's: a process, thread or segment that, when the block ends,
    belongs to a still-existing :class:`~parallelkit.WorkerPool`,
    :class:`concurrent.futures.ThreadPoolExecutor`,
    :class:`concurrent.futures.ProcessPoolExecutor` or :mod:`multiprocessing` queue created
    before the block is left out.  (To know when the standard library's were created, the
    first check wraps their constructors and looks once for the instances already there.)
    One created inside the block and left open is a leak like any other.

    Cleanup that takes a moment (a worker that is still exiting, a finalizer that has not
    run) gets ``grace`` seconds; the check polls until everything is gone or time is up.

    Args:
        grace: seconds to wait for leftovers to go away before failing.
        fds: also watch file descriptors.  Off by default because test runners and
            logging open files of their own while a test runs.
        kill: after reporting leaked processes, SIGKILL them (and reap what
            multiprocessing started), so that one leaking test does not disturb the next.
            Only processes the block provably started are killed: the same process (pid
            and start time) as the one reported, held by no pool older than the block.

    Returns:
        A context manager, also usable as a decorator.

    Raises:
        LeakError: when the block ends, if something it created is still there after
            ``grace`` seconds.
        ValueError: ``grace`` is negative.

    Example:
        >>> import threading
        >>> from parallelkit.testing import LeakError, check_no_leaks
        >>> with check_no_leaks(grace=0.5):
        ...     t = threading.Thread(target=abs, args=(-1,))
        ...     t.start()
        ...     t.join()
        >>> stop = threading.Event()
        >>> try:
        ...     with check_no_leaks(grace=0.1):
        ...         threading.Thread(target=stop.wait, name="forgotten").start()
        ... except LeakError as error:
        ...     print(error.threads[0].name)
        forgotten
        >>> stop.set()
    """
    return LeakCheck(grace=grace, fds=fds, kill=kill)


# ------------------------------------------------------------------------------ strategies


def _hypothesis_strategies() -> ModuleType:
    try:
        from hypothesis import strategies  # noqa: PLC0415 - hypothesis is a test extra
    except ImportError as exc:
        raise ImportError(
            "parallelkit.testing's strategies need hypothesis, which is not installed; "
            "install it with: pip install 'parallelkit[test]' (or pip install hypothesis)"
        ) from exc
    return strategies


def start_methods() -> SearchStrategy[StartMethod]:
    """A hypothesis strategy for the start methods this platform offers.

    Shrinks towards the first of ``"fork"``, ``"forkserver"``, ``"spawn"`` that is
    available.

    Raises:
        ImportError: hypothesis is not installed.
    """
    st = _hypothesis_strategies()
    strategy: SearchStrategy[StartMethod] = st.sampled_from(available_start_methods())
    return strategy


def worker_counts(*, max_value: int = 4) -> SearchStrategy[int]:
    """A hypothesis strategy for ``max_workers``: integers from 1 to ``max_value``.

    Args:
        max_value: the largest worker count to draw.  Keep it small: every worker is a
            process, and every example starts them.

    Raises:
        ImportError: hypothesis is not installed.
        ValueError: ``max_value`` is less than 1.
    """
    if max_value < 1:
        raise ValueError(f"max_value must be at least 1, got {max_value}")
    st = _hypothesis_strategies()
    strategy: SearchStrategy[int] = st.integers(min_value=1, max_value=max_value)
    return strategy


def chunksizes(*, max_value: int = 16) -> SearchStrategy[int | None]:
    """A hypothesis strategy for ``chunksize``: ``None`` (automatic) or 1 to ``max_value``.

    Args:
        max_value: the largest chunk size to draw.

    Raises:
        ImportError: hypothesis is not installed.
        ValueError: ``max_value`` is less than 1.
    """
    if max_value < 1:
        raise ValueError(f"max_value must be at least 1, got {max_value}")
    st = _hypothesis_strategies()
    strategy: SearchStrategy[int | None] = st.none() | st.integers(min_value=1, max_value=max_value)
    return strategy
