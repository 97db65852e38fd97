"""parallelkit.testing: the leak check catches real leaks, and the strategies draw valid knobs.

Every test here leaks something for real inside a nested check, asserts that the check
fails naming it, and then cleans up, so that the suite's own autouse check stays green.
"""

from __future__ import annotations

import doctest
import gc
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import shared_memory
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given

import parallelkit as pk
import parallelkit.testing
import tasks.basic as w
from child import TESTS, package_env, run_python
from parallelkit import StartMethod, _platform
from parallelkit._util import owners as _owners
from parallelkit._util.context import available_start_methods
from parallelkit.testing import (
    LeakCheck,
    LeakError,
    check_no_leaks,
    chunksizes,
    start_methods,
    worker_counts,
)

QUICK = 0.2  # grace for checks that are expected to fail


def _blocked_child() -> subprocess.Popen[bytes]:
    """A child process that lives until its stdin is closed."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )


def _exited_child() -> subprocess.Popen[bytes]:
    """A child process that has exited but has not been waited for: a zombie."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # wait, but do not reap
    return child


def _process(
    start_method: StartMethod, target: Callable[[float], object], arg: float
) -> BaseProcess:
    """An unstarted ``multiprocessing`` process under ``start_method``."""
    # typeshed types get_context(<a StartMethod variable>) as BaseContext, which has no
    # Process attribute; each concrete context has one, with the same signature.
    ctx = cast(SpawnContext, multiprocessing.get_context(start_method))
    return ctx.Process(target=target, args=(arg,))


def _finish(child: subprocess.Popen[bytes]) -> None:
    if child.stdin is not None:
        child.stdin.close()
    child.wait(timeout=10)


