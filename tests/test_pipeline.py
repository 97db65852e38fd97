"""Pipelines: results, ordering, streaming, backpressure, cancellation and failures."""

from __future__ import annotations

import functools
import gc
import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import parallelkit as pk
import tasks.basic as pool_workers
import tasks.pipeline as w
from conftest import START_METHODS
from parallelkit import StartMethod
from parallelkit._wire.codec import RemoteTraceback
from parallelkit.testing import worker_counts

# ------------------------------------------------------------------ results


def test_stages_compose_like_map_and_filter(start_method: StartMethod) -> None:
    pipeline = (
        pk.Pipeline(range(200), start_method=start_method)
        .map(w.square, max_workers=2)
        .filter(w.is_even)
        .flat_map(w.twice, max_workers=2)
    )
    expected = [y for x in range(200) if (x * x) % 2 == 0 for y in (x * x, x * x)]
    assert pipeline.run() == expected
    assert list(pipeline) == expected  # a pipeline over a sequence runs again


def test_generator_source_and_empty_flat_maps(start_method: StartMethod) -> None:
    source = (x for x in range(100))
    got = pk.Pipeline(source, start_method=start_method).flat_map(w.up_to).map(w.as_text).run()
    assert got == [str(y) for x in range(100) for y in range(x % 4)]


def test_a_filter_that_drops_everything(start_method: StartMethod) -> None:
    source = range(100, 300)
    assert pk.Pipeline(source, start_method=start_method).filter(w.is_small).run() == []


def test_empty_source_and_no_stages() -> None:
    assert pk.Pipeline([]).map(w.square).run() == []
    assert pk.Pipeline(iter([])).map(w.square).run() == []
    assert pk.Pipeline(range(5)).run() == [0, 1, 2, 3, 4]
    assert list(pk.Pipeline(x for x in range(3))) == [0, 1, 2]


def test_unordered_results_overtake_but_none_is_lost(start_method: StartMethod) -> None:
    got = (
        pk.Pipeline(iter(range(40)), start_method=start_method, maxsize=10)
        .map(w.slow_in_reverse, max_workers=3, ordered=False)
        .run()
    )
    assert Counter(got) == Counter(range(40))


def test_ordered_is_the_default_even_when_workers_finish_out_of_order(
    start_method: StartMethod,
) -> None:
    got = (
        pk.Pipeline(iter(range(40)), start_method=start_method, maxsize=10)
        .map(w.slow_in_reverse, max_workers=3)
        .run()
    )
    assert got == list(range(40))


def test_every_worker_of_a_stage_takes_part() -> None:
    pids = pk.Pipeline(iter(range(60)), maxsize=4).map(w.pid_after_sleep, max_workers=2).run()
    assert len(set(pids)) == 2


def test_lambdas_and_closures_are_sent(start_method: StartMethod) -> None:
    offset = 10
    got = pk.Pipeline(range(5), start_method=start_method).map(lambda x: x + offset).run()
    assert got == [10, 11, 12, 13, 14]


def test_large_payloads(start_method: StartMethod) -> None:
    blobs = [bytes([i]) * (1 << 20) for i in range(12)]
    got = pk.Pipeline(blobs, start_method=start_method).map(w.identity).map(w.length).run()
    assert got == [1 << 20] * 12


def test_stats_count_items_per_stage() -> None:
    pipeline = pk.Pipeline(range(100)).map(w.square, max_workers=2).filter(w.is_even)
    assert pk.Pipeline(range(3)).map(w.square).stats is None  # not run yet
    pipeline.run()
    stats = pipeline.stats
    assert stats is not None
    first, second = stats.stages
    assert (first.name, first.workers, first.items_in, first.items_out) == (
        "map(square)",
        2,
        100,
        100,
    )
    assert (second.name, second.items_in, second.items_out) == ("filter(is_even)", 100, 50)
    assert stats.source_items == 100
    assert stats.items_out == 50
    assert all(s.busy_seconds >= 0 and s.waiting_seconds >= 0 for s in stats.stages)
    assert stats.bottleneck in stats.stages
    table = str(stats)
    assert "map(square)" in table
    assert "filter(is_even)" in table


