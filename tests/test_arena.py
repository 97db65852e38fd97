"""Large buffers through the shared-memory arena (``_arena``): exact round trips, kept
references, crashes, and no segment left behind."""

from __future__ import annotations

import errno
import hashlib
import mmap
import multiprocessing.connection
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import parallelkit as pk
import tasks.arena as wa
from child import kill_group, package_env, run_python
from parallelkit import StartMethod, _platform
from parallelkit._map.call import MapOptions
from parallelkit._map.job import Job
from parallelkit._wire import arena as _arena
from parallelkit._wire import direct as _direct
from parallelkit._wire import shm as _shm
from parallelkit.testing import remove_stale_segments

TESTS = Path(__file__).resolve().parent
SHM = _platform.SEGMENT_DIR  # /dev/shm, or the portable directory
# the parent copying results out of a worker: in portable mode they come in band instead
# (test_with_dev_shm_full_and_direct_copies_off_results_go_in_band, test_platform.py)
NEEDS_DIRECT = pytest.mark.skipif(
    not _platform.OFFERS.process_vm, reason="portable mode: no process_vm_readv"
)
MIN = _arena.MIN_BYTES  # results
ARG = _arena.ARG_MIN_BYTES  # arguments


def _ours(*pids: int | None) -> set[str]:
    """Segments of these processes (other programs on the machine may have their own)."""
    prefixes = tuple(f"pk_{pid}_" for pid in pids if pid is not None)
    return {name for name in os.listdir(SHM) if name.startswith(prefixes)}


def _pids(pool: pk.WorkerPool) -> list[int | None]:
    return [os.getpid(), *(w.pid for w in pool._engine.workers)]


def _digest(x: Any) -> str:
    return hashlib.sha256(memoryview(x).cast("B")).hexdigest()


def _arrays() -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(7)
    readonly = rng.random(70_000)
    readonly.flags.writeable = False
    return [
        rng.random(40_000),  # 320 KB, just above the threshold
        rng.integers(0, 1 << 30, size=(300, 400), dtype=np.int32),
        np.asfortranarray(rng.random((200, 300))),
        readonly,
        rng.random(10),  # small: in band
        np.arange(1_000_000, dtype=np.uint8)[::2],  # not contiguous: in band
    ]


def test_numpy_arguments_and_results_round_trip(start_method: StartMethod) -> None:
    arrays = _arrays()
    with pk.WorkerPool(2, start_method=start_method) as pool:
        seen = pool._run(wa.describe_array, arrays, MapOptions(1))
        assert seen == [wa.describe_array(a) for a in arrays]
        back = list(pool.imap(wa.echo, arrays, chunksize=2))
        assert pool._engine.arena is not None  # the large ones did go through it
    for a, b in zip(arrays, back, strict=True):
        assert wa.describe_array(b) == wa.describe_array(a)
        np.testing.assert_array_equal(a, b)


