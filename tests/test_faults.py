"""Fault injection: nothing hangs, nothing leaks, every failure names its item (issue 3).

Each fault happens for real, under every start method: bad objects that fail at each phase
of an item's trip (see ``tasks.faults``), workers that really get SIGKILLed mid-transfer
or by a sibling, a parent process that really dies, a real SIGINT, a real shortage of file
descriptors.  The scenarios that kill or interrupt a whole program run a script from
``tests/scripts/`` in its own session (a process group, as a terminal's foreground job is):
the script and its workers report their pids on stdout, and the test checks they are gone.

The autouse leak check (``conftest.py``) runs around every test here too: a test that
leaves a worker, a thread, a semaphore or a ``/dev/shm`` segment behind fails.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import gc
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import pytest

import parallelkit as pk
import tasks.faults as wf
from parallelkit import StartMethod, _platform
from parallelkit._proc import lifecycle
from parallelkit._proc.child import EXIT_MAIN_GUARD
from parallelkit._util.threads import Mutex

TESTS: Final = Path(__file__).resolve().parent
SCRIPTS: Final = TESTS / "scripts"

# Deadlines.  Generous where the machine's load decides (starting interpreters, spawning
# workers); the promised bounds where the engine decides.
STARTUP: Final = 60.0  # a script has started its workers
INTERRUPT: Final = 3.0  # Ctrl-C reaches the caller as KeyboardInterrupt ("about a second")
ORPHANS: Final = 5.0  # workers of a dead parent are gone ("a few seconds")
EXIT: Final = 10.0  # an interpreter with work pending has exited ("within seconds")
RESULT: Final = 60.0  # a future's outcome, when nothing should make it slow
PROMPT: Final = 10.0  # an outcome that needs no new worker: a failure the parent detects

BIG: Final = 20 * 1024 * 1024  # a multi-MB argument or result


# ------------------------------------------------------------------ processes, from /proc


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, process group, start time)`` of ``pid``, or ``None`` if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


@dataclass(frozen=True)
class Pid:
    """A process seen at one moment; ``started`` tells it apart from a reused pid."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> Pid:
        stat = _stat(pid)
        return cls(pid, -1 if stat is None else stat[2])  # -1: already gone

    def running(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[2] == self.started and stat[0] != "Z"

    def kill(self) -> None:
        if self.running():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass


def _wait_gone(pids: Iterable[Pid], timeout: float) -> list[int]:
    """Wait up to ``timeout`` for every process to end; the pids still running."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        pending = [p for p in pending if p.running()]
        if not pending or time.monotonic() >= deadline:
            return [p.pid for p in pending]
        time.sleep(0.02)


def _group(pgid: int) -> list[Pid]:
    """The living (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                found.append(Pid(int(entry.name), stat[2]))
    return found


# ------------------------------------------------------------------ helper scripts


class Script:
    """A script from ``tests/scripts`` in a new session; its stdout read line by line.

    Lines ``WORKER <pid>`` (written by the tasks) are collected in :attr:`workers`.  Leaving
    the ``with`` block SIGKILLs whatever is left of the script's process group and of its
    workers, so that a failing test leaves nothing running.
    """

    def __init__(self, tmp_path: Path, name: str, *args: str, python: tuple[str, ...] = ()):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
        env.pop("PYTHONWARNINGS", None)
        self.name = name
        self.stderr_path = tmp_path / f"{name}.stderr"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, *python, str(SCRIPTS / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
                env=env,
            )
        self.pgid = self.proc.pid
        self.lines: list[str] = []
        self.workers: dict[int, Pid] = {}
        self._buffer = b""
        self._eof = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        for pid in [*self.workers.values(), *_group(self.pgid)]:
            pid.kill()
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait(timeout=30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    # -------------------------------------------------------------- output
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _describe(self) -> str:
        return f"stdout so far: {self.lines}\nstderr:\n{self.stderr()}"

    def read_line(self, deadline: float) -> str | None:
        """The next line of stdout; ``None`` at end of file or when the deadline passes."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            if self._eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 65536)
            if not data:
                self._eof = True
            self._buffer += data
        raw, _, self._buffer = self._buffer.partition(b"\n")
        line = raw.decode(errors="replace")
        self.lines.append(line)
        if line.startswith("WORKER "):
            pid = int(line.split()[1])
            self.workers.setdefault(pid, Pid.of(pid))
        return line

    def expect(self, prefix: str, timeout: float) -> str:
        """Read until a line starting with ``prefix``; fail if it does not come in time."""
        deadline = time.monotonic() + timeout
        while (line := self.read_line(deadline)) is not None:
            if line.startswith(prefix):
                return line
        pytest.fail(f"{self.name}: no {prefix!r} line within {timeout:g} s\n{self._describe()}")

    def expect_workers(self, count: int, timeout: float) -> list[Pid]:
        """Read until ``count`` different workers have said ``WORKER <pid>``."""
        deadline = time.monotonic() + timeout
        while len(self.workers) < count:
            if self.read_line(deadline) is None:
                pytest.fail(f"{self.name}: fewer than {count} workers\n{self._describe()}")
        return list(self.workers.values())

    def rest(self, timeout: float) -> list[str]:
        """Every line still to come, until end of file (or the deadline)."""
        deadline = time.monotonic() + timeout
        while self.read_line(deadline) is not None:
            pass
        return self.lines

    def wait(self, timeout: float) -> int:
        """The script's exit code; fail if it is still running after ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout:g} s\n{self._describe()}")


# ------------------------------------------------------------------ expected failures

Check = Callable[[BaseException, int], None]


def _notes(exc: BaseException) -> str:
    return "\n".join(getattr(exc, "__notes__", ()))


def _serialization(what: str) -> Check:
    def check(exc: BaseException, index: int) -> None:
        assert isinstance(exc, pk.SerializationError), repr(exc)
        assert isinstance(exc, TypeError)
        assert (exc.what, exc.item_index) == (what, index), repr(exc)

    return check


def _crash(exc: BaseException, index: int) -> None:
    assert isinstance(exc, pk.WorkerCrashedError), repr(exc)
    assert exc.item_index == index, repr(exc)
    assert (exc.exitcode, exc.signal) == (-signal.SIGKILL, "SIGKILL"), repr(exc)
    assert isinstance(exc.pid, int)
    assert exc.pid != os.getpid()


def _fault_error(exc: BaseException, index: int) -> None:
    assert type(exc) is wf.FaultError, repr(exc)
    assert f"on item {index}" in _notes(exc)


def _system_exit(exc: BaseException, index: int) -> None:
    assert type(exc) is SystemExit, repr(exc)
    assert exc.code == wf.EXIT_CODE
    assert f"on item {index}" in _notes(exc)


def _remote(type_name: str) -> Check:
    def check(exc: BaseException, index: int) -> None:
        assert isinstance(exc, pk.RemoteError), repr(exc)
        assert exc.type_name == f"tasks.faults.{type_name}"
        assert type_name in exc.remote_traceback
        assert f"on item {index}" in _notes(exc)

    return check


@dataclass(frozen=True)
class Case:
    """An item that fails at one phase, and what the caller must get for it."""

    bad: object
    check: Check
    crashes: bool = False


CASES: Final[dict[str, Case]] = {
    # the argument: pickled in the parent, unpickled in the worker
    "argument-pickle-raise": Case(wf.PickleBomb("raise"), _serialization("argument")),
    "argument-unpickle-raise": Case(wf.UnpickleBomb("raise"), _serialization("argument")),
    "argument-unpickle-exit": Case(wf.UnpickleBomb("exit"), _serialization("argument")),
    "argument-unpickle-crash": Case(wf.UnpickleBomb("crash"), _crash, crashes=True),
    # the task
    "task-raise": Case(wf.Fault("task", "raise"), _fault_error),
    "task-exit": Case(wf.Fault("task", "exit"), _system_exit),
    "task-crash": Case(wf.Fault("task", "crash"), _crash, crashes=True),
    # the result: pickled in the worker, unpickled in the parent
    "result-pickle-raise": Case(wf.Fault("result-pickle", "raise"), _serialization("result")),
    "result-pickle-exit": Case(wf.Fault("result-pickle", "exit"), _serialization("result")),
    "result-pickle-crash": Case(wf.Fault("result-pickle", "crash"), _crash, crashes=True),
    "result-unpickle-raise": Case(wf.Fault("result-unpickle", "raise"), _serialization("result")),
    "result-unpickle-exit": Case(wf.Fault("result-unpickle", "exit"), _serialization("result")),
    # the task's exception: cannot be pickled; pickles but cannot be rebuilt in the parent
    "exception-pickle": Case(wf.Fault("exc-pickle"), _remote("LockedError")),
    "exception-rebuild": Case(wf.Fault("exc-rebuild"), _remote("UnrebuildableError")),
}
# (A bad object cannot crash or sys.exit the *parent* while it pickles an argument or
# unpickles a result without that being the caller's own crash or exit.)


# ------------------------------------------------------------------ bad objects at each phase


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_phase_fails_only_its_item(start_method: StartMethod, case: Case) -> None:
    """The bad item gets the specified error with its index; the pool stays usable.

    A WorkerPool always pickles its arguments (nothing is inherited), so every phase is
    real under fork too.
    """
    items: list[object] = [0, 1, case.bad, 3, 4, 5]
    with pk.WorkerPool(2, start_method=start_method) as pool:
        # one chunk holds every item: the failure must be pinned to the exact item
        got = pk.run_parallel(
            wf.fault_task, items, backend=pool, chunksize=len(items), return_exceptions=True
        )
        error = got[2]
        assert isinstance(error, BaseException), got
        case.check(error, 2)
        assert got[:2] + got[3:] == [0, 1, 3, 4, 5]
        # fail fast: the same error, raised
        with pytest.raises(BaseException) as info:  # noqa: PT011 - checked just below
            pk.run_parallel(wf.fault_task, items, backend=pool, chunksize=2)
        case.check(info.value, 2)
        # a submitted call is item 0 of its own
        exc = pool.submit(wf.fault_task, case.bad).exception(timeout=PROMPT)
        assert exc is not None
        case.check(exc, 0)
        # and the pool still works
        assert pk.run_parallel(wf.fault_task, range(20), backend=pool) == list(range(20))
        assert pool.submit(wf.square, 7).result(timeout=RESULT) == 49


@pytest.mark.timeout(90)
def test_hundreds_of_failures_in_a_row_then_good_tasks(start_method: StartMethod) -> None:
    """One pool, return_exceptions: ~300 failures of every kind, then all good tasks work."""
    kinds = [c for c in CASES.values() if not c.crashes]
    items: list[object] = [kinds[i % len(kinds)].bad for i in range(308)]
    crash_at = (50, 150, 250)  # a few hard crashes in the middle of it all
    for i in crash_at:
        items[i] = CASES["task-crash"].bad
    with pk.WorkerPool(2, start_method=start_method) as pool:
        got = pk.run_parallel(wf.fault_task, items, backend=pool, return_exceptions=True)
        assert len(got) == len(items)
        for i, value in enumerate(got):
            assert isinstance(value, BaseException), (i, value)
            case = CASES["task-crash"] if i in crash_at else kinds[i % len(kinds)]
            case.check(value, i)
        futures = [pool.submit(wf.fault_task, kinds[i % len(kinds)].bad) for i in range(100)]
        for i, future in enumerate(futures):
            exc = future.exception(timeout=RESULT)
            assert exc is not None
            kinds[i % len(kinds)].check(exc, 0)
        assert pk.run_parallel(wf.square, range(300), backend=pool) == [x * x for x in range(300)]
        good = [pool.submit(wf.square, x) for x in range(50)]
        assert [f.result(timeout=RESULT) for f in good] == [x * x for x in range(50)]


# ------------------------------------------------------------------ crashes


@pytest.mark.timeout(60)
def test_crash_while_a_large_argument_is_in_flight(start_method: StartMethod) -> None:
    """The worker dies 2 MB into receiving a 20 MB argument: the pool carries on."""
    data = "x" * BIG  # text goes through the pipe (bytes would take the arena)
    with pk.WorkerPool(1, start_method=start_method) as pool:
        armed = Pid.of(pool.submit(wf.arm_kill_mid_read, 2 * 1024 * 1024).result(RESULT))
        got = pk.run_parallel(
            wf.length, [data, data, data], backend=pool, chunksize=1, return_exceptions=True
        )
        assert _wait_gone([armed], ORPHANS) == [], "the fault was not injected"
        # The worker dies receiving one item: usually the first, a later one if the watch
        # thread was late (it waits for the GIL while 20 MB arrive in a few large reads).
        # That item never started: re-running it elsewhere is right, so is blaming it.
        crashed = [(i, r) for i, r in enumerate(got) if isinstance(r, BaseException)]
        assert len(crashed) <= 1, got
        for i, exc in crashed:
            _crash(exc, i)
        assert [r for r in got if not isinstance(r, BaseException)] == [BIG] * (3 - len(crashed))
        assert pool.submit(wf.length, data).result(timeout=RESULT) == BIG


@pytest.mark.timeout(60)
def test_crash_while_a_large_result_is_in_flight(start_method: StartMethod) -> None:
    """The worker dies while sending a 20 MB result: that item fails, nothing hangs."""
    with pk.WorkerPool(1, start_method=start_method) as pool:
        armed = Pid.of(pool.submit(wf.arm_kill_mid_write).result(RESULT))
        got = pk.run_parallel(
            wf.big_result, [BIG, BIG, BIG], backend=pool, chunksize=1, return_exceptions=True
        )
        assert _wait_gone([armed], ORPHANS) == [], "the fault was not injected"
        # The armed worker dies in the middle of sending one of the results (usually the
        # first, a later one if the watch was late): that item fails, the others arrive.
        crashed = [i for i, r in enumerate(got) if isinstance(r, BaseException)]
        assert len(crashed) == 1, got
        for i, result in enumerate(got):
            if i in crashed:
                assert isinstance(result, BaseException)
                _crash(result, i)
            else:
                assert isinstance(result, str)
                assert len(result) == BIG
        assert len(pool.submit(wf.big_result, BIG).result(timeout=RESULT)) == BIG


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["wait", "cancel_futures", "no_wait"])
def test_crash_while_the_pool_shuts_down(start_method: StartMethod, how: str) -> None:
    """Workers die while shutdown() is under way: every future ends, shutdown returns."""
    pool = pk.WorkerPool(2, start_method=start_method)
    futures = [pool.submit(wf.die_after, 0.3) for _ in range(4)]
    pool.shutdown(wait=how != "no_wait", cancel_futures=how == "cancel_futures")
    pending = concurrent.futures.wait(futures, timeout=PROMPT).not_done
    assert not pending
    for future in futures:
        if how == "cancel_futures" and future.cancelled():
            continue
        exc = future.exception()
        assert isinstance(exc, pk.WorkerCrashedError), repr(exc)
        assert exc.signal == "SIGKILL"


def _two_worker_pids(pool: pk.WorkerPool) -> tuple[int, int]:
    """Both workers' pids, learnt from tasks that keep both busy at once."""
    for _ in range(10):
        pids = set(pk.run_parallel(wf.pid_after, [0.2] * 4, backend=pool, chunksize=1))
        if len(pids) == 2:
            first, second = pids
            return first, second
    pytest.fail("could not see two different workers")


def _sigkill_and_wait(pids: Iterable[int | None]) -> None:
    """SIGKILL each process and wait until it has exited (a pidfd reads ready then; our
    own children stay unreaped zombies, for the pool to notice)."""
    for pid in pids:
        assert pid is not None
        pidfd = os.pidfd_open(pid)
        try:
            os.kill(pid, signal.SIGKILL)
            assert select.select([pidfd], [], [], 30)[0], f"pid {pid} did not die"
        finally:
            os.close(pidfd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["map", "imap", "submit"])
def test_idle_workers_that_die_are_replaced_and_blame_no_item(
    start_method: StartMethod, api: str
) -> None:
    """Issue 23 §1: workers SIGKILLed between two calls (the OOM killer) are replaced
    silently; the chunks sent to them before their deaths were noticed run elsewhere."""
    with pk.WorkerPool(2, start_method=start_method) as pool:
        assert list(pool.map(wf.square, range(4))) == [0, 1, 4, 9]
        for _ in range(2):  # twice: the replacements may die idle as well
            _sigkill_and_wait([w.pid for w in pool._engine.workers])
            if api == "map":
                assert list(pool.map(wf.square, range(4))) == [0, 1, 4, 9]
            elif api == "imap":
                got = list(pool.imap(wf.square, range(40), chunksize=3, ordered=False))
                assert sorted(got) == [x * x for x in range(40)]
            else:
                assert [pool.submit(wf.square, x).result(timeout=RESULT) for x in (3, 4)] == [
                    9,
                    16,
                ]
        # a worker that crashes on an item is still blamed for it, after all that
        crash = pool.submit(wf.die, 0).exception(timeout=RESULT)
        assert crash is not None
        _crash(crash, 0)


@pytest.mark.timeout(90)
def test_a_worker_that_does_not_read_never_blocks_the_pool(start_method: StartMethod) -> None:
    """Issue 17 §2: the parent wrote a large message to a worker that was not reading (it
    was itself blocked writing to the parent, in the issue) and blocked for ever; no
    other worker's result was read meanwhile.  Here the worker is SIGSTOPped for real (a
    debugger, a machine swapping): the other worker's tasks must complete meanwhile."""
    with pk.WorkerPool(2, start_method=start_method) as pool:
        _two_worker_pids(pool)
        stopped = pool._engine.workers[0].pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        try:
            big = "x" * (16 << 20)  # in band, far more than a pipe holds
            slow = pool.submit(wf.length, big)  # the first idle worker: the stopped one
            small = [pool.submit(wf.square, i) for i in range(8)]
            assert [f.result(timeout=RESULT) for f in small] == [i * i for i in range(8)]
            assert not slow.done()
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert slow.result(timeout=RESULT) == len(big)
        got = list(pool.map(wf.length, [big, "y", big], chunksize=1))
        assert got == [len(big), 1, len(big)]


@pytest.mark.timeout(60)
def test_a_worker_kills_its_sibling(start_method: StartMethod, tmp_path: Path) -> None:
    with pk.WorkerPool(2, start_method=start_method) as pool:
        pids = _two_worker_pids(pool)
        victim = pool.submit(wf.mark_and_sleep, str(tmp_path), 30.0)
        killer = pool.submit(wf.kill_when_running, str(tmp_path), pids)
        killer_pid = killer.result(timeout=RESULT)
        exc = victim.exception(timeout=RESULT)
        assert isinstance(exc, pk.WorkerCrashedError), repr(exc)
        assert exc.signal == "SIGKILL"
        assert {exc.pid, killer_pid} == set(pids)
        assert pk.run_parallel(wf.square, range(10), backend=pool) == [x * x for x in range(10)]


@pytest.mark.timeout(60)
def test_workers_kill_each_other(start_method: StartMethod, tmp_path: Path) -> None:
    with pk.WorkerPool(2, start_method=start_method) as pool:
        pids = _two_worker_pids(pool)
        futures = [pool.submit(wf.kill_each_other, str(tmp_path), pids) for _ in range(2)]
        pending = concurrent.futures.wait(futures, timeout=RESULT).not_done
        assert not pending
        crashed = [f.exception() for f in futures if f.exception() is not None]
        assert crashed, "nobody died"
        for exc in crashed:
            assert isinstance(exc, pk.WorkerCrashedError), repr(exc)
            assert exc.signal == "SIGKILL"
        assert pk.run_parallel(wf.square, range(10), backend=pool) == [x * x for x in range(10)]


@pytest.mark.timeout(90)
def test_many_crashes_in_a_row_are_all_reported(start_method: StartMethod) -> None:
    got = pk.run_parallel(
        wf.die,
        range(20),
        start_method=start_method,
        max_workers=2,
        chunksize=1,
        return_exceptions=True,
    )
    assert len(got) == 20
    for i, exc in enumerate(got):
        assert isinstance(exc, BaseException), (i, exc)
        _crash(exc, i)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "initializer", [wf.exit_in_initializer, wf.kill_in_initializer], ids=["os_exit", "sigkill"]
)
def test_crash_in_the_initializer_is_a_clear_error(
    start_method: StartMethod, initializer: Callable[[], None]
) -> None:
    def check(exc: BaseException | None) -> None:
        assert isinstance(exc, pk.WorkerCrashedError), repr(exc)
        assert "initializer" in str(exc)
        if initializer is wf.exit_in_initializer:
            assert (exc.exitcode, exc.signal) == (4, None)
        else:
            assert (exc.exitcode, exc.signal) == (-signal.SIGKILL, "SIGKILL")

    with pytest.raises(pk.WorkerCrashedError) as info:
        pk.run_parallel(
            wf.square, range(4), start_method=start_method, max_workers=1, initializer=initializer
        )
    check(info.value)
    with pk.WorkerPool(1, start_method=start_method, initializer=initializer) as pool:
        check(pool.submit(wf.square, 2).exception(timeout=RESULT))


# ------------------------------------------------------------------ recycling, cancellation


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["wait", "cancel_futures", "no_wait"])
def test_recycling_coincides_with_shutdown(start_method: StartMethod, how: str) -> None:
    """max_tasks_per_worker=1: every worker retires just as shutdown() stops them all."""
    count = 8 if start_method == "fork" else 4
    pool = pk.WorkerPool(2, start_method=start_method, max_tasks_per_worker=1)
    futures = [pool.submit(wf.square, i) for i in range(count)]
    pool.shutdown(wait=how != "no_wait", cancel_futures=how == "cancel_futures")
    pending = concurrent.futures.wait(futures, timeout=PROMPT).not_done
    assert not pending
    for i, future in enumerate(futures):
        if how == "cancel_futures" and future.cancelled():
            continue
        assert future.result() == i * i
    with pk.WorkerPool(2, start_method=start_method, max_tasks_per_worker=2) as pool:
        assert list(pool.imap(wf.square, range(count))) == [x * x for x in range(count)]