@pytest.mark.parametrize("backend", ["thread", "serial"])
def test_stats_describe_the_last_run_whatever_its_backend(backend: str) -> None:
    pipeline = pk.Pipeline(range(100)).map(w.square, max_workers=2).filter(w.is_even)
    assert pipeline.run(backend=backend) == [x * x for x in range(100) if x % 2 == 0]  # type: ignore[arg-type]
    stats = pipeline.stats
    assert stats is not None
    assert [(s.name, s.items_in, s.items_out) for s in stats.stages] == [
        ("map(square)", 100, 100),
        ("filter(is_even)", 100, 50),
    ]
    assert (stats.source_items, stats.items_out) == (100, 50)
    assert stats.stages[0].workers >= 1
    pipeline.run()  # the stages' own processes: their stats
    process_stats = pipeline.stats
    assert process_stats is not None
    assert process_stats.stages[0].workers == 2
    failing = pk.Pipeline(range(30)).map(w.fail_on_13, name="fails")
    with pytest.raises(pk.PipelineError):
        failing.run(backend=backend)  # type: ignore[arg-type]
    failed_stats = failing.stats
    assert failed_stats is not None
    assert failed_stats.stages[0].items_in == 30  # every item ran; item 13 failed
    assert failed_stats.items_out == 0  # the consumer got nothing


def test_stats_count_the_items_the_consumer_took(start_method: StartMethod) -> None:
    pipeline = pk.Pipeline(range(100_000), start_method=start_method).map(w.plus_one)
    with iter(pipeline) as results:
        assert [next(results), next(results)] == [1, 2]
        stats = pipeline.stats
        assert stats is not None
        assert stats.items_out == 2  # not what is ready for the consumer
        assert results.stats.items_out == 2
        assert stats.source_items >= 2
    assert list(pk.Pipeline(iter(range(5)))) == [0, 1, 2, 3, 4]
    bare = pk.Pipeline(iter(range(5)))
    with iter(bare) as values:
        next(values)
        assert values.stats.items_out == 1
        assert values.stats.source_items == 1
    bare.run()
    assert bare.stats is not None
    assert bare.stats.items_out == 4  # what the iterator left


def test_the_slow_stage_shows_as_the_bottleneck() -> None:
    pipeline = pk.Pipeline(range(5)).map(w.square).map(w.sleepy, name="slow")
    pipeline.run()
    stats = pipeline.stats
    assert stats is not None
    assert stats.bottleneck is not None
    assert stats.bottleneck.name == "slow"
    assert stats.stages[1].busy_seconds >= 0.95  # five items of 0.2 s
    assert stats.stages[1].busy_seconds > 10 * stats.stages[0].busy_seconds


def test_stage_names() -> None:
    pipeline = pk.Pipeline(range(3)).map(w.square).map(w.square).filter(w.is_even, name="evens")
    assert pipeline.stages == ("map(square)", "map(square)#2", "evens")
    assert "map(square)#2" in repr(pipeline)
    with pytest.raises(ValueError, match="already named 'evens'"):
        pipeline.map(w.square, name="evens")


def test_stages_share_a_counter(start_method: StartMethod) -> None:
    with pk.SharedCounter() as counter:
        add = functools.partial(w.count_into, counter)  # the function carries it
        pipeline = pk.Pipeline(range(100), start_method=start_method).map(add, max_workers=2)
        # ... and so do the items
        pipeline = pipeline.map(lambda x: (counter, x)).map(w.add_item, max_workers=2)
        assert pipeline.run() == list(range(100))
        assert counter.value == 2 * sum(range(100))


# ------------------------------------------------------------------ streaming and backpressure


def _lockstep(received: list[int], seen: threading.Condition, n: int) -> Iterator[int]:
    """Items one at a time: the next one only once the consumer has the last one."""
    for i in range(n):
        yield i
        with seen:
            seen.wait_for(lambda: len(received) > i)  # noqa: B023 - called here


@pytest.mark.timeout(30)
def test_a_slow_trickle_is_not_held_back_for_a_batch(start_method: StartMethod) -> None:
    # the source thread reads more items at a time once the source is quick twice in a
    # row; an item it holds must still reach the consumer while the source waits for it
    received: list[int] = []
    seen = threading.Condition()
    pipeline = pk.Pipeline(_lockstep(received, seen, 8), start_method=start_method)
    with iter(pipeline.map(w.plus_one).map(w.square)) as results:
        for i, value in enumerate(results):
            assert value == (i + 1) ** 2
            with seen:
                received.append(value)
                seen.notify_all()
    assert received == [(i + 1) ** 2 for i in range(8)]


