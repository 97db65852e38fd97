"""The parallel-map engine: run_parallel, imap_parallel and WorkerPool, under every start method."""

from __future__ import annotations

import ctypes
import functools
import itertools
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest

import parallelkit as pk
import tasks.basic as w
from parallelkit import StartMethod, _platform
from parallelkit._map import worker as W
from parallelkit._map.blame import Blame
from parallelkit._map.job import Job
from parallelkit._proc import slots
from parallelkit._wire import codec as _serialize
from parallelkit._wire.codec import RemoteTraceback

# ------------------------------------------------------------------ results and ordering


def test_results_equal_map(start_method: StartMethod) -> None:
    items = list(range(1000))
    assert pk.run_parallel(w.square, items, start_method=start_method) == [x * x for x in items]


def test_unordered_gives_every_result_once(start_method: StartMethod) -> None:
    items = list(range(300))
    got = pk.run_parallel(w.square, items, start_method=start_method, ordered=False, chunksize=7)
    assert Counter(got) == Counter(x * x for x in items)


def test_generator_input_and_explicit_chunksize(start_method: StartMethod) -> None:
    got = pk.run_parallel(
        w.square, (x for x in range(50)), start_method=start_method, chunksize=3, max_workers=2
    )
    assert got == [x * x for x in range(50)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("n", [9, 10, 11])
def test_a_generator_found_empty_after_every_result_was_delivered(n: int) -> None:
    # Item 0 is slow, so the other worker's results wait in the reorder buffer and fill the
    # in-flight window (4 x 2 + 2 = 10 chunks of 1) before the input is found to be empty;
    # when item 0 arrives everything is delivered, and only the next look at the input
    # finishes the job.  That look happened right before a wait with no timeout, which
    # then waited forever (seen as a rare hang in CI).
    items = (x for x in range(n))
    got = list(pk.imap_parallel(w.slow_zero, items, max_workers=2, chunksize=1))
    assert got == list(range(n))


def test_empty_input_starts_nothing() -> None:
    assert pk.run_parallel(w.square, []) == []
    assert list(pk.imap_parallel(w.square, [])) == []


def test_default_start_method_works() -> None:
    assert pk.run_parallel(w.square, range(10), max_workers=2) == [x * x for x in range(10)]


def test_a_lambda_runs_under_every_start_method(start_method: StartMethod) -> None:
    # fork: inherited, never pickled; spawn and forkserver: sent with cloudpickle
    offset = 3
    got = pk.run_parallel(lambda x: x + offset, range(5), start_method=start_method)
    assert got == [3, 4, 5, 6, 7]


# ------------------------------------------------------------------ argument validation


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="max_workers must be a positive int"):
        pk.run_parallel(w.square, [1], max_workers=bad)


def test_unknown_start_method_lists_the_valid_ones() -> None:
    with pytest.raises(pk.StartMethodError, match=r"'frok'.*'fork'.*'spawn'") as info:
        pk.run_parallel(w.square, [1], start_method="frok")  # type: ignore[call-overload]
    assert isinstance(info.value, ValueError)