@pytest.mark.timeout(30)
def test_shutdown_cancel_futures_with_lambdas_never_hangs(start_method: StartMethod) -> None:
    pool = pk.WorkerPool(1, start_method=start_method)
    first = pool.submit(lambda: wf.sleep_for(0.5))
    deadline = time.monotonic() + RESULT
    while not first.running():  # a Future offers no way to wait for "started"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # mypy cannot infer a lambda with a default argument; that is what users write
    rest = [pool.submit(lambda i=i: 2 * i) for i in range(20)]  # type: ignore[misc]
    lock = threading.Lock()
    with pytest.raises(pk.SerializationError) as info:
        pool.submit(lambda: not lock.locked())  # cannot be sent: it holds a lock
    assert info.value.what == "function"
    pool.shutdown(wait=True, cancel_futures=True)
    assert first.result(timeout=0) == 0.5
    for i, future in enumerate(rest):
        assert future.done()
        assert future.cancelled() or future.result() == 2 * i
    assert sum(f.cancelled() for f in rest) >= len(rest) - 1  # one may be queued already


# ------------------------------------------------------------------ Ctrl-C


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("api", "target"),
    [("run", "group"), ("run", "process"), ("pool", "group"), ("pipeline", "group")],
    ids=["run_parallel-terminal", "run_parallel-kill", "pool-terminal", "pipeline-terminal"],
)
def test_ctrl_c_interrupts_promptly_and_cleanly(
    start_method: StartMethod, api: str, target: str, tmp_path: Path
) -> None:
    """SIGINT to the whole foreground group (a terminal's Ctrl-C) or to the caller alone."""
    with Script(tmp_path, "ctrl_c.py", start_method, api) as script:
        script.expect("READY", STARTUP)
        workers = script.expect_workers(2, STARTUP)
        if target == "group":
            os.killpg(script.pgid, signal.SIGINT)
        else:
            os.kill(script.proc.pid, signal.SIGINT)
        script.expect("KEYBOARD_INTERRUPT", INTERRUPT)
        script.expect("CLEAN", 15)  # the script's own leak check passed
        assert script.wait(EXIT) == 0
        assert _wait_gone(workers, 0) == []
        stderr = script.stderr()
        assert "Traceback" not in stderr, stderr
        assert "KeyboardInterrupt" not in stderr, stderr