def test_a_fast_source_does_not_run_ahead_of_a_slow_consumer(start_method: StartMethod) -> None:
    pulled = [0]
    pipeline = pk.Pipeline(
        w.counting_source(None, pulled), start_method=start_method, maxsize=50
    ).map(w.plus_one, max_workers=2)
    with iter(pipeline) as results:
        for i, value in enumerate(results):
            assert value == i + 1
            # the source is never more than maxsize items ahead of what we took
            assert pulled[0] - (i + 1) <= 50
            if i == 300:
                break
            if i % 100 == 0:
                time.sleep(0.05)  # a slow consumer: the source must wait for it


def _big_items(pulled: list[int]) -> Iterator[bytes]:
    while True:
        pulled[0] += 1
        yield bytes(1 << 20)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_an_infinite_source_with_a_slow_consumer_keeps_memory_flat() -> None:
    pulled = [0]
    pipeline = pk.Pipeline(_big_items(pulled), maxsize=8).map(w.identity).map(w.length)
    with iter(pipeline) as results:
        for i, size in enumerate(results):
            assert size == 1 << 20
            if i == 20:
                baseline = _rss()
            if i > 20:
                time.sleep(0.002)
            if i == 220:
                break
        grown = _rss() - baseline
    # 200 MB went through; only a handful of megabytes may be held at any time
    assert grown < 40 << 20, f"RSS grew by {grown >> 20} MiB"
    assert pulled[0] <= 221 + 8


# ------------------------------------------------------------------ cancelling


def _closing_source(state: dict[str, bool]) -> Iterator[int]:
    try:
        i = 0
        while True:
            yield i
            i += 1
    finally:
        state["closed"] = True


def test_breaking_out_of_the_loop_cancels_the_run(start_method: StartMethod) -> None:
    state: dict[str, bool] = {}
    pipeline = pk.Pipeline(_closing_source(state), start_method=start_method).map(w.square)
    for value in pipeline:
        if value > 100:
            break
    gc.collect()
    deadline = time.monotonic() + 5
    while "closed" not in state and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state == {"closed": True}  # the source generator was closed; no process is left


def test_close_stops_a_run_whose_stage_is_busy(start_method: StartMethod) -> None:
    results = iter(pk.Pipeline(range(100), start_method=start_method).map(w.sleepy, max_workers=2))
    assert next(results) == 0
    results.close()
    assert multiprocessing.active_children() == []  # stopped now, not after 100 items
    with pytest.raises(StopIteration):
        next(results)
    results.close()  # idempotent


# ------------------------------------------------------------------ failures


def test_a_stage_exception_names_the_stage_and_the_item(start_method: StartMethod) -> None:
    pipeline = (
        pk.Pipeline(range(30), start_method=start_method)
        .map(w.plus_one, name="inc")
        .map(w.fail_on_13, max_workers=2, name="check")
    )
    with pytest.raises(pk.PipelineError, match="'check'") as caught:
        pipeline.run()
    error = caught.value
    assert error.stage == "check"
    assert error.item == 13
    assert error.item_index is None  # a later stage: the item is not a source item
    assert isinstance(error.__cause__, ValueError)
    assert str(error.__cause__) == "unlucky 13"
    assert isinstance(error.__cause__.__cause__, RemoteTraceback)
    assert "fail_on_13" in str(error.__cause__.__cause__)


def test_a_first_stage_exception_gives_the_source_position() -> None:
    with pytest.raises(pk.PipelineError) as caught:
        pk.Pipeline(range(30)).map(w.fail_on_13).run()
    assert caught.value.item == 13
    assert caught.value.item_index == 13


def _collect(results: Iterable[int], into: list[int]) -> None:
    for value in results:
        into.append(value)


def test_results_before_a_failure_are_streamed(start_method: StartMethod) -> None:
    got: list[int] = []
    pipeline = pk.Pipeline(iter(range(30)), start_method=start_method, maxsize=1)
    with pytest.raises(pk.PipelineError):
        _collect(pipeline.map(w.fail_on_13), got)
    assert got == list(range(13))