def test_fn_must_be_callable() -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        pk.run_parallel(42, [1])  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"chunksize": 0}, ValueError, "chunksize"),
        ({"chunksize": 1.5}, TypeError, "chunksize"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": "1"}, TypeError, "timeout"),
        ({"initializer": 3}, TypeError, "initializer"),
        ({"initargs": [1]}, TypeError, "initargs"),
        ({"backend": "threads"}, ValueError, "backend"),
    ],
)
def test_bad_options_raise_in_the_caller(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        pk.run_parallel(w.square, [1], **kwargs)  # type: ignore[call-overload]
    with pytest.raises(error, match=match):
        pk.imap_parallel(w.square, [1], **kwargs)  # type: ignore[call-overload]


def test_worker_pool_validates() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        pk.WorkerPool(0)
    with pytest.raises(pk.StartMethodError):
        pk.WorkerPool(1, start_method="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tasks_per_worker"):
        pk.WorkerPool(1, max_tasks_per_worker=0)


# ------------------------------------------------------------------ task exceptions


def test_exception_keeps_type_traceback_and_item(start_method: StartMethod) -> None:
    with pytest.raises(ValueError, match="bad item 7") as info:
        pk.run_parallel(
            w.fail_on_multiples_of_seven, range(1, 20), start_method=start_method, max_workers=1
        )
    exc = info.value
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "fail_on_multiples_of_seven" in str(exc.__cause__)
    assert any("on item 6" in note for note in exc.__notes__)  # 7 is at index 6


def test_exception_with_required_constructor_args_arrives_intact(
    start_method: StartMethod,
) -> None:
    with pytest.raises(w.NeedsArgs) as info:
        pk.run_parallel(w.raise_needs_args, [41], start_method=start_method)
    assert (info.value.code, info.value.reason) == (41, "because")
    assert str(info.value) == "code 41: because"


def test_exception_that_cannot_cross_arrives_as_remote_error(start_method: StartMethod) -> None:
    with pytest.raises(pk.RemoteError) as info:
        pk.run_parallel(w.raise_unpicklable, [1], start_method=start_method)
    assert info.value.type_name == "tasks.basic.HoldsLock"
    assert "item 1" in str(info.value)
    assert "raise_unpicklable" in info.value.remote_traceback


def test_return_exceptions_keeps_every_other_result(start_method: StartMethod) -> None:
    items = list(range(1, 40))
    got = pk.run_parallel(
        w.fail_on_multiples_of_seven,
        items,
        start_method=start_method,
        return_exceptions=True,
        chunksize=4,
    )
    for x, value in zip(items, got, strict=True):
        if x % 7 == 0:
            assert isinstance(value, ValueError)
            assert str(value) == f"bad item {x}"
        else:
            assert value == x


def test_system_exit_is_the_tasks_exception(start_method: StartMethod) -> None:
    got = pk.run_parallel(
        w.exit_in_task, range(6), start_method=start_method, return_exceptions=True
    )
    assert isinstance(got[3], SystemExit)
    assert got[3].code == 5
    assert [v for i, v in enumerate(got) if i != 3] == [0, 1, 2, 4, 5]


# ------------------------------------------------------------------ crashes and timeouts


@pytest.mark.parametrize(
    ("fn", "exitcode", "signal"),
    [
        (w.kill_13, -9, "SIGKILL"),
        (w.exit3_13, 3, None),
        (w.exit0_13, 0, None),
        (w.segv_13, -11, "SIGSEGV"),
    ],
    ids=["sigkill", "os_exit_3", "os_exit_0", "segfault"],
)
# chunksize 10: item 13 runs among the first items of its chunk, each noted as it starts;
# chunksize 40: past the first few, tiny items run without being noted one by one, and the
# chunk is run again, noting each, when its worker dies (see _worker._run_chunk)
@pytest.mark.parametrize("chunksize", [10, 40])
def test_worker_death_names_the_item(
    start_method: StartMethod, fn: object, exitcode: int, signal: str | None, chunksize: int
) -> None:
    with pytest.raises(pk.WorkerCrashedError) as info:
        pk.run_parallel(fn, range(80), start_method=start_method, chunksize=chunksize)  # type: ignore[call-overload]
    err = info.value
    assert err.item_index == 13
    assert err.exitcode == exitcode
    assert err.signal == signal
    assert isinstance(err.pid, int)
    assert err.pid != os.getpid()


def test_tiny_items_run_untracked_after_a_probe_and_tracked_when_asked() -> None:
    progress = multiprocessing.RawArray(ctypes.c_int64, slots.SLOT_WORDS)
    words = memoryview(progress).cast("B").cast("q")
    seen: list[int] = []

    def note(x: int) -> int:
        seen.append(words[slots.POS])
        return x * x

    items = list(range(50))
    try:
        results, errors = W._run_chunk(note, items, 0, words, 0)
        assert results == [x * x for x in items]
        assert errors is None
        assert seen[: W.PROBE_ITEMS] == list(range(W.PROBE_ITEMS))
        assert set(seen[W.PROBE_ITEMS :]) == {slots.POS_UNTRACKED}
        seen.clear()
        results, errors = W._run_chunk(note, items, W.TRACKED, words, 0)
        assert results == [x * x for x in items]
        assert errors is None
        assert seen == list(range(50))
    finally:
        words.release()


def test_exceptions_among_untracked_items_keep_their_positions(start_method: StartMethod) -> None:
    got = pk.run_parallel(
        w.fail_on_multiples_of_seven,
        range(300),
        start_method=start_method,
        chunksize=150,
        return_exceptions=True,
    )
    for i, value in enumerate(got):
        if i % 7 == 0:
            assert isinstance(value, ValueError)
            assert str(value) == f"bad item {i}"
            assert any(f"on item {i}" in note for note in value.__notes__)
        else:
            assert value == i
    items = [x for x in range(1, 300) if x % 7 or x > 50]  # bad ones: 56, 63, ...
    with pytest.raises(ValueError, match=r"bad item \d+") as info:  # fail fast: the first seen
        pk.run_parallel(
            w.fail_on_multiples_of_seven, items, start_method=start_method, chunksize=150
        )
    bad = int(str(info.value).split()[2])
    assert bad >= 56
    assert any(f"on item {items.index(bad)}" in note for note in info.value.__notes__)


def test_a_worker_dying_among_untracked_items_is_run_again_after_the_other_stopped(
    start_method: StartMethod, tmp_path: Path
) -> None:
    # Worker A dies (SIGKILL, once) among tiny items it ran without noting each one, after
    # worker B finished the rest of the input and was told to exit; the chunk runs again,
    # noting each item, on a new worker, and this time item 1500 succeeds.
    # Whether a chunk runs untracked is decided by timing its first 8 items: on a loaded
    # machine they may look slow, the chunk stays tracked, and the crash is (rightly)
    # reported on item 1500 instead.  So try a few times until the untracked case happens.
    tracked_crashes = 0
    for attempt in range(5):
        marker = tmp_path / f"died-{attempt}"
        fn = functools.partial(w.die_once_at_1500, str(marker))
        got = pk.run_parallel(
            fn, range(2000), start_method=start_method, chunksize=1000, return_exceptions=True
        )
        crash = got[1500]
        if isinstance(crash, pk.WorkerCrashedError):  # tracked: named exactly, not run again
            assert crash.signal == "SIGKILL"
            assert got[:1500] + got[1501:] == [x * x for x in range(2000) if x != 1500]
            tracked_crashes += 1
            continue
        assert got == [x * x for x in range(2000)]
        assert marker.exists()
        return
    pytest.fail(f"the chunk never ran untracked ({tracked_crashes} tracked crashes)")


def test_crash_with_return_exceptions_fails_only_that_item(start_method: StartMethod) -> None:
    got = pk.run_parallel(
        w.kill_13, range(40), start_method=start_method, chunksize=10, return_exceptions=True
    )
    assert isinstance(got[13], pk.WorkerCrashedError)
    assert got[13].item_index == 13
    assert [v for i, v in enumerate(got) if i != 13] == [i for i in range(40) if i != 13]


@pytest.mark.timeout(45)  # item 5 sleeps 60 s: waiting for it fails here
def test_timeout_stops_exactly_the_late_item(start_method: StartMethod) -> None:
    got = pk.run_parallel(
        w.sleep_on_5,
        range(10),
        start_method=start_method,
        timeout=1.0,
        return_exceptions=True,
        max_workers=2,
    )
    err = got[5]
    assert isinstance(err, pk.TaskTimeoutError)
    assert isinstance(err, TimeoutError)
    assert (err.item_index, err.timeout) == (5, 1.0)
    assert [v for i, v in enumerate(got) if i != 5] == [0, 1, 2, 3, 4, 6, 7, 8, 9]


@pytest.mark.timeout(60)
def test_a_timeout_does_not_blame_the_chunk_the_worker_started_after_the_late_one(
    start_method: StartMethod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 0 overruns its timeout; as the engine decides to stop its worker, the worker
    finishes item 0 and starts item 1 (sent to it while item 0 ran) before the signal
    lands.  Held there deterministically: the engine's stop waits until item 1 has
    started.  Item 0's result arrived, and item 1, stopped through no fault of its own,
    runs again elsewhere -- it used to fail with item 0's TaskTimeoutError."""
    started = tmp_path / "item-1-started"
    real_stop = Blame.stop

    def stop_once_item_1_started(*args: Any) -> None:
        while not started.exists():
            time.sleep(0.01)
        real_stop(*args)

    monkeypatch.setattr(Blame, "stop", staticmethod(stop_once_item_1_started))
    got = pk.run_parallel(
        w.late_then_next,
        [(0, ""), (1, str(started))],
        start_method=start_method,
        timeout=0.5,
        chunksize=1,
        max_workers=1,
        return_exceptions=True,
    )
    assert got == [0, 1]


def test_timeout_kills_a_task_that_ignores_sigterm(start_method: StartMethod) -> None:
    with pytest.raises(pk.TaskTimeoutError) as info:
        pk.run_parallel(w.stubborn_sleep_on_2, range(4), start_method=start_method, timeout=0.5)
    assert info.value.item_index == 2


def test_timeout_does_not_count_worker_start_up(start_method: StartMethod) -> None:
    # Every worker spends 1 s in its initializer, longer than the items' timeout: the chunks
    # sent meanwhile wait, and no item is late (a spawned worker's start-up under load made
    # the first item "time out" before it ran).
    got = pk.run_parallel(
        w.square,
        range(6),
        start_method=start_method,
        max_workers=2,
        timeout=0.3,
        initializer=w.sleep_for,
        initargs=(1.0,),
    )
    assert got == [x * x for x in range(6)]


# ------------------------------------------------------------------ serialization


def test_unpicklable_function_without_cloudpickle(
    monkeypatch: pytest.MonkeyPatch, start_method: StartMethod
) -> None:
    monkeypatch.setattr(_serialize, "_cloudpickle", lambda: None)
    offset = 1
    if start_method == "fork":  # inherited: nothing to pickle
        assert pk.run_parallel(lambda x: x + offset, [1], start_method="fork") == [2]
        return
    with pytest.raises(pk.SerializationError, match="cloudpickle") as info:
        pk.run_parallel(lambda x: x + offset, [1], start_method=start_method)
    assert info.value.what == "function"
    assert isinstance(info.value, TypeError)


def test_unpicklable_argument_names_its_item(start_method: StartMethod) -> None:
    items: list[object] = [1, 2, 3, threading.Lock(), 5]
    with pytest.raises(pk.SerializationError) as info:
        pk.run_parallel(w.identity, items, start_method=start_method, max_workers=1)
    # under fork too: the input is inherited, but checked as the other methods would send it
    assert (info.value.what, info.value.item_index) == ("argument", 3)


def test_argument_that_fails_to_unpickle_in_the_worker(start_method: StartMethod) -> None:
    items = [1, 2, w.BadUnpickle(3), 4]
    got = pk.run_parallel(
        w.value_of, items, start_method=start_method, return_exceptions=True, max_workers=1
    )
    if start_method == "fork":  # inherited, never unpickled
        assert got == [1, 2, 3, 4]
        return
    assert got[:2] == [1, 2]
    assert got[3] == 4
    assert isinstance(got[2], pk.SerializationError)
    assert (got[2].what, got[2].item_index) == ("argument", 2)


def test_result_that_cannot_be_pickled(start_method: StartMethod) -> None:
    with pytest.raises(pk.SerializationError) as info:
        pk.run_parallel(w.return_lock, [0, 1, 2], start_method=start_method, max_workers=1)
    assert (info.value.what, info.value.item_index) == ("result", 1)


def test_result_that_fails_to_unpickle_in_the_parent(start_method: StartMethod) -> None:
    got = pk.run_parallel(
        w.make_bad_result,
        range(8),
        start_method=start_method,
        return_exceptions=True,
        chunksize=8,
    )
    assert isinstance(got[4], pk.SerializationError)
    assert (got[4].what, got[4].item_index) == ("result", 4)
    assert [v for i, v in enumerate(got) if i != 4] == [0, 1, 2, 3, 5, 6, 7]


# ------------------------------------------------------------------ imap_parallel


def test_imap_streams_an_endless_generator_lazily(start_method: StartMethod) -> None:
    pulled = itertools.count()

    def source() -> Iterator[int]:
        for x in itertools.count():
            next(pulled)
            yield x

    # chunks of 10: adaptive chunks grow with how fast items ran, so how far they read
    # ahead is a matter of timing
    with pk.imap_parallel(
        w.square, source(), start_method=start_method, max_workers=2, chunksize=10
    ) as it:
        first = list(itertools.islice(it, 500))
    assert first == [x * x for x in range(500)]
    # bounded read-ahead: at most the in-flight window (4 x 2 workers + 2 chunks) beyond
    # the 50 chunks taken, and the chunk being read
    assert next(pulled) <= (50 + 4 * 2 + 2 + 1) * 10


def test_imap_unordered(start_method: StartMethod) -> None:
    got = list(
        pk.imap_parallel(w.square, iter(range(100)), start_method=start_method, ordered=False)
    )
    assert sorted(got) == [x * x for x in range(100)]


def test_closing_imap_stops_the_work_promptly(start_method: StartMethod) -> None:
    it = pk.imap_parallel(w.sleep_a_bit, itertools.count(), start_method=start_method)
    assert next(it) == 0
    it.close()  # an endless input: a close that waited for it would hang (test timeout)
    with pytest.raises(StopIteration):
        next(it)


def test_breaking_out_of_the_loop_stops_the_workers(start_method: StartMethod) -> None:
    for value in pk.imap_parallel(w.sleep_a_bit, itertools.count(), start_method=start_method):
        assert value == 0
        break
    # the leak check (autouse) proves that no worker is left running


def test_breaking_out_of_a_pool_imap_frees_the_pool(start_method: StartMethod) -> None:
    with pk.WorkerPool(2, start_method=start_method) as pool:
        for value in pool.imap(w.square, itertools.count()):
            if value > 100:
                break
        assert pool.submit(w.square, 3).result(timeout=30) == 9


def test_imap_raises_at_once_and_cleans_up(start_method: StartMethod) -> None:
    it = pk.imap_parallel(
        w.fail_on_multiples_of_seven, iter(range(1, 100)), start_method=start_method
    )
    with pytest.raises(ValueError, match="bad item"):
        list(it)


# ------------------------------------------------------------------ WorkerPool


def test_pool_submit_and_futures(start_method: StartMethod) -> None:
    with pk.WorkerPool(2, start_method=start_method) as pool:
        futures = [pool.submit(w.add, i, b=10) for i in range(20)]
        assert [f.result(timeout=30) for f in futures] == [i + 10 for i in range(20)]
        failed = pool.submit(w.fail_on_multiples_of_seven, 14)
        with pytest.raises(ValueError, match="bad item 14"):
            failed.result(timeout=30)


def test_pool_reuses_its_workers(start_method: StartMethod) -> None:
    with pk.WorkerPool(2, start_method=start_method) as pool:
        first = set(pk.run_parallel(w.slow_pid, range(8), backend=pool, chunksize=1))
        second = set(pool.imap(w.slow_pid, range(8), chunksize=1))
        assert first == second
        assert len(first) == 2


def test_pool_recycles_workers(start_method: StartMethod) -> None:
    with pk.WorkerPool(1, start_method=start_method, max_tasks_per_worker=2) as pool:
        pids = list(pool.imap(w.pid_of, range(6), chunksize=1))
    assert len(set(pids)) == 3
    assert pids[0] == pids[1] != pids[2]


def test_executor_map_semantics(start_method: StartMethod) -> None:
    with pk.WorkerPool(2, start_method=start_method) as pool:
        assert list(pool.map(w.add, [1, 2, 3], [10, 20, 30])) == [11, 22, 33]
        results = pool.map(w.fail_on_multiples_of_seven, range(1, 10))
        assert [next(results) for _ in range(6)] == [1, 2, 3, 4, 5, 6]
        with pytest.raises(ValueError, match="bad item 7"):
            next(results)
        with pytest.raises(TimeoutError):
            list(pool.map(w.sleep_for, [0.0, 5.0], timeout=0.5))


def test_shutdown_cancels_pending_futures(start_method: StartMethod) -> None:
    pool = pk.WorkerPool(1, start_method=start_method)
    running = pool.submit(w.sleep_for, 0.5)
    deadline = time.monotonic() + 30
    while not running.running():  # a Future offers no way to wait for "started"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pending = [pool.submit(w.sleep_for, 5.0) for _ in range(5)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert running.result() == 0.5
    # the first one may already be queued in the worker's pipe behind the running one
    for future in pending[1:]:
        assert future.cancelled()
        with pytest.raises(CancelledError):
            future.result()


def test_cancel_a_pending_future(start_method: StartMethod) -> None:
    with pk.WorkerPool(1, start_method=start_method) as pool:
        first = pool.submit(w.sleep_for, 0.3)
        second = pool.submit(w.sleep_for, 0.3)
        assert second.cancel()
        assert first.result(timeout=30) == 0.3
        assert second.cancelled()


def test_no_work_after_shutdown() -> None:
    pool = pk.WorkerPool(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(w.square, 2)
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.imap(w.square, [1])
    pool.shutdown()  # idempotent


def test_initializer_runs_in_every_worker(start_method: StartMethod) -> None:
    with pk.WorkerPool(
        2, start_method=start_method, initializer=w.set_state, initargs=("greeting", "hello")
    ) as pool:
        got = list(pool.map(w.get_state, ["greeting"] * 6))
    assert got == ["hello"] * 6


def test_failing_initializer_raises_its_own_error(start_method: StartMethod) -> None:
    with pytest.raises(RuntimeError, match="initializer says no") as info:
        pk.run_parallel(
            w.square, range(10), start_method=start_method, initializer=w.failing_initializer
        )
    assert any("initializer" in note for note in info.value.__notes__)


def test_pool_crash_replaces_the_worker(start_method: StartMethod) -> None:
    with pk.WorkerPool(2, start_method=start_method) as pool:
        with pytest.raises(pk.WorkerCrashedError):
            pool.submit(w.kill_13, 13).result(timeout=30)
        assert pool.submit(w.square, 4).result(timeout=30) == 16
        assert pk.run_parallel(w.square, range(10), backend=pool) == [x * x for x in range(10)]


def test_pool_backend_refuses_options_that_belong_to_the_pool() -> None:
    with pk.WorkerPool(1) as pool:
        with pytest.raises(ValueError, match="belong to the WorkerPool"):
            pk.run_parallel(w.square, [1], backend=pool, max_workers=2)
        with pytest.raises(ValueError, match="belong to the WorkerPool"):
            pk.imap_parallel(w.square, [1], backend=pool, start_method="spawn")
        assert pk.run_parallel(w.square, [3], backend=pool) == [9]


# ------------------------------------------------------------------ chunk sizing


class _StubDriver:
    """Just enough of a driver for a Job to size chunks (nothing runs)."""

    max_workers = 2
    changes = 0
    pickles_items = False

    def __init__(self) -> None:
        self.mutex = threading.Lock()

    def register_function(self, fn: object) -> tuple[int, bytes]:
        return 1, b""

    def abandon(self, job: object) -> None:
        pass


def _job(source: object, length: int | None, chunksize: int | None = None) -> Job:
    return Job(
        _StubDriver(),  # type: ignore[arg-type]
        w.square,
        source,  # type: ignore[arg-type]
        length=length,
        chunksize=chunksize,
        ordered=True,
        return_exceptions=False,
        fail_fast=True,
        timeout=None,
    )


def test_a_sized_input_of_long_items_goes_one_item_per_chunk() -> None:
    job = _job(range(16), 16)
    assert job.chunksize == 2  # 16 / (4 x 2 workers)
    job._adapt(2, 0.2)  # 0.1 s per item
    assert job.chunksize == 1
    for _ in range(40):  # ... then tiny ones: back up (a moving average), never above 2
        job._adapt(1000, 0.001)
        assert job.chunksize <= 2
    assert job.chunksize == 2


def test_an_iterator_of_tiny_items_grows_its_chunks_and_an_explicit_size_stays() -> None:
    job = _job(iter(range(10**6)), None)
    assert job.chunksize == 1
    for _ in range(10):
        job._adapt(job.chunksize, job.chunksize * 1e-7)
    assert job.chunksize == 1024  # doubling from 1, capped by the 20 ms target (200,000)
    fixed = _job(range(100), 100, chunksize=7)
    fixed._adapt(7, 7.0)
    assert fixed.chunksize == 7
    assert fixed.seconds_per_item == 1.0  # still measured (the engine's pipelining uses it)


# ------------------------------------------------------------------ chunks waiting in a pipe


def test_pipe_room_is_what_a_socket_pair_takes_without_blocking() -> None:
    import socket

    from parallelkit._wire.stream import ROOM_FLOOR as PIPELINE_LIMIT
    from parallelkit._wire.stream import widen as pipe_room

    parent_end, child_end = multiprocessing.Pipe(duplex=True)
    try:
        sock = socket.fromfd(parent_end.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            room = pipe_room(sock)
            assert room >= PIPELINE_LIMIT
            # the bound is safe: that many bytes go into the pipe while nobody reads
            sock.setblocking(False)
            block = b"x" * 65536
            sent = 0
            while sent < room:
                sent += sock.send(block[: room - sent])  # BlockingIOError would fail the test
        finally:
            sock.close()
    finally:
        parent_end.close()
        child_end.close()


@pytest.mark.skipif(not _platform.OFFERS.sockbuf, reason="portable mode: no send-buffer sizing")
def test_a_workers_reply_of_a_few_hundred_kb_fits_its_pipe_while_the_engine_is_busy() -> None:
    """A warm map of tiny items answers each chunk with a reply of ~200 KB; the default
    send buffer takes about half of that unread, and the worker then waited for the engine
    to read before it went on to its next chunk (waiting already in its pipe)."""
    import socket

    worker_end, parent_end = multiprocessing.Pipe(duplex=True)
    try:
        stream = W._stream(worker_end)
        try:
            reply = b"r" * (400 * 1024)
            # the engine reads nothing meanwhile: one write that does not wait takes it all
            sent = stream.sock.send(reply, socket.MSG_DONTWAIT)
            assert sent == len(reply)
        finally:
            stream.close()
    finally:
        worker_end.close()
        parent_end.close()


@pytest.mark.timeout(60)
def test_large_in_band_chunks_both_ways_do_not_deadlock(start_method: StartMethod) -> None:
    # 15 KB items stay in the pickle (below the arena's threshold): each chunk of 40 is
    # 600 KB each way, so a 2nd chunk waiting in the pipe must not block the parent while
    # the worker blocks sending its results
    items = [bytes([i % 256]) * 15_000 for i in range(400)]
    out = pk.run_parallel(w.identity, items, max_workers=2, start_method=start_method, chunksize=40)
    assert out == items
    with pk.WorkerPool(2, start_method=start_method) as pool:
        assert list(pool.imap(w.identity, items, chunksize=40)) == items
        # an iterator's chunks grow: a 2nd chunk larger than the 1st is checked again
        assert list(pool.imap(w.identity, iter(items))) == items


def test_a_worker_ends_as_a_process_of_its_start_method_does(
    start_method: StartMethod, tmp_path: Path
) -> None:
    # A spawned worker skips the interpreter's teardown (10-20 ms) but not what a program
    # relies on: non-daemon threads are joined, then its atexit handlers run.  fork and
    # forkserver children run their own atexit handlers in multiprocessing from Python 3.13
    # (gh-83856) and never before: ours do the same.
    path = str(tmp_path / "notes")
    with pk.WorkerPool(
        2, start_method=start_method, initializer=w.note_exit_in, initargs=(path,)
    ) as pool:
        pids = set(pool.map(w.late_thread_noting, [path] * 2, chunksize=1))
    w.check_exit_notes(path, pids, start_method)


def test_the_parents_atexit_handlers_never_run_in_a_forked_worker(tmp_path: Path) -> None:
    import atexit

    path = tmp_path / "ran"
    me = os.getpid()

    def parents_handler() -> None:
        if os.getpid() != me:
            with open(path, "a") as f:
                f.write(f"{os.getpid()}\n")

    atexit.register(parents_handler)
    try:
        assert pk.run_parallel(w.square, range(8), max_workers=2, start_method="fork") == [
            x * x for x in range(8)
        ]
    finally:
        atexit.unregister(parents_handler)
    assert not path.exists()


@pytest.mark.timeout(60)
def test_an_imap_closed_before_its_first_result_leaves_the_pool_working(
    start_method: StartMethod,
) -> None:
    # Found by the stress run (imap_close, forkserver, seed 669711682): closing a
    # WorkerPool.imap iterator over a lazy input before its first next() left its job in
    # the engine with its input released, and the next imap failed in Job.next_chunk.
    with pk.WorkerPool(2, start_method=start_method) as pool:
        first = pool.imap(abs, itertools.count(), chunksize=1)
        first.close()
        second = pool.imap(abs, itertools.count(), chunksize=1)
        assert [next(second) for _ in range(3)] == [0, 1, 2]
        second.close()
        assert list(pool.map(abs, range(-3, 0))) == [3, 2, 1]