def test_bytes_bytearray_and_picklebuffer_round_trip(start_method: StartMethod) -> None:
    data = bytes(range(256)) * (MIN // 256 + 3)
    items: list[Any] = [data, bytearray(data[::-1]), b"small", pickle.PickleBuffer(bytearray(data))]
    with pk.WorkerPool(2, start_method=start_method) as pool:
        seen = pool._run(wa.describe, items, MapOptions(None))
        echoed = list(pool.imap(wa.echo, items[:3]))
        made = list(pool.imap(wa.make_buffer, [MIN + 17, 100]))
    assert seen[0] == ("bytes", _digest(data), False)
    assert seen[1] == ("bytearray", _digest(items[1]), True)
    assert seen[2] == ("bytes", _digest(b"small"), False)
    # protocol 5 hands the object the buffer it sent: a writable one, still writable
    assert seen[3][1:] == (_digest(data), True)
    assert [type(x) for x in echoed] == [bytes, bytearray, bytes]
    assert echoed == items[:3]
    expected = [bytearray(i % 251 for i in range(n)) for n in (MIN + 17, 100)]
    assert [bytes(x) for x in made] == [bytes(x) for x in expected]


@pytest.fixture(params=["segments", pytest.param("direct", marks=NEEDS_DIRECT)])
def result_path(request: pytest.FixtureRequest) -> dict[str, Any]:
    """WorkerPool options: large results through the worker's segments, or (/dev/shm full
    in the worker) copied by the parent straight out of the worker's memory (``_direct``)."""
    return {} if request.param == "segments" else {"initializer": wa.no_result_segments}


def test_large_results_round_trip_and_own_their_memory(
    start_method: StartMethod, result_path: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _counting_reads(monkeypatch)
    n = MIN // 8 * 3
    with pk.WorkerPool(2, start_method=start_method, **result_path) as pool:
        first = list(pool.imap(wa.make_array, [n] * 6, chunksize=1))
        second = list(pool.imap(wa.make_array, [n + 1] * 6, chunksize=1))  # reuses regions
        used_segments = [w.results is not None for w in pool._engine.workers]
    assert any(used_segments) is (not result_path)
    assert len(calls) == (12 if result_path else 0)
    for a in first:
        np.testing.assert_array_equal(a, np.arange(n))  # untouched by the second map
        assert a.flags.writeable
    for a in second:
        np.testing.assert_array_equal(a, np.arange(n + 1))


def test_small_buffers_do_not_use_the_arena(start_method: StartMethod) -> None:
    small = [np.full(ARG // 8 - 1, i, dtype=np.float64) for i in range(8)]
    with pk.WorkerPool(2, start_method=start_method) as pool:
        assert pool._run(wa.total, small, MapOptions(None)) == [float(a.sum()) for a in small]
        assert pool._engine.arena is None
        assert not _ours(*_pids(pool))


def test_a_kept_argument_stays_intact_while_new_chunks_run(start_method: StartMethod) -> None:
    kept = [np.full(100_000, i, dtype=np.float64) for i in range(3)]
    fresh = [np.full(100_000, -i, dtype=np.float64) for i in range(12)]
    with pk.WorkerPool(1, start_method=start_method) as pool:
        assert pool._run(wa.keep, kept[:1], MapOptions(1)) == [0.0]
        engine = pool._engine
        assert engine.arena is not None
        # the region of the kept argument is never written again...
        assert pool._run(wa.total, fresh, MapOptions(1)) == [float(a.sum()) for a in fresh]
        assert pool._run(wa.keep, kept[1:], MapOptions(1)) == [1e5, 2e5]
        assert pool._run(wa.total, fresh, MapOptions(1)) == [float(a.sum()) for a in fresh]
        # ...so the worker still reads what it kept
        assert pool.submit(wa.kept_sums, None).result() == [0.0, 1e5, 2e5]
        # an argument referenced only by a passing traceback is not "kept"
        arena = engine.arena
        assert arena is not None
        before = arena.current
        failing = [np.full(100_000, v, dtype=np.float64) for v in (1.0, -1.0, 2.0)]
        out = list(pool.imap(wa.fail_on_negative, failing, return_exceptions=True))
        assert (out[0], out[2]) == (1e5, 2e5)
        assert isinstance(out[1], ValueError)
        assert arena.current is before is not None


def test_chunks_are_sized_by_bytes_too(start_method: StartMethod) -> None:
    arrays = [np.zeros(1 << 17) for _ in range(32)]  # 1 MiB each
    with pk.WorkerPool(2, start_method=start_method) as pool:
        job = Job(
            pool._engine,
            wa.total,
            arrays,
            length=32,
            chunksize=None,
            ordered=True,
            return_exceptions=False,
            fail_fast=True,
            timeout=None,
        )
        chunk = job.next_chunk()
        assert chunk is not None
        size = chunk.stop - chunk.start
        assert 1 < size <= _arena.CHUNK_BYTES // (1 << 20)  # not 32 // 8 = 4 MiB-plus chunks
        assert size * (1 << 20) <= _arena.CHUNK_BYTES
        job.cancel()


def test_sigkilled_worker_holding_regions(start_method: StartMethod) -> None:
    arrays = [np.full(100_000, float(i), dtype=np.float64) for i in range(10)]
    arrays[5][0] = -1.0
    with pk.WorkerPool(2, start_method=start_method) as pool:
        out = list(pool.imap(wa.sum_or_die, arrays, chunksize=1, return_exceptions=True))
        pids = _pids(pool)
        crash = out[5]
        assert isinstance(crash, pk.WorkerCrashedError)
        assert crash.signal == "SIGKILL"
        for i, value in enumerate(out):
            if i != 5:
                assert isinstance(value, tuple)
                assert value[0] == float(arrays[i].sum())
        # a worker that dies holding a result segment leaves nothing behind either
        out2 = list(pool.imap(wa.big_result_or_die, [1, 2, 3, -1, 4], return_exceptions=True))
        crash2 = out2[3]
        assert isinstance(crash2, pk.WorkerCrashedError)
        assert not _ours(crash.pid, crash2.pid)
        assert [float(a[0]) for a in out2 if isinstance(a, np.ndarray)] == [1, 2, 3, 4]
        # the arena is still sound: later maps see exactly their own data
        again = pool._run(wa.describe_array, arrays, MapOptions(1))
        assert again == [wa.describe_array(a) for a in arrays]
        pids += _pids(pool)
    assert not _ours(*pids)


@pytest.mark.timeout(60)
def test_sigkilled_parent_leaves_no_segment(start_method: StartMethod) -> None:
    env = dict(os.environ)
    src = str(Path(pk.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "scripts" / "arena_parent_death.py"), start_method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(b"SEGMENTS"), proc.stderr.read() if proc.stderr else ""
        workers = [int(pid) for pid in line.split()[1:]]
        created = _ours(proc.pid, *workers)
        assert _ours(proc.pid)  # the arena
        assert _ours(*workers)  # the workers' result segments
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        if not _platform.OFFERS.dev_shm:  # portable mode: no tracker; stale once all died
            while any(map(_shm.pid_alive, workers)) and time.monotonic() < deadline:
                time.sleep(0.05)  # they die with their parent (no pid to wait on here)
            assert set(created) <= set(remove_stale_segments())
        while _ours(proc.pid, *workers) and time.monotonic() < deadline:
            time.sleep(0.05)  # the resource tracker unlinks them once every process is gone
        assert not _ours(proc.pid, *workers), created
    finally:
        kill_group(proc)


_SIZES = (
    st.integers(ARG - 2 * 4096, ARG + 2 * 4096)
    | st.integers(MIN - 2 * 4096, MIN + 2 * 4096)
    | st.integers(0, 2 * MIN)
)


def test_buffer_sizes_around_the_threshold(start_method: StartMethod) -> None:
    with pk.WorkerPool(2, start_method=start_method) as pool:

        @given(st.lists(st.tuples(_SIZES, st.sampled_from(["u1", "f8", "bytes"])), max_size=6))
        def round_trip(specs: list[tuple[int, str]]) -> None:
            items: list[Any] = []
            for k, (n, kind) in enumerate(specs):
                if kind == "bytes":
                    items.append(bytes([k % 256]) * n)
                else:
                    items.append(np.full(n // np.dtype(kind).itemsize, k, dtype=kind))
            back = list(pool.imap(wa.echo, items))
            assert len(back) == len(items)
            for a, b in zip(items, back, strict=True):
                assert type(a) is type(b)
                if isinstance(a, bytes):
                    assert a == b
                else:
                    assert a.dtype == b.dtype
                    np.testing.assert_array_equal(a, b)

        round_trip()


def test_no_room_in_dev_shm_sends_buffers_in_band(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARALLELKIT_DIRECT_RESULTS", "0")  # see the _direct tests below

    def no_room(size: int) -> Any:
        raise OSError(errno.ENOSPC, "no room (test)")

    arrays = [np.full(100_000, float(i)) for i in range(6)]
    with pk.WorkerPool(2, start_method=start_method) as pool:
        # the parent cannot create its arena (nor, under fork, can the workers create
        # result segments: they inherit the patch)
        monkeypatch.setattr(_shm.Segment, "create", no_room)
        back = list(pool.imap(wa.echo, arrays))
        assert [wa.describe_array(a) for a in back] == [wa.describe_array(a) for a in arrays]
        assert pool._run(wa.total, arrays, MapOptions(1)) == [float(a.sum()) for a in arrays]
        arena = pool._engine.arena
        assert arena is not None
        assert arena.current is None


def test_results_are_copied_out_when_no_mapping_can_be_made(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A caller holding more than vm.max_map_count results would see mmap() fail with
    # ENOMEM: each result is then copied out of the worker's segment, and its region is
    # free for the worker again at once.
    real_mmap = mmap.mmap
    refused: list[int] = []

    def no_result_mappings(fd: int, n: int, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("flags") == _arena._RESULT_FLAGS:  # a result's own mapping
            refused.append(n)
            raise OSError(errno.ENOMEM, "no more mappings (test)")
        return real_mmap(fd, n, *args, **kwargs)

    n = MIN // 8 * 3
    with pk.WorkerPool(2, start_method=start_method) as pool:
        list(pool.imap(wa.make_array, [n] * 2, chunksize=1))  # workers started, segments made
        monkeypatch.setattr(mmap, "mmap", no_result_mappings)  # the module _arena uses
        first = list(pool.imap(wa.make_array, [n] * 6, chunksize=1))
        second = list(pool.imap(wa.make_array, [n + 1] * 6, chunksize=1))  # reuses regions
    assert len(refused) == 12
    for a in first:
        np.testing.assert_array_equal(a, np.arange(n))
        assert a.flags.writeable
    for a in second:
        np.testing.assert_array_equal(a, np.arange(n + 1))


# ------------------------------------------------------------------ _direct
_FULL: dict[str, Any] = {"initializer": wa.no_result_segments}  # /dev/shm full in workers


def _counting_reads(monkeypatch: pytest.MonkeyPatch, before: Any = None) -> list[int]:
    """Count (and optionally precede) the parent's reads of worker memory."""
    real = _direct.read
    calls: list[int] = []

    def read(pid: int, specs: Any) -> Any:
        calls.append(pid)
        if before is not None:
            before(pid, len(calls))
        return real(pid, specs)

    monkeypatch.setattr(_direct, "read", read)
    return calls


@NEEDS_DIRECT
def test_with_dev_shm_full_large_results_come_straight_out_of_the_worker(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PARALLELKIT_DIRECT_RESULTS", raising=False)
    calls = _counting_reads(monkeypatch)
    n = MIN // 8 * 40  # 2.5 MiB: a huge-page mapping of its own in the parent
    sizes = [n, MIN // 8, n + 1, MIN // 8 + 5] * 3
    with pk.WorkerPool(2, start_method=start_method, **_FULL) as pool:
        out = list(pool.map(wa.make_array, sizes, chunksize=2))
        pids = _pids(pool)
        assert pool._engine.replies.direct
        assert all(w.results is None for w in pool._engine.workers)  # no result segments
        assert not _ours(*pids[1:])
    assert len(calls) == 6  # one read per chunk, however many buffers it has
    for a, size in zip(out, sizes, strict=True):
        np.testing.assert_array_equal(a, np.arange(size))
        assert a.flags.writeable


@NEEDS_DIRECT
@pytest.mark.timeout(120)
def test_a_reply_with_more_buffers_than_one_readv_takes_is_read_in_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Linux takes at most 1,024 iovecs per process_vm_readv: one reply of 1,100 large
    # buffers is read in two calls, every buffer in its place.
    monkeypatch.delenv("PARALLELKIT_DIRECT_RESULTS", raising=False)
    batches: list[int] = []
    real = _direct._read_all

    def read_all(readv: Any, pid: int, local: Any, remote: Any, want: int) -> None:
        batches.append(len(local))
        real(readv, pid, local, remote, want)

    monkeypatch.setattr(_direct, "_read_all", read_all)
    count, n = _direct._IOV_MAX + 76, MIN // 8
    with pk.WorkerPool(1, start_method="fork", **_FULL) as pool:
        out = pool.submit(wa.many_arrays, count, n).result(timeout=60)
        assert pool._engine.replies.direct  # answered directly, not resent in band
    assert batches == [_direct._IOV_MAX, 76]
    assert len(out) == count
    for i, a in enumerate(out):
        np.testing.assert_array_equal(a, np.arange(n) + i)


def test_with_dev_shm_full_and_direct_copies_off_results_go_in_band(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARALLELKIT_DIRECT_RESULTS", "0")
    calls = _counting_reads(monkeypatch)
    n = MIN // 8 * 3
    with pk.WorkerPool(2, start_method=start_method, **_FULL) as pool:
        out = list(pool.imap(wa.make_array, [n] * 4, chunksize=1))
        assert not pool._engine.replies.direct
    assert not calls
    assert all(np.array_equal(a, np.arange(n)) for a in out)


@NEEDS_DIRECT
def test_a_worker_tries_result_segments_again_after_dev_shm_was_full(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # /dev/shm full for two tries: the first result comes straight out of the worker, and
    # so do the next while the worker waits (1 s after the first failure, 2 s after the
    # second); once there is room, results go through a segment again.  The worker's
    # clock for this is the time written in a file, moved on by the test.
    monkeypatch.delenv("PARALLELKIT_DIRECT_RESULTS", raising=False)
    calls = _counting_reads(monkeypatch)
    clock = tmp_path / "clock"
    clock.write_text("100.0")
    n = MIN // 8 * 3
    options: dict[str, Any] = {
        "initializer": wa.result_segments_full_for,
        "initargs": (2, str(clock)),
    }
    with pk.WorkerPool(1, start_method=start_method, **options) as pool:

        def one(now: float, i: int) -> None:
            clock.write_text(repr(now))
            a = pool.submit(wa.make_array, n + i).result(timeout=60)
            np.testing.assert_array_equal(a, np.arange(n + i))

        one(100.0, 0)  # first failure: not again before 101
        (worker,) = pool._engine.workers
        one(100.9, 1)  # not tried: straight out
        assert len(calls) == 2
        assert worker.results is None
        one(101.0, 2)  # second failure: not again before 103
        assert len(calls) == 3
        assert worker.results is None
        one(102.9, 3)  # not tried (a wait that did not double would have tried at 102)
        assert len(calls) == 4
        assert worker.results is None
        one(103.0, 4)  # room again: a segment
        one(103.0, 5)
        assert len(calls) == 4
        assert worker.results is not None


@NEEDS_DIRECT
def test_a_reused_output_buffer_is_read_before_the_next_task_runs(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker holds each reply's results as they are until the parent has copied them,
    # even with a second chunk waiting in its pipe: a slow read here would otherwise see
    # the buffer already refilled by the next task.
    calls = _counting_reads(monkeypatch, before=lambda pid, k: time.sleep(0.05))
    with pk.WorkerPool(2, start_method=start_method, **_FULL) as pool:
        out = list(pool.imap(wa.fill_reused, range(12), chunksize=1))
    assert len(calls) == 12
    for i, a in enumerate(out):
        assert a.min() == a.max() == i


@NEEDS_DIRECT
def test_no_permission_to_read_a_worker_sends_results_in_band(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def refused(pid: int, specs: Any) -> Any:
        calls.append(pid)
        raise _direct.Unreadable(errno.EPERM, "not allowed (test)")

    monkeypatch.setattr(_direct, "read", refused)
    n = MIN // 8 * 3
    with pk.WorkerPool(2, start_method=start_method, **_FULL) as pool:
        out = list(pool.imap(wa.make_array, [n] * 8, chunksize=1))
        assert not pool._engine.replies.direct  # asked once, refused: not again
        again = list(pool.map(wa.make_array, [n + 1] * 4, chunksize=1))
    assert len(calls) == 1
    for a in out:
        np.testing.assert_array_equal(a, np.arange(n))
    for a in again:
        np.testing.assert_array_equal(a, np.arange(n + 1))


@NEEDS_DIRECT
def test_a_failed_read_is_answered_again_in_band(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _direct.read
    calls: list[int] = []

    def flaky(pid: int, specs: Any) -> Any:
        calls.append(pid)
        if len(calls) == 2:
            raise _direct.Unreadable(errno.EFAULT, "bad address (test)")
        return real(pid, specs)

    monkeypatch.setattr(_direct, "read", flaky)
    n = MIN // 8 * 3
    with pk.WorkerPool(2, start_method=start_method, **_FULL) as pool:
        out = list(pool.imap(wa.make_array, range(n, n + 6), chunksize=1))
        assert pool._engine.replies.direct  # a passing failure does not turn the feature off
    assert len(calls) == 6
    for k, a in enumerate(out):
        np.testing.assert_array_equal(a, np.arange(n + k))


@NEEDS_DIRECT
def test_no_memory_for_the_copy_sends_that_reply_in_band(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _direct.new_buffer
    calls: list[int] = []

    def short_of_memory(n: int) -> Any:
        calls.append(n)
        if len(calls) == 1:
            raise MemoryError
        if len(calls) == 2:
            raise OSError(errno.ENOMEM, "no more mappings (test)")
        return real(n)

    monkeypatch.setattr(_direct, "new_buffer", short_of_memory)
    n = MIN // 8 * 3
    with pk.WorkerPool(2, start_method=start_method, **_FULL) as pool:
        out = list(pool.imap(wa.make_array, range(n, n + 6), chunksize=1))
        assert pool._engine.replies.direct
    assert len(calls) == 6
    for k, a in enumerate(out):
        np.testing.assert_array_equal(a, np.arange(n + k))


def _wait_until_dead(pid: int) -> None:
    """Until ``pid`` has exited (a zombie or reaped): its memory is gone then."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return
        if "\nState:\tZ" in status:
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} still alive")


@NEEDS_DIRECT
def test_a_worker_killed_while_its_results_are_read(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    def kill_the_third(pid: int, k: int) -> None:
        if k == 3:
            os.kill(pid, signal.SIGKILL)
            _wait_until_dead(pid)

    calls = _counting_reads(monkeypatch, before=kill_the_third)
    n = MIN // 8 * 3
    with pk.WorkerPool(2, start_method=start_method, **_FULL) as pool:
        out = list(pool.imap(wa.make_array, [n] * 6, chunksize=1, return_exceptions=True))
        crashes = [x for x in out if isinstance(x, pk.WorkerCrashedError)]
        assert len(crashes) == 1, out
        crash = crashes[0]
        assert crash.signal == "SIGKILL"
        assert "while sending the result of item" in str(crash)
        assert crash.pid == calls[2]
        for x in out:
            if not isinstance(x, pk.WorkerCrashedError):
                np.testing.assert_array_equal(x, np.arange(n))
        # the pool goes on
        again = list(pool.map(wa.make_array, [n] * 4, chunksize=1))
        assert all(np.array_equal(a, np.arange(n)) for a in again)
        assert not _ours(crash.pid)


# ------------------------------------------------------------------ issue 17 §1: segment life


@pytest.mark.timeout(60)
def test_a_reply_read_after_its_worker_exited_still_finds_its_segment(
    start_method: StartMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-shot map tells a worker to stop as soon as the input is used up: the worker
    sends its last reply (naming a segment the parent has never mapped) and exits.  The
    parent is held back here until that worker has exited before it reads the reply; the
    reply must still be readable (the segment's end is not the worker's to decide)."""
    from parallelkit._map.replies import Replies
    from parallelkit._map.worker import REPLY_ARENA

    original = Replies.on_message
    held: list[int | None] = []

    def late(self: Replies, w: Any, kind: int, data: bytes) -> None:
        if kind == REPLY_ARENA and w.stopping:
            # the hold: the worker was told to stop after this reply; wait for its exit
            ready = multiprocessing.connection.wait([w.sentinel], timeout=30)
            assert ready, "the worker did not exit after its last reply"
            held.append(w.pid)
        original(self, w, kind, data)

    monkeypatch.setattr(Replies, "on_message", late)
    n = MIN // 8 * 2
    got = pk.run_parallel(wa.make_array, [n], max_workers=1, start_method=start_method)
    assert held, "no reply came through a result segment"
    np.testing.assert_array_equal(got[0], np.arange(n))
    assert not _ours(*held)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not _platform.OFFERS.dev_shm, reason="portable mode: no tracker is involved")
def test_the_resource_tracker_sees_each_segment_registered_and_unregistered_once(
    start_method: StartMethod,
) -> None:
    """Workers SIGKILLed as they register a new result segment's name, and as they unlink a
    retired one: the parent removes what they left, and the tracker (whose stderr is the
    script's) never prints a KeyError or a leak."""
    script = str(TESTS / "scripts" / "tracker_once.py")
    env = package_env(str(TESTS))
    env.pop("PYTHONWARNINGS", None)
    proc = run_python(script, start_method, timeout=100, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["DONE"], proc.stdout
    assert proc.stderr == "", proc.stderr