@pytest.mark.parametrize("stage_fn", [w.crash_on_5, w.kill_self_on_5], ids=["exit", "sigkill"])
def test_a_worker_that_dies_ends_the_run(
    start_method: StartMethod, stage_fn: Callable[[int], int]
) -> None:
    pipeline = pk.Pipeline(range(20), start_method=start_method).map(w.plus_one)
    pipeline = pipeline.map(stage_fn, max_workers=2, name="fragile")
    with pytest.raises(pk.PipelineError, match="'fragile'") as caught:
        pipeline.run()
    crash = caught.value.__cause__
    assert isinstance(crash, pk.WorkerCrashedError)
    if stage_fn is w.crash_on_5:
        assert crash.exitcode == 3
        assert crash.signal is None
    else:
        assert crash.signal == "SIGKILL"
    assert "source item" in str(crash)


def test_a_worker_killed_from_outside_ends_the_run(start_method: StartMethod) -> None:
    results = iter(pk.Pipeline(range(50), start_method=start_method).map(w.sleepy, name="nap"))
    assert next(results) == 0
    victims = [p for p in _children() if p != os.getpid()]
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(pk.PipelineError, match="'nap'") as caught:
        list(results)
    assert isinstance(caught.value.__cause__, pk.WorkerCrashedError)
    assert caught.value.__cause__.signal == "SIGKILL"


def _children() -> list[int]:
    return [p.pid for p in multiprocessing.active_children() if p.pid is not None]


def _failing_source() -> Iterator[int]:
    yield 1
    yield 2
    raise OSError("the disk went away")


def test_a_source_that_raises(start_method: StartMethod) -> None:
    got: list[int] = []
    pipeline = pk.Pipeline(_failing_source(), start_method=start_method).map(w.plus_one)
    with pytest.raises(pk.PipelineError, match="disk went away") as caught:
        _collect(pipeline, got)
    assert got == [2, 3]  # nothing the source produced is lost
    assert caught.value.stage == "source"
    assert isinstance(caught.value.__cause__, OSError)


def test_an_unpicklable_source_item_fails_in_the_caller(start_method: StartMethod) -> None:
    lock = threading.Lock()
    pipeline = pk.Pipeline([1, 2, lock, 4], start_method=start_method).map(w.identity)
    with pytest.raises(pk.PipelineError, match="item 2") as caught:
        pipeline.run()
    assert caught.value.stage == "source"
    assert caught.value.item_index == 2
    assert isinstance(caught.value.__cause__, pk.SerializationError)