def _blocked_signals(native_id: int) -> set[int]:
    """The signals thread ``native_id`` of this process blocks (``SigBlk`` in /proc)."""
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("SigBlk:"))
    mask = int(line.split()[1], 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def _held_source(release: threading.Event) -> Iterator[bytes]:
    """A pipeline source: one large item (the router's writer thread sends it), then it
    waits, so the source thread is still there while the test looks at it."""
    yield bytes(4 << 20)
    release.wait(RESULT)


def _submit_or_pipeline(api: str, start_method: StartMethod) -> None:
    if api == "submit":
        with pk.WorkerPool(2, start_method=start_method) as pool:
            assert pool.submit(abs, -1).result(timeout=RESULT) == 1
            assert pool.submit(abs, -2).result(timeout=RESULT) == 2
    else:
        release = threading.Event()
        release.set()
        pipeline = pk.Pipeline(_held_source(release), start_method=start_method).map(len)
        assert pipeline.run() == [4 << 20]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("api", ["submit", "pipeline"])
def test_a_ctrl_c_at_any_change_of_the_callers_signal_mask_leaves_it_as_it_was(
    start_method: StartMethod, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the stress run (ctrl_c, fork, seed 402790661): a Ctrl-C raised just as the
    pool blocked signals in the calling thread (to start its futures thread) skipped the
    restore; the main thread kept every signal blocked and the next future never
    completed.  A KeyboardInterrupt is raised here right after each call that changes the
    main thread's mask, one place per run: the mask must end as it began, and the next
    run must work."""
    real = signal.pthread_sigmask
    main = threading.get_ident()
    before = real(signal.SIG_BLOCK, ())
    seen = 0
    target = 0

    def pthread_sigmask(how: int, mask: Iterable[int]) -> set[int | signal.Signals]:
        nonlocal seen
        mask = set(mask)
        old = real(how, mask)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        ours = caller.startswith("parallelkit.")  # not the stdlib's (its resource tracker)
        if ours and threading.get_ident() == main and (how != signal.SIG_BLOCK or mask):
            seen += 1
            if seen == target:
                raise KeyboardInterrupt  # a Ctrl-C, raised as the call returns
        return old

    for target in range(1, 5):
        seen = 0

        monkeypatch.setattr(signal, "pthread_sigmask", pthread_sigmask)
        with contextlib.suppress(KeyboardInterrupt):
            _submit_or_pipeline(api, start_method)
        monkeypatch.undo()
        assert real(signal.SIG_BLOCK, ()) == before, (target, seen)
    _submit_or_pipeline(api, start_method)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("where", ["release", "acquire"])
@pytest.mark.parametrize("api", ["run_parallel", "submit"])
def test_a_ctrl_c_as_the_engines_mutex_changes_hands_leaves_it_consistent(
    api: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the suite (test_ctrl_c_interrupts_promptly_and_cleanly, fork, under load): a
    Ctrl-C that landed right after the driving thread released the engine's mutex to wait
    (before the ``try`` whose ``finally`` takes it back) unwound into code that assumed the
    mutex held: ``RuntimeError: cannot notify on un-acquired lock``, then ``release unlocked
    lock``, instead of KeyboardInterrupt.  Here a KeyboardInterrupt is raised right after
    each release (or acquire) of the mutex in the main thread, one place per run: the call
    must raise KeyboardInterrupt or finish, and the next call must work.  (Fork only: where
    the mutex changes hands does not depend on how workers start.)"""
    real = {name: getattr(Mutex, name) for name in ("acquire", "release")}
    main = threading.get_ident()
    seen = 0
    target = 0

    def interrupting(name: str) -> Callable[..., object]:
        def call(self: Mutex, *args: object) -> object:
            nonlocal seen
            result = real[name](self, *args)
            if name == where and threading.get_ident() == main and result is not False:
                seen += 1
                if seen == target:
                    raise KeyboardInterrupt  # a Ctrl-C, raised as the call returns
            return result

        return call

    def work(pool: pk.WorkerPool | None) -> None:
        if pool is None:
            assert pk.run_parallel(abs, range(-40, 40), max_workers=2, start_method="fork") == [
                abs(i) for i in range(-40, 40)
            ]
        else:
            assert [f.result(timeout=RESULT) for f in [pool.submit(abs, -i) for i in range(8)]] == [
                *range(8)
            ]

    with contextlib.ExitStack() as stack:
        pool = None
        if api == "submit":
            pool = stack.enter_context(pk.WorkerPool(2, start_method="fork"))
        target = 10**9  # count the main thread's calls in one clean run
        for name in real:
            monkeypatch.setattr(Mutex, name, interrupting(name))
        work(pool)
        calls = seen
        assert calls > 0
        interrupted = 0
        for n in range(1, calls + 1):
            seen, target = 0, n
            try:
                work(pool)
            except KeyboardInterrupt:
                interrupted += 1
            except pk.ParallelKitError:
                # a pool a Ctrl-C broke refuses further work (as it did before); start another
                assert pool is not None
                stack.close()
                pool = stack.enter_context(pk.WorkerPool(2, start_method="fork"))
        monkeypatch.undo()
        assert interrupted > 0
        if pool is not None and not pool_usable(pool):
            stack.close()
            pool = stack.enter_context(pk.WorkerPool(2, start_method="fork"))
        work(pool)


def pool_usable(pool: pk.WorkerPool) -> bool:
    try:
        return bool(pool.submit(abs, -1).result(timeout=RESULT) == 1)
    except pk.ParallelKitError:
        return False


@pytest.mark.timeout(60)
def test_a_pipelines_threads_never_take_a_ctrl_c_from_the_main_thread(
    start_method: StartMethod,
) -> None:
    """The threads a pipeline starts in the caller's process (the source thread: it has no
    writer thread any more) block every asynchronous signal, as the pool's futures thread
    does: a process-directed SIGINT the kernel gave one of them would not wake the main
    thread."""
    release = threading.Event()
    pipeline = pk.Pipeline(_held_source(release), start_method=start_method).map(len)
    iterator = iter(pipeline)
    try:
        assert next(iterator) == 4 << 20
        ours = {t.name: t for t in threading.enumerate() if t.name.startswith("parallelkit-")}
        assert set(ours) == {"parallelkit-pipeline-source"}
        for thread in ours.values():
            assert thread.native_id is not None
            blocked = _blocked_signals(thread.native_id)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                assert sig in blocked, (thread.name, sig, blocked)
        assert signal.SIGINT not in _blocked_signals(threading.get_native_id())
    finally:
        release.set()
        assert list(iterator) == []


@pytest.mark.timeout(60)
def test_the_futures_thread_never_takes_a_ctrl_c_from_the_main_thread(
    start_method: StartMethod, tmp_path: Path
) -> None:
    """Issue 17 §5: the kernel may give a process-directed SIGINT to any thread that does
    not block it.  Given to the pool's futures thread, Python noted it, but the main
    thread, asleep in ``Future.result()``, was not woken to raise KeyboardInterrupt until
    a task finished (30 s in the Ctrl-C test).  Our thread blocks every asynchronous
    signal; a worker it starts (a replacement) unblocks them."""
    release = tmp_path / "release"
    with pk.WorkerPool(1, start_method=start_method) as pool:
        future = pool.submit(wf.wait_for_file, str(release))
        try:
            helper = next(t for t in threading.enumerate() if t.name == "parallelkit-futures")
            assert helper.native_id is not None
            blocked = _blocked_signals(helper.native_id)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                assert sig in blocked, (sig, blocked)
            assert signal.SIGINT not in _blocked_signals(threading.get_native_id())
        finally:
            release.touch()
        first = future.result(timeout=RESULT)
        # a worker started by that thread (after a crash) takes these signals again
        assert isinstance(pool.submit(wf.die, 0).exception(timeout=RESULT), pk.WorkerCrashedError)
        again = pool.submit(wf.wait_for_file, str(release)).result(timeout=RESULT)
        assert again != first
        status = Path(f"/proc/{again}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("SigBlk:"))
        assert int(line.split()[1], 16) == 0, line


@pytest.mark.timeout(90)
def test_ctrl_c_during_worker_start_up_prints_no_tracebacks(
    start_method: StartMethod, tmp_path: Path
) -> None:
    """A SIGINT storm on the group while pools start: no worker may print a traceback."""
    with Script(tmp_path, "sigint_storm.py", start_method) as script:
        script.expect("READY", STARTUP)
        sent = 0
        deadline = time.monotonic() + STARTUP
        done = False
        while not done and script.proc.poll() is None and time.monotonic() < deadline:
            os.killpg(script.pgid, signal.SIGINT)
            sent += 1
            line = script.read_line(time.monotonic() + 0.003)
            done = line is not None and line.startswith("DONE")
        if not done:
            script.expect("DONE", 5)
        assert script.wait(EXIT) == 0
        stderr = script.stderr()
    assert sent >= 200
    if start_method == "forkserver":
        # The standard library's forkserver gives each new child Python's default SIGINT
        # handler, and a SIGINT that lands before the child reaches any parallelkit code
        # can make the interpreter print "Exception ignored ... KeyboardInterrupt" while it
        # dies (seen on 3.12 and 3.13).  Changing that would change the forkserver shared
        # with the user's own processes.  What parallelkit guarantees there: nothing
        # printed from its own code (multiprocessing's own traceback may name the process,
        # "Process parallelkit-worker-0:", now that the server preloads our modules and the
        # child reaches multiprocessing's bootstrap sooner).
        assert f"{os.sep}parallelkit{os.sep}" not in stderr, stderr
    else:
        assert "Traceback" not in stderr, stderr
        assert "KeyboardInterrupt" not in stderr, stderr


@pytest.mark.timeout(60)
def test_a_ctrl_c_while_a_child_reads_its_process_object_is_ignored(
    start_method: StartMethod, capfd: pytest.CaptureFixture[str]
) -> None:
    """Deterministic form of the storm above: SIGINT arrives in the child while it unpickles
    its process object (the forkserver's child has Python's default handler then).  The
    child ignores it and runs its role; no KeyboardInterrupt is printed.  (Under fork the
    arguments are inherited, not unpickled: no signal is sent, the child just runs.)"""
    context = multiprocessing.get_context(start_method)
    ours, theirs = multiprocessing.Pipe()
    process = lifecycle.start_child(
        context,
        start_method,
        wf.say_ran,
        theirs,
        args=(wf.RaiseSigint(),),
        name="parallelkit-test-sigint",
    )
    theirs.close()
    try:
        assert ours.poll(30)
        assert ours.recv() == "ran"
        process.join(30)
        assert process.exitcode == 0
    finally:
        ours.close()
        if process.exitcode is None:
            process.kill()
            process.join(10)
        process.close()
    assert "KeyboardInterrupt" not in capfd.readouterr().err


# ------------------------------------------------------------------ parent death


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["pool", "pipeline"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_exit_when_the_parent_dies(
    start_method: StartMethod, sig: signal.Signals, api: str, tmp_path: Path
) -> None:
    with Script(tmp_path, "parent_death.py", start_method, api) as script:
        script.expect("SUBMITTED", STARTUP)
        workers = script.expect_workers(2, STARTUP)
        os.kill(script.proc.pid, sig)
        assert script.wait(EXIT) == -sig
        assert _wait_gone(workers, ORPHANS) == [], script.stderr()
        # nor anything else it started (the forkserver and the resource tracker end too)
        assert _wait_gone(_group(script.pgid), ORPHANS) == []


# ------------------------------------------------------------------ abandoned work


def _wait_running(future: concurrent.futures.Future[float]) -> None:
    deadline = time.monotonic() + RESULT
    while not future.running():
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_dropped_pool_with_work_pending_warns_and_stops(start_method: StartMethod) -> None:
    pool = pk.WorkerPool(2, start_method=start_method)
    futures = [pool.submit(wf.sleep_for, 30.0) for _ in range(3)]
    _wait_running(futures[0])
    with pytest.warns(ResourceWarning, match="work pending"):  # noqa: PT031 - drop, then collect
        del pool
        gc.collect()
    pending = concurrent.futures.wait(futures, timeout=EXIT).not_done
    assert not pending
    assert all(f.cancelled() or f.exception() is not None for f in futures)
    # the autouse leak check proves that the workers are gone within seconds


@pytest.mark.timeout(60)
def test_dropped_pool_stops_even_when_resource_warnings_are_errors(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As under ``-W error``: the warning cannot stop the clean-up."""
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    pool = pk.WorkerPool(2, start_method=start_method)
    futures = [pool.submit(wf.sleep_for, 30.0) for _ in range(3)]
    _wait_running(futures[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del pool
        gc.collect()
    pending = concurrent.futures.wait(futures, timeout=EXIT).not_done
    assert not pending, f"futures left hanging; unraisable: {unraisable}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["pool", "imap"])
def test_interpreter_exit_with_work_pending(
    start_method: StartMethod, api: str, tmp_path: Path
) -> None:
    python = ("-W", "always::ResourceWarning")
    with Script(tmp_path, "exit_pending.py", start_method, api, python=python) as script:
        workers = script.expect_workers(2, STARTUP)
        script.expect("EXITING", STARTUP)
        assert script.wait(EXIT) == 0
        assert _wait_gone(workers, ORPHANS) == []
        assert _wait_gone(_group(script.pgid), ORPHANS) == []
        stderr = script.stderr()
    assert "Traceback" not in stderr, stderr
    if api == "pool":
        assert any(
            "ResourceWarning" in line and "parallelkit" in line for line in stderr.splitlines()
        )


# ------------------------------------------------------------------ the __main__ guard


@pytest.mark.timeout(60)
def test_missing_main_guard_gives_one_clear_error(
    start_method: StartMethod, tmp_path: Path
) -> None:
    with Script(tmp_path, "no_main_guard.py", start_method) as script:
        code = script.wait(STARTUP)
        lines = script.rest(EXIT)
        stderr = script.stderr()
        assert _wait_gone(_group(script.pgid), ORPHANS) == []
    if start_method == "fork":  # the children do not import the main module again
        assert code == 0, stderr
        assert lines == [str([x * x for x in range(8)])]
        return
    assert code == 1, stderr
    assert stderr.count("Traceback") <= 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("parallelkit.errors.WorkerCrashedError:"), stderr
    assert "__main__" in last


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("script_name", "expected", "output", "tracebacks"),
    [
        ("no_main_guard_pipeline.py", "PipelineError", str([x * x for x in range(8)]), 1),
        # the parent's error, and the connection reset that is its cause
        ("no_main_guard_channel.py", "ChannelClosedError", "echo", 2),
    ],
)
def test_missing_main_guard_in_a_pipeline_or_channel_script_gives_one_clear_error(
    start_method: StartMethod,
    tmp_path: Path,
    script_name: str,
    expected: str,
    output: str,
    tracebacks: int,
) -> None:
    # As for a map (above): the stage processes and start_process children used to die
    # each with a traceback of multiprocessing's bootstrapping error, reported as a crash
    # (or a closed channel) with exit code 1.
    with Script(tmp_path, script_name, start_method) as script:
        code = script.wait(STARTUP)
        lines = script.rest(EXIT)
        stderr = script.stderr()
        assert _wait_gone(_group(script.pgid), ORPHANS) == []
    if start_method == "fork":  # the children do not import the main module again
        assert code == 0, stderr
        assert lines == [output]
        return
    assert code == 1, stderr
    assert stderr.count("Traceback") <= tracebacks, stderr
    assert "bootstrapping phase" not in stderr, stderr  # multiprocessing's, from a child
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"parallelkit.errors.{expected}:"), stderr
    assert "__main__" in last


# Run in a child that says it is bootstrapping (as a spawn/forkserver child importing the
# parent's main module is): each shared-memory segment made before the refusal is printed.
_REFUSED_BEFORE_ANYTHING = """
import multiprocessing, sys
import parallelkit as pk
import tasks.channel as wc
import tasks.faults as wf
from parallelkit._wire import shm

made = shm.Segment.create
def create(*args, **kwargs):
    segment = made(*args, **kwargs)
    print("MADE", segment.name, flush=True)
    return segment
shm.Segment.create = create
multiprocessing.current_process()._inheriting = True
what = sys.argv[1]
if what == "map":
    pk.run_parallel(wf.square, range(4), max_workers=2, start_method="fork")
elif what == "pipeline":
    pk.Pipeline(range(4), start_method="fork").map(wf.square, max_workers=2).run()
else:
    pk.start_process(wc.echo, start_method="fork").close()
print("STARTED", flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["map", "pipeline", "channel"])
def test_a_child_importing_main_that_starts_work_refuses_before_making_anything(
    what: str,
) -> None:
    # A pipeline made its ledger segment before the refusal: a second worker, killed by
    # its parent (whose first worker had refused) between registering the ledger's name
    # and making its file, left the resource tracker a name to warn about at exit.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", _REFUSED_BEFORE_ANYTHING, what],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
        check=False,
    )
    assert done.returncode == EXIT_MAIN_GUARD, done.stderr
    assert done.stdout == "", done.stdout  # no segment made, no work started
    assert "guard it with" in done.stderr


# ------------------------------------------------------------------ cannot start a worker


@pytest.mark.timeout(90)
def test_out_of_file_descriptors(start_method: StartMethod, tmp_path: Path) -> None:
    # six workers: a window of spares wide enough that some start and the next cannot,
    # whatever the jitter in what one start needs
    spares = [*range(25), 60]
    with Script(tmp_path, "rlimit_nofile.py", start_method, *map(str, spares)) as script:
        code = script.wait(STARTUP)
        lines = script.rest(EXIT)
        stderr = script.stderr()
    assert code == 0, stderr
    assert lines[-1] == "CLEAN", stderr  # each attempt left no worker behind
    outcomes = [line.split(maxsplit=4)[1:] for line in lines if line.startswith("RESULT ")]
    assert [int(spare) for spare, *_ in outcomes] == spares
    for spare, started, failed, outcome in outcomes:
        if outcome == "ok":
            continue
        assert outcome.startswith("OSError "), (spare, outcome)
        if int(started) or int(failed):  # it was starting workers when it ran out
            assert "could not start a worker process" in outcome, (spare, outcome)
        else:  # before any worker: the plain error of whatever ran out
            assert outcome.startswith(f"OSError {errno.EMFILE} "), (spare, outcome)
    # the interesting case happened: some workers started, then the next one could not
    assert any(int(started) > 0 and outcome != "ok" for _, started, _, outcome in outcomes)
    assert outcomes[-1][3] == "ok"


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


@pytest.mark.timeout(60)
@pytest.mark.parametrize("nth", [1, 3])
@pytest.mark.parametrize("api", ["run_parallel", "pool"])
def test_process_start_failing_on_the_nth_call(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch, nth: int, api: str
) -> None:
    """As when fork() fails (EAGAIN): a clear error; the workers that did start are reaped."""
    calls = 0
    original = BaseProcess.start

    def start(self: BaseProcess) -> None:
        nonlocal calls
        calls += 1
        if calls == nth:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable (injected)")
        original(self)

    monkeypatch.setattr(BaseProcess, "start", start)
    error: BaseException | None = None
    if api == "run_parallel":
        with pytest.raises(OSError) as info:  # noqa: PT011 - the message is checked below
            pk.run_parallel(wf.square, range(20), start_method=start_method, max_workers=4)
        error = info.value
    else:
        with pk.WorkerPool(4, start_method=start_method) as pool:
            try:
                futures = [pool.submit(wf.sleep_for, 0.1) for _ in range(8)]
                for future in futures:
                    future.result(timeout=RESULT)
            except Exception as exc:
                error = exc
    assert calls >= nth
    clear = [e for e in _chain(error) if isinstance(e, OSError)]
    assert clear, f"no OSError: {error!r}"
    assert "could not start a worker process" in str(clear[0])
    assert clear[0].errno == errno.EAGAIN
    monkeypatch.undo()
    assert pk.run_parallel(wf.square, range(4), start_method=start_method, max_workers=2) == [
        0,
        1,
        4,
        9,
    ]
    # the autouse leak check proves that every worker that did start was reaped


# ------------------------------------------------------------------ many pools


def _resources() -> set[str]:
    """Open file descriptors, Python threads, and the ``/dev/shm`` entries of multiprocessing."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            found.add(f"fd {name} -> {os.readlink(f'/proc/self/fd/{name}')}")
        except OSError:  # the descriptor listdir used, closed by now
            continue
    found.update(f"thread {t.name} {t.ident}" for t in threading.enumerate())
    for directory in {"/dev/shm", str(_platform.SEGMENT_DIR)}:
        names = os.listdir(directory) if os.path.isdir(directory) else []
        found.update(
            f"{directory}/{name}" for name in names if name.startswith(("sem.mp-", "psm_", "pk"))
        )
    return found


def _new_resources(before: set[str], timeout: float = 5.0) -> set[str]:
    """What is there now and was not ``before``, once it had ``timeout`` s to go away."""
    deadline = time.monotonic() + timeout  # a helper thread may take a moment to end
    while (new := _resources() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return new


@pytest.mark.timeout(90)
def test_hundreds_of_pools_leave_nothing_behind(start_method: StartMethod) -> None:
    rounds = {"fork": 200, "forkserver": 20, "spawn": 10}[start_method]

    def one(i: int) -> None:
        if i % 2:
            with pk.WorkerPool(2, start_method=start_method) as pool:
                assert pool.submit(wf.square, i).result(timeout=RESULT) == i * i
        else:
            got = pk.run_parallel(wf.square, [i, i + 1], start_method=start_method)
            assert got == [i * i, (i + 1) * (i + 1)]

    for i in range(2):  # warm up: multiprocessing's helpers, lazy imports
        one(i)
    before = _resources()  # what is gone by the end does not matter, what is new does
    for i in range(rounds):
        one(i)
        if i % max(1, rounds // 4) == 0:  # nothing piles up along the way
            assert _new_resources(before) == set(), f"after {i + 1} pools"
    assert _new_resources(before) == set()