@pytest.fixture(params=["psutil", "proc"])
def process_source(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with psutil, and with psutil hidden (the /proc reader)."""
    source: str = request.param
    if source == "proc":
        monkeypatch.setattr(parallelkit.testing, "_psutil", lambda: None)
    else:
        pytest.importorskip("psutil")
    return source


# ------------------------------------------------------------------------------ processes


def test_clean_block_passes() -> None:
    with check_no_leaks():
        assert sum(range(10)) == 45


def test_leaked_child_process_fails(process_source: str) -> None:
    child: subprocess.Popen[bytes] | None = None
    try:
        with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK):
            child = _blocked_child()
        assert child is not None
        assert info.value.processes == (child.pid,)
        assert f"child process {child.pid} (running)" in str(info.value)
        assert "sys.stdin.read()" in str(info.value)
    finally:
        if child is not None:
            _finish(child)


def test_leaked_multiprocessing_process_fails(start_method: StartMethod) -> None:
    # Under forkserver the worker is a grandchild (the forkserver's child): still caught.
    process = _process(start_method, time.sleep, 60)
    try:
        with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK):
            process.start()
        assert info.value.processes == (process.pid,)
    finally:
        process.kill()
        process.join(timeout=10)
    assert process.exitcode == -signal.SIGKILL


def test_process_that_exits_within_grace_is_reaped_not_reported(
    start_method: StartMethod,
) -> None:
    process = _process(start_method, abs, -1)
    with check_no_leaks():
        process.start()  # never joined: the check reaps it
    assert process not in multiprocessing.active_children()
    assert process.exitcode == 0


def test_zombie_started_inside_block_is_reported(process_source: str) -> None:
    child: subprocess.Popen[bytes] | None = None
    try:
        with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK):
            child = _exited_child()
        assert child is not None
        assert info.value.processes == (child.pid,)
        assert "zombie" in str(info.value)
    finally:
        if child is not None:
            child.wait(timeout=10)


def test_kill_true_kills_leaked_processes() -> None:
    child: subprocess.Popen[bytes] | None = None
    try:
        with pytest.raises(LeakError, match="were killed"), check_no_leaks(grace=QUICK, kill=True):
            child = _blocked_child()
        assert child is not None
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child is not None:
            _finish(child)


def test_multiprocessing_helpers_are_not_leaks() -> None:
    # In a fresh interpreter, so that the resource tracker and the forkserver really are
    # started inside the checked block.
    script = """
import multiprocessing.forkserver, multiprocessing.resource_tracker
from parallelkit.testing import check_no_leaks
with check_no_leaks(grace=1.0):
    multiprocessing.resource_tracker.ensure_running()
    multiprocessing.forkserver.ensure_running()
print("ok")
"""
    result = run_python("-c", script, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_forkserver_children_are_watched() -> None:
    if "forkserver" not in available_start_methods():
        pytest.skip("no forkserver on this platform")
    multiprocessing.forkserver.ensure_running()
    process = _process("forkserver", time.sleep, 60)
    try:
        with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK):
            process.start()
        assert info.value.processes == (process.pid,)
    finally:
        process.kill()
        process.join(timeout=10)


# ------------------------------------------------------------------------------ threads


def test_leaked_thread_fails() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="forgotten-thread")
    try:
        with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK):
            thread.start()
        assert info.value.threads == (thread,)
        assert "forgotten-thread" in str(info.value)
    finally:
        release.set()
        thread.join(timeout=10)


def test_thread_that_ends_within_grace_is_not_a_leak() -> None:
    timer = threading.Timer(0.05, abs, args=(-1,))
    with check_no_leaks():
        timer.start()
    assert not timer.is_alive()


# ------------------------------------------------------------------------------ /dev/shm


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_leaked_shared_memory_segment_fails() -> None:
    segment: shared_memory.SharedMemory | None = None
    try:
        with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK):
            segment = shared_memory.SharedMemory(create=True, size=64)
        assert segment is not None
        assert info.value.shm == (segment.name,)
        assert f"/dev/shm/{segment.name}" in str(info.value)
    finally:
        if segment is not None:
            segment.close()
            segment.unlink()
    assert segment is not None
    assert not Path("/dev/shm", segment.name).exists()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_leaked_semaphore_fails() -> None:
    # Under spawn (and forkserver) a semaphore keeps its name in /dev/shm while it lives;
    # under fork it is unlinked at once.
    holder: list[object] = []
    with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK):
        holder.append(multiprocessing.get_context("spawn").Semaphore())
    (entry,) = info.value.shm
    assert entry.startswith("sem.mp-")
    assert Path("/dev/shm", entry).exists()
    holder.clear()  # its finalizer unlinks the name
    gc.collect()
    assert not Path("/dev/shm", entry).exists()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_segment_freed_by_collector_within_grace_is_not_a_leak() -> None:
    # A semaphore caught in a reference cycle is released when the collector runs; the
    # check runs it while it waits.
    with check_no_leaks():
        cycle: list[object] = [multiprocessing.get_context("spawn").Semaphore()]
        cycle.append(cycle)
        del cycle


# ------------------------------------------------------------------------------ fds


def test_file_descriptors_are_watched_only_on_request(tmp_path: Path) -> None:
    path = tmp_path / "leaky.txt"
    with check_no_leaks(grace=QUICK):
        first = path.open("w")  # not watched by default
    try:
        with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK, fds=True):
            second = path.open("w")
        try:
            assert info.value.fds == (second.fileno(),)
            assert str(path) in str(info.value)
        finally:
            second.close()
    finally:
        first.close()


# ------------------------------------------------------------------------------ owners
#
# A pool created before a block and first used inside it starts its workers there: they are
# the pool's, not the block's leaks (issue 23, item 2).  Each test uses the pool again after
# the check: a check that killed its workers would make that fail.

BIG = 1 << 20  # bytes: an argument that travels through the pool's shared-memory arena


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _our_segments() -> set[str]:
    names = os.listdir(_platform.SEGMENT_DIR) if _platform.SEGMENT_DIR.is_dir() else []
    return {name for name in names if name.startswith(f"pk_{os.getpid()}_")}


def test_worker_pool_created_before_the_block_is_not_its_leak(start_method: StartMethod) -> None:
    with pk.WorkerPool(2, start_method=start_method) as pool:
        segments = _our_segments()
        with check_no_leaks(grace=QUICK, kill=True):
            pids = set(pool.map(w.pid_of, range(4), chunksize=1))  # starts the workers
            pids |= set(pool.map(w.pid_of, [pickle.PickleBuffer(bytearray(BIG))] * 4, chunksize=1))
            pids.add(pool.submit(w.pid_of, None).result())  # the futures thread
            assert _our_segments() - segments  # the arena, made inside the block
        assert all(_alive(pid) for pid in pids)
        assert list(pool.map(w.square, range(4))) == [0, 1, 4, 9]


def test_thread_pool_executor_created_before_the_block_is_not_its_leak() -> None:
    with ThreadPoolExecutor(2) as executor:
        with check_no_leaks(grace=QUICK):
            assert list(executor.map(abs, [-1, -2, -3])) == [1, 2, 3]
        assert executor.submit(abs, -4).result() == 4


def test_process_pool_executor_created_before_the_block_is_not_its_leak(
    start_method: StartMethod,
) -> None:
    context = multiprocessing.get_context(start_method)
    with ProcessPoolExecutor(2, mp_context=context) as executor:
        with check_no_leaks(grace=QUICK, kill=True):
            pids = set(executor.map(w.pid_of, range(4)))
        assert all(_alive(pid) for pid in pids)
        assert executor.submit(w.square, 5).result() == 25


def test_multiprocessing_queue_created_before_the_block_is_not_its_leak(
    start_method: StartMethod,
) -> None:
    queue = multiprocessing.get_context(start_method).Queue()
    try:
        with check_no_leaks(grace=QUICK):
            queue.put("x")  # starts the queue's feeder thread
        assert queue.get(timeout=10) == "x"
    finally:
        queue.close()
        queue.join_thread()


def test_worker_pool_created_inside_the_block_and_left_open_is_a_leak(
    start_method: StartMethod,
) -> None:
    pools: list[pk.WorkerPool] = []
    try:
        with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK):
            pids = _open_pool_and_use(start_method, pools)
        assert set(info.value.processes) >= pids
    finally:
        for pool in pools:
            pool.shutdown()


def _open_pool_and_use(start_method: StartMethod, pools: list[pk.WorkerPool]) -> set[int]:
    pool = pk.WorkerPool(2, start_method=start_method)
    pools.append(pool)
    return set(pool.map(w.slow_pid, range(2), chunksize=1))


def test_thread_pool_executor_created_inside_the_block_and_left_open_is_a_leak() -> None:
    executors: list[ThreadPoolExecutor] = []
    try:
        with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK):
            _open_executor_and_use(executors)
        assert [t.name for t in info.value.threads] == ["left-open_0"]
    finally:
        for executor in executors:
            executor.shutdown()


def _open_executor_and_use(executors: list[ThreadPoolExecutor]) -> None:
    executor = ThreadPoolExecutor(1, thread_name_prefix="left-open")
    executors.append(executor)
    assert executor.submit(abs, -1).result() == 1


def test_process_leaked_beside_an_older_pool_is_caught_and_only_it_killed(
    start_method: StartMethod,
) -> None:
    with pk.WorkerPool(2, start_method=start_method) as pool:
        process = _process(start_method, time.sleep, 60)
        try:
            with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK, kill=True):
                pids = _use_and_start(pool, process)
            assert info.value.processes == (process.pid,)
            assert "were killed" in str(info.value)
        finally:
            process.join(timeout=10)
        assert process.exitcode == -signal.SIGKILL
        assert all(_alive(pid) for pid in pids)
        assert list(pool.map(w.square, range(3))) == [0, 1, 4]


def _use_and_start(pool: pk.WorkerPool, process: BaseProcess) -> set[int]:
    pids = set(pool.map(w.pid_of, range(4), chunksize=1))
    process.start()
    return pids


class _Unsure:
    """An owner that cannot say what it holds."""

    def holds(self) -> _owners.Owned:
        raise RuntimeError("cannot tell")


def test_kill_kills_nothing_when_an_older_owner_cannot_say_what_it_holds() -> None:
    unsure = _Unsure()
    _owners.register(unsure, _Unsure.holds)
    child: subprocess.Popen[bytes] | None = None
    try:
        with pytest.raises(LeakError) as info, check_no_leaks(grace=QUICK, kill=True):
            child = _blocked_child()
        assert child is not None
        assert info.value.processes == (child.pid,)
        assert "0 of the leaked processes killed; 1 not" in str(info.value)
        assert child.poll() is None  # spared
    finally:
        del unsure
        if child is not None:
            _finish(child)


def test_ownership_record_does_not_keep_a_pool_alive() -> None:
    pool = pk.WorkerPool(1)
    with check_no_leaks():
        assert pool.submit(w.square, 2).result() == 4
        pool.shutdown()
    ref = weakref.ref(pool)
    del pool
    gc.collect()
    assert ref() is None


@pytest.mark.timeout(180)
def test_session_pool_under_the_documented_autouse_check(
    tmp_path: Path, start_method: StartMethod
) -> None:
    # The README's autouse fixture, with a WorkerPool and a ThreadPoolExecutor created by
    # session-scoped fixtures (before any check ran), each first used inside a test.
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(
            f"""
            from concurrent.futures import ThreadPoolExecutor
            import pytest
            import parallelkit as pk
            from parallelkit.testing import check_no_leaks

            @pytest.fixture(scope="session")
            def pool():
                with pk.WorkerPool(2, start_method={start_method!r}) as pool:
                    yield pool

            @pytest.fixture(scope="session")
            def executor():
                with ThreadPoolExecutor(2) as executor:
                    yield executor

            @pytest.fixture(autouse=True)
            def no_leaks():
                with check_no_leaks(kill=True):
                    yield
            """
        )
    )
    (tmp_path / "test_fanout.py").write_text(
        textwrap.dedent(
            """
            import tasks.basic as w

            def test_first_use(pool, executor):
                assert list(pool.map(w.square, range(6))) == [0, 1, 4, 9, 16, 25]
                assert list(executor.map(abs, [-1, -2])) == [1, 2]

            def test_next_use(pool, executor):
                assert pool.submit(w.square, 7).result() == 49
                assert executor.submit(abs, -3).result() == 3
            """
        )
    )
    result = run_python(
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-W",
        "error",
        str(tmp_path),
        timeout=150,
        # not the outer run's options (CI's -q would make this one -qq: no summary line)
        env=package_env(TESTS, PYTEST_ADDOPTS=""),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


# ------------------------------------------------------------------------------ behaviour


def test_leak_error_is_an_assertion_error() -> None:
    assert issubclass(LeakError, AssertionError)


def test_exception_in_block_propagates_with_leaks_noted() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="left-by-failing-block")
    try:
        with pytest.raises(ValueError, match="boom") as info, check_no_leaks(grace=QUICK):
            _start_then_fail(thread)
        notes = getattr(info.value, "__notes__", [])
        assert any("left-by-failing-block" in note for note in notes)
    finally:
        release.set()
        thread.join(timeout=10)


def _start_then_fail(thread: threading.Thread) -> None:
    thread.start()
    raise ValueError("boom")


def test_exception_in_clean_block_propagates_untouched() -> None:
    with pytest.raises(KeyError) as info, check_no_leaks(grace=QUICK):
        raise KeyError("k")
    assert not getattr(info.value, "__notes__", None)


def test_usable_as_decorator() -> None:
    release = threading.Event()
    started: list[threading.Thread] = []

    @check_no_leaks(grace=QUICK)
    def leaky(n: int) -> int:
        thread = threading.Thread(target=release.wait)
        thread.start()
        started.append(thread)
        return n

    @check_no_leaks(grace=QUICK)
    def clean(n: int) -> int:
        return n + 1

    try:
        assert clean(1) == 2
        assert clean(2) == 3  # each call is checked afresh
        with pytest.raises(LeakError):
            leaky(1)
    finally:
        release.set()
        for thread in started:
            thread.join(timeout=10)
    assert leaky.__name__ == "leaky"


def test_one_check_guards_one_block_at_a_time() -> None:
    check = check_no_leaks()
    assert isinstance(check, LeakCheck)
    with check, pytest.raises(RuntimeError, match="already in use"), check:
        pass


def test_negative_grace_is_rejected() -> None:
    with pytest.raises(ValueError, match="grace"):
        check_no_leaks(grace=-1)


def test_module_docstring_examples_run() -> None:
    result = doctest.testmod(parallelkit.testing, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------------------------------ strategies


@given(start_methods())
def test_start_methods_are_available(method: StartMethod) -> None:
    assert method in available_start_methods()


@given(worker_counts(max_value=3))
def test_worker_counts_are_in_range(count: int) -> None:
    assert 1 <= count <= 3


@given(chunksizes(max_value=5))
def test_chunksizes_are_none_or_positive(chunksize: int | None) -> None:
    assert chunksize is None or 1 <= chunksize <= 5


@pytest.mark.parametrize("make", [worker_counts, chunksizes])
def test_strategies_reject_empty_ranges(make: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match="max_value"):
        make(max_value=0)


@pytest.mark.parametrize("make", [start_methods, worker_counts, chunksizes])
def test_strategies_say_how_to_install_hypothesis(
    make: Callable[[], object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match=r"pip install 'parallelkit\[test\]'"):
        make()


def test_leak_check_needs_neither_hypothesis_nor_psutil() -> None:
    # hypothesis is only a test extra and psutil is optional: importing the module and
    # using the leak check must work without them.
    script = """
import sys
sys.modules["hypothesis"] = None
sys.modules["psutil"] = None
from parallelkit.testing import LeakError, check_no_leaks
import subprocess
try:
    with check_no_leaks(grace=0.2, kill=True):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
except LeakError as error:
    assert error.processes == (child.pid,), error
    child.wait()
    print("ok")
"""
    result = run_python("-c", script, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------------------------ helpers


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_a_clock_adjustment_during_the_block_is_no_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    # Seen in CI: psutil's create_time() adds the boot time it reads again each call, which
    # moves when the system clock is adjusted (Dask's monitor asks for it too); the suite's
    # own watchdog process, there before the block, looked new after it and was killed.
    psutil = pytest.importorskip("psutil")
    from psutil import _pslinux

    child = _blocked_child()
    try:
        with check_no_leaks(grace=QUICK, kill=True):
            real = _pslinux.boot_time
            monkeypatch.setattr(_pslinux, "boot_time", lambda: real() + 5.0)
            assert psutil.Process(child.pid).create_time() > 0
        assert child.poll() is None  # not killed
    finally:
        _finish(child)