def test_an_unpicklable_result_names_the_stage(start_method: StartMethod) -> None:
    pipeline = pk.Pipeline(range(3), start_method=start_method).map(w.lock_for, name="locks")
    with pytest.raises(pk.PipelineError, match="'locks'") as caught:
        pipeline.map(w.identity).run()
    assert isinstance(caught.value.__cause__, pk.SerializationError)
    assert caught.value.__cause__.what == "result"


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: pk.Pipeline(42), TypeError, "must be iterable"),  # type: ignore[arg-type]
        (lambda: pk.Pipeline([], maxsize=0), ValueError, "maxsize must be a positive int"),
        (lambda: pk.Pipeline([], start_method="frok"), pk.StartMethodError, "frok"),  # type: ignore[arg-type]
        (lambda: pk.Pipeline([]).map(42), TypeError, "fn must be callable"),  # type: ignore[arg-type]
        (lambda: pk.Pipeline([]).filter(None), TypeError, "pred must be callable"),  # type: ignore[arg-type]
        (lambda: pk.Pipeline([]).map(w.square, max_workers=0), ValueError, "max_workers"),
        (lambda: pk.Pipeline([]).map(w.square, max_workers=True), TypeError, "max_workers"),
        (lambda: pk.Pipeline([]).map(w.square, name=3), TypeError, "name"),  # type: ignore[arg-type]
        (lambda: pk.Pipeline([]).map(w.square, ordered=None), TypeError, "ordered"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_fail_at_once(build: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build()  # type: ignore[operator]


# ------------------------------------------------------------------ properties

_STAGES: dict[str, tuple[str, Callable[[int], Any]]] = {
    "map plus_one": ("map", w.plus_one),
    "map square": ("map", w.square),
    "filter is_even": ("filter", w.is_even),
    "filter is_small": ("filter", w.is_small),
    "flat_map twice": ("flat_map", w.twice),
    "flat_map up_to": ("flat_map", w.up_to),
}
_stage = st.tuples(st.sampled_from(sorted(_STAGES)), worker_counts(max_value=3), st.booleans())


def _check_pipeline(
    start_method: StartMethod,
    items: list[int],
    as_iterator: bool,
    stages: list[tuple[str, int, bool]],
    maxsize: int | None,
) -> None:
    source: Iterable[int] = iter(items) if as_iterator else items
    pipeline: pk.Pipeline[Any] = pk.Pipeline(source, start_method=start_method, maxsize=maxsize)
    expected: list[Any] = list(items)
    for key, workers, ordered in stages:
        kind, fn = _STAGES[key]
        if kind == "map":
            pipeline = pipeline.map(fn, max_workers=workers, ordered=ordered)
            expected = [fn(x) for x in expected]
        elif kind == "filter":
            pipeline = pipeline.filter(fn, max_workers=workers, ordered=ordered)
            expected = [x for x in expected if fn(x)]
        else:
            pipeline = pipeline.flat_map(fn, max_workers=workers, ordered=ordered)
            expected = [y for x in expected for y in fn(x)]
    got = pipeline.run()
    if all(ordered for _, _, ordered in stages):
        assert got == expected
    else:
        assert Counter(got) == Counter(expected)


_property = given(
    items=st.lists(st.integers(-1000, 1000), max_size=80),
    as_iterator=st.booleans(),
    stages=st.lists(_stage, min_size=1, max_size=3),
    maxsize=st.none() | st.integers(1, 20),
)


@_property
def test_a_pipeline_equals_the_same_composition_in_one_process(
    items: list[int], as_iterator: bool, stages: list[tuple[str, int, bool]], maxsize: int | None
) -> None:
    _check_pipeline("fork", items, as_iterator, stages, maxsize)


@pytest.mark.parametrize("start_method", [m for m in START_METHODS if m != "fork"])
@settings(max_examples=max(3, settings().max_examples // 5))
@_property
def test_the_composition_property_under_other_start_methods(
    start_method: StartMethod,
    items: list[int],
    as_iterator: bool,
    stages: list[tuple[str, int, bool]],
    maxsize: int | None,
) -> None:
    _check_pipeline(start_method, items, as_iterator, stages, maxsize)


@pytest.mark.timeout(120)
def test_a_stage_ends_as_a_process_of_its_start_method_does(
    start_method: StartMethod, tmp_path: Path
) -> None:
    # As a pool worker (test_pool): a spawned stage skips the interpreter's teardown but
    # still joins its non-daemon threads and then runs its atexit handlers.
    path = str(tmp_path / "notes")
    pids = set(
        pk.Pipeline([path] * 4, start_method=start_method)
        .map(pool_workers.note_exit_once_and_late_thread, max_workers=2)
        .run()
    )
    pool_workers.check_exit_notes(path, pids, start_method)


# ------------------------------------------------------------------ after a failure


def test_next_after_a_stage_error_is_the_end(start_method: StartMethod) -> None:
    results = iter(pk.Pipeline(range(30), start_method=start_method, maxsize=1).map(w.fail_on_13))
    got = [next(results) for _ in range(13)]
    assert got == list(range(13))
    with pytest.raises(pk.PipelineError, match="unlucky 13"):
        next(results)
    # raised once; the iterator is finished from then on, as imap_parallel's is
    with pytest.raises(StopIteration):
        next(results)
    assert list(results) == []
    assert _children() == []


def test_next_after_a_crashed_worker_is_the_end(start_method: StartMethod) -> None:
    results = iter(pk.Pipeline(range(30), start_method=start_method).map(w.crash_on_5))
    with pytest.raises(pk.PipelineError):
        list(results)
    with pytest.raises(StopIteration):
        next(results)


def test_next_after_ctrl_c_is_the_end(start_method: StartMethod) -> None:
    # Python's own handler, even where SIGINT came in ignored (a background job of a shell)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_then_next(start_method)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_then_next(start_method: StartMethod) -> None:
    calls = [0]

    def press_ctrl_c(progress: pk.Progress) -> None:
        # called in the consumer's thread while next() routes; the first call is at start
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(signal.SIGINT)  # a real SIGINT: the default handler raises

    # an endless source: the run cannot end before the third call
    pipeline = pk.Pipeline(itertools.count(), start_method=start_method, progress=press_ctrl_c)
    results = iter(pipeline.map(w.plus_one))
    with pytest.raises(KeyboardInterrupt):
        list(results)
    with pytest.raises(StopIteration):
        next(results)
    assert _children() == []


# ------------------------------------------------------------------ memory kept after a run


@pytest.mark.timeout(120)
def test_a_large_item_is_not_kept_after_the_run(start_method: StartMethod) -> None:
    size = 128 << 20
    big = b"x" * size
    pipeline = pk.Pipeline([0, big, 0], start_method=start_method, maxsize=1)
    pipeline = pipeline.map(w.rss_or_same)
    gc.collect()
    before = w.rss_bytes()
    results = pipeline.run()
    # one item per batch (maxsize=1): the stage answered the last 0 after the large item
    # had come and gone; it holds nothing of it
    first, through, last = results
    assert through == big
    assert isinstance(first, int)
    assert isinstance(last, int)
    assert last - first < size // 3, f"the stage worker kept {(last - first) >> 20} MiB"
    del results, through
    gc.collect()
    grown = w.rss_bytes() - before
    assert grown < size // 3, f"the consumer kept {grown >> 20} MiB"
    assert pipeline.stats is not None  # the run is kept for its stats, not its results


# ------------------------------------------------------------------ the default bound


def _large_items(n: int, size: int, stats: dict[str, int], consumed: list[int]) -> Iterator[bytes]:
    """``n`` distinct items of ``size`` bytes; notes the most items ever taken from it and
    not yet received by the consumer."""
    for i in range(n):
        stats["max"] = max(stats.get("max", 0), i + 1 - consumed[0])
        yield bytes([i]) * size


@pytest.mark.timeout(180)
def test_the_default_bound_counts_bytes(start_method: StartMethod) -> None:
    # 12 items of 50 MB through two stages of two workers: by count alone, all 12 were let
    # into flight at once (2 x 4 workers + 4); the default bound weighs them
    size = 50 << 20
    stats: dict[str, int] = {}
    consumed = [0]
    pipeline = (
        pk.Pipeline(_large_items(12, size, stats, consumed), start_method=start_method)
        .map(w.identity, max_workers=2)
        .map(w.length, max_workers=2)
    )
    with iter(pipeline) as results:
        for got in results:
            assert got == size
            consumed[0] += 1
    assert consumed[0] == 12
    # the byte budget (64 MiB) is spent by two items; the source thread may hold one more
    assert stats["max"] <= 3, stats


@pytest.mark.timeout(180)
def test_the_default_bound_counts_bytes_inside_the_stages(start_method: StartMethod) -> None:
    size = 50 << 20
    with pk.SharedCounter() as inside:
        source = ((inside, bytes([i]) * size) for i in range(12))
        results = (
            pk.Pipeline(source, start_method=start_method)
            .map(w.count_in, max_workers=2)
            .map(w.count_out, max_workers=2)
            .run()
        )
    assert [length for length, _ in results] == [size] * 12
    # items between the first stage's start and the last stage's end, as each came in
    assert max(seen for _, seen in results) <= 2, results


# ------------------------------------------------------------------ the child main


def test_a_stage_worker_does_not_hold_the_parents_end_of_its_pipe(
    start_method: StartMethod,
) -> None:
    # Under fork a stage worker inherited the parent's end of its own pipe and kept it open
    # (the pool worker and the channel server closed theirs): now the one child main closes
    # it for every role.  Sockets the test process held before the run are not counted.
    before = w.socket_inodes()
    shared = pk.Pipeline([0], start_method=start_method).map(w.sockets_shared_with_parent).run()
    assert [sorted(set(s) - before) for s in shared] == [[]]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_stage_function_that_cannot_be_unpickled_is_a_start_up_failure(method: str) -> None:
    # It used to end the worker with a traceback on stderr and exit code 1, reported as a
    # crash; now the worker reports it as the pool worker reports its initializer's failure.
    # (Under fork the function is inherited, not unpickled.)
    pipeline = pk.Pipeline(range(4), start_method=method).map(w.Unloadable())  # type: ignore[arg-type]
    with pytest.raises(pk.PipelineError, match="could not start") as caught:
        pipeline.run()
    cause = caught.value.__cause__
    assert isinstance(cause, pk.SerializationError)
    assert cause.what == "function"
    assert isinstance(cause.__cause__, ValueError)
    assert str(cause.__cause__) == "this function cannot be loaded here"
