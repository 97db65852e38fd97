"""Progress (``progress=``), per-worker statistics and stall diagnosis (``stall_timeout=``)."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
from typing import Literal

import pytest
import tqdm

import parallelkit as pk
import tasks.progress as wp
from parallelkit import StartMethod


def _open_bars() -> int:
    return len(getattr(tqdm.tqdm, "_instances", ()))


# ------------------------------------------------------------------ progress: callables


def test_callable_gets_increasing_item_counts_ending_at_the_total(
    start_method: StartMethod,
) -> None:
    events: list[pk.Progress] = []
    got = pk.run_parallel(
        wp.square,
        range(101),
        max_workers=2,
        chunksize=10,
        start_method=start_method,
        progress=events.append,
    )
    assert got == [x * x for x in range(101)]
    counts = [e.done for e in events]
    assert counts[0] == 0  # shown before the first result
    assert counts == sorted(set(counts))  # strictly increasing
    assert counts[-1] == 101
    assert {e.total for e in events} == {101}
    assert events[-1].fraction == 1.0
    assert all(e.stages == () for e in events)


def test_imap_over_a_generator_has_no_total_and_counts_every_item() -> None:
    events: list[pk.Progress] = []
    with pk.imap_parallel(
        wp.square, (x for x in range(60)), max_workers=2, progress=events.append
    ) as results:
        assert list(results) == [x * x for x in range(60)]
    assert [e.done for e in events][-1] == 60
    assert {e.total for e in events} == {None}
    assert events[-1].fraction is None


def test_imap_total_comes_from_len() -> None:
    events: list[pk.Progress] = []
    items = dict.fromkeys(range(30))  # not a list, but it has a len()
    with pk.imap_parallel(wp.square, items, max_workers=2, progress=events.append) as results:
        assert sorted(results) == [x * x for x in range(30)]
    assert events[-1].done == events[-1].total == 30


@pytest.mark.parametrize("backend", ["thread", "serial"])
def test_progress_on_other_backends(backend: Literal["thread", "serial"]) -> None:
    events: list[pk.Progress] = []
    got = pk.run_parallel(
        wp.square, list(range(50)), backend=backend, chunksize=5, progress=events.append
    )
    assert got == [x * x for x in range(50)]
    counts = [e.done for e in events]
    assert counts == sorted(set(counts))
    assert counts[-1] == 50
    assert len(counts) > 2  # chunk by chunk, not only at the end


def test_progress_on_a_worker_pool_and_its_imap() -> None:
    with pk.WorkerPool(2) as pool:
        events: list[pk.Progress] = []
        assert pk.run_parallel(wp.square, range(40), backend=pool, progress=events.append) == [
            x * x for x in range(40)
        ]
        assert events[-1].done == 40
        events.clear()
        with pool.imap(wp.square, range(25), chunksize=4, progress=events.append) as results:
            assert list(results) == [x * x for x in range(25)]
        assert events[-1].done == events[-1].total == 25


def test_failed_items_count_and_the_error_still_raises() -> None:
    events: list[pk.Progress] = []
    got = pk.run_parallel(
        wp.fail_at_five,
        range(10),
        max_workers=2,
        return_exceptions=True,
        progress=events.append,
    )
    assert isinstance(got[5], ValueError)
    assert events[-1].done == 10
    with pytest.raises(ValueError, match="five"):
        pk.run_parallel(wp.fail_at_five, range(10), max_workers=2, progress=events.append)


# ------------------------------------------------------------------ progress: the tqdm bar


def test_tqdm_bar_counts_items_not_chunks(capsys: pytest.CaptureFixture[str]) -> None:
    got = pk.run_parallel(wp.square, range(101), max_workers=2, chunksize=10, progress=True)
    assert got == [x * x for x in range(101)]
    err = capsys.readouterr().err
    assert "101/101" in err  # tqdm's process_map would end at 11/101 here
    assert "item" in err
    assert _open_bars() == 0


def test_bar_closes_when_the_loop_breaks(
    start_method: StartMethod, capsys: pytest.CaptureFixture[str]
) -> None:
    for value in pk.imap_parallel(
        wp.slow_square, range(1000), max_workers=2, start_method=start_method, progress=True
    ):
        assert value == 0
        break
    # the iterator was dropped with the loop: the work stopped and the bar closed
    assert _open_bars() == 0
    err = capsys.readouterr().err
    assert "/1000" in err
    assert "1000/1000" not in err


def test_bar_closes_when_an_item_fails(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="five"):
        pk.run_parallel(wp.fail_at_five, range(10), max_workers=2, chunksize=1, progress=True)
    assert _open_bars() == 0
    assert "/10" in capsys.readouterr().err


def test_bar_closes_on_ctrl_c(capsys: pytest.CaptureFixture[str]) -> None:
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pk.run_parallel(wp.sleep_at_five, range(10), max_workers=2, chunksize=1, progress=True)
    finally:
        timer.join(5)
    assert _open_bars() == 0
    assert "/10" in capsys.readouterr().err


def test_a_clear_error_names_the_extra_when_tqdm_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    with pytest.raises(ImportError, match=r"parallelkit\[progress\]"):
        pk.run_parallel(wp.square, range(3), progress=True)
    with pytest.raises(ImportError, match=r"parallelkit\[progress\]"):
        pk.Pipeline(range(3), progress=True)
    # a callable needs no tqdm
    events: list[pk.Progress] = []
    assert pk.run_parallel(wp.square, range(3), max_workers=1, progress=events.append) == [0, 1, 4]


def test_bad_options_are_refused_before_anything_starts() -> None:
    with pytest.raises(TypeError, match="progress must be"):
        pk.run_parallel(wp.square, range(3), progress="yes")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="stall_timeout"):
        pk.run_parallel(wp.square, range(3), stall_timeout=0)
    with pytest.raises(ValueError, match="worker processes"):
        pk.run_parallel(wp.square, range(3), backend="thread", stall_timeout=1.0)
    with pytest.raises(TypeError, match="on_stats"):
        pk.run_parallel(wp.square, range(3), on_stats=3)  # type: ignore[call-overload]


# ------------------------------------------------------------------ progress: pipelines


def test_pipeline_reports_each_stage(start_method: StartMethod) -> None:
    events: list[pk.Progress] = []
    pipeline = (
        pk.Pipeline(range(200), start_method=start_method, progress=events.append)
        .map(wp.square, max_workers=2)
        .filter(bool, name="nonzero")
    )
    assert pipeline.run() == [x * x for x in range(1, 200)]
    counts = [e.done for e in events]
    assert counts == sorted(counts)
    last = events[-1]
    assert last.done == last.total == 200
    assert [(s.name, s.items_in, s.items_out) for s in last.stages] == [
        ("map(square)", 200, 200),
        ("nonzero", 200, 199),
    ]


def test_pipeline_bar_when_streaming(capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = pk.Pipeline(iter(range(50)), progress=True).map(wp.square)
    with iter(pipeline) as results:
        assert list(results) == [x * x for x in range(50)]
    err = capsys.readouterr().err
    assert "50item" in err  # no total: the bar counts up
    assert "map(square)=50" in err
    assert _open_bars() == 0


def test_pipeline_on_another_backend_reports_source_items() -> None:
    events: list[pk.Progress] = []
    pipeline = pk.Pipeline(range(30), progress=events.append).map(wp.square)
    assert pipeline.run(backend="thread") == [x * x for x in range(30)]
    assert events[-1].done == events[-1].total == 30


# ------------------------------------------------------------------ statistics


def test_run_parallel_stats_per_worker(start_method: StartMethod) -> None:
    seen: list[pk.MapStats] = []
    pk.run_parallel(
        wp.slow_square,
        range(80),
        max_workers=2,
        chunksize=5,
        start_method=start_method,
        on_stats=seen.append,
    )
    (stats,) = seen
    assert stats.items == 80
    assert sum(w.items for w in stats.workers) == 80
    assert len(stats.workers) == 2
    assert all(w.pid is not None and w.pid != os.getpid() for w in stats.workers)
    assert all(w.busy_seconds > 0 and w.idle_seconds >= 0 for w in stats.workers)
    assert stats.busy_seconds >= 80 * 0.002 * 0.9  # each item sleeps 2 ms, measured in workers
    assert 0 < stats.utilisation <= 1
    assert "80 items on 2 workers" in str(stats)


def test_stats_are_reported_when_the_call_fails() -> None:
    seen: list[pk.MapStats] = []
    with pytest.raises(ValueError, match="five"):
        pk.run_parallel(wp.fail_at_five, range(10), max_workers=2, on_stats=seen.append)
    assert len(seen) == 1


def test_imap_and_pool_stats() -> None:
    with pk.imap_parallel(wp.square, range(50), max_workers=2, chunksize=5) as results:
        assert len(list(results)) == 50
    assert results.stats.items == 50
    with pk.WorkerPool(2) as pool:
        pk.run_parallel(wp.square, range(30), backend=pool)
        with pool.imap(wp.square, range(20)) as more:
            list(more)
        assert more.stats.items == 20  # this call only
        assert pool.stats.items == 50  # the pool's life
        assert {w.pid for w in pool.stats.workers} <= {p.pid for p in pool._engine.workers}


def test_stats_on_the_thread_backend() -> None:
    seen: list[pk.MapStats] = []
    pk.run_parallel(wp.square, range(40), backend="thread", max_workers=2, on_stats=seen.append)
    assert seen[0].items == 40
    assert all(w.name.startswith("thread ") and w.pid is None for w in seen[0].workers)


# ------------------------------------------------------------------ stall diagnosis


def test_stall_dump_names_the_function_and_the_item(start_method: StartMethod) -> None:
    reports: list[pk.StallReport] = []
    got = pk.run_parallel(
        wp.sleep_at_five,
        range(10),
        max_workers=2,
        chunksize=1,
        start_method=start_method,
        stall_timeout=0.4,
        on_stall=reports.append,
    )
    assert got == list(range(10))  # a stall report does not stop the run
    # (a slow start-up can be reported too: workers hold items and nothing has finished)
    report = next(r for r in reports if any(w.item_index == 5 for w in r.workers))
    (worker,) = report.workers  # only the worker on item 5 is busy
    assert worker.item_index == 5
    assert worker.doing == "running item 5"
    assert "in sleep_at_five" in worker.stack  # faulthandler: "File ..., line N in fn"
    assert f"tasks{os.sep}progress.py" in worker.stack
    assert report.seconds >= 0.4
    assert "running item 5" in str(report)


def test_stall_dump_of_a_worker_spinning_in_python() -> None:
    reports: list[pk.StallReport] = []
    pk.run_parallel(
        wp.spin_at_five,
        range(8),
        max_workers=2,
        chunksize=1,
        stall_timeout=0.4,
        on_stall=reports.append,
    )
    report = next(r for r in reports if any(w.item_index == 5 for w in r.workers))
    stack = report.workers[0].stack
    assert "in spin_in_python" in stack
    assert "in spin_at_five" in stack


def test_stall_dump_goes_to_stderr_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    pk.run_parallel(wp.sleep_at_five, range(8), max_workers=2, chunksize=1, stall_timeout=0.4)
    err = capsys.readouterr().err
    assert "parallelkit: no item has finished for" in err
    assert "running item 5" in err
    assert "in sleep_at_five" in err


def test_stall_reports_repeat_at_most_once_per_period() -> None:
    reports: list[pk.StallReport] = []
    pk.run_parallel(
        wp.sleep_at_five,
        range(8),
        max_workers=2,
        chunksize=1,
        stall_timeout=0.3,
        on_stall=reports.append,
    )
    on_five = [r for r in reports if r.workers and r.workers[0].item_index == 5]
    assert len(on_five) >= 2  # item 5 sleeps 1.5 s: several periods
    for before, after in itertools.pairwise(on_five):
        assert after.seconds - before.seconds >= 0.3 * 0.9  # one stall, growing, once a period


def test_no_stall_report_while_workers_move_from_item_to_item() -> None:
    reports: list[pk.StallReport] = []
    got = pk.run_parallel(
        wp.slow_square,
        range(600),
        max_workers=2,
        chunksize=300,  # one chunk per worker, of 300 items of 2 ms: longer than the period
        stall_timeout=0.4,
        on_stall=reports.append,
    )
    assert got == [x * x for x in range(600)]
    assert reports == []  # no chunk finished for a while, but every item did


def test_stall_dump_on_a_worker_pool_imap() -> None:
    reports: list[pk.StallReport] = []
    with pk.WorkerPool(2) as pool:
        with pool.imap(
            wp.sleep_at_five, range(8), chunksize=1, stall_timeout=0.4, on_stall=reports.append
        ) as results:
            assert list(results) == list(range(8))
        assert pool._engine.watchers == []  # detached when the iterator closed
    assert any(w.item_index == 5 and "in sleep_at_five" in w.stack for w in reports[-1].workers)


def test_pipeline_stall_dump_names_the_stage_and_the_function(start_method: StartMethod) -> None:
    reports: list[pk.StallReport] = []
    pipeline = pk.Pipeline(
        range(10), start_method=start_method, stall_timeout=0.4, on_stall=reports.append
    ).map(wp.sleep_at_five, name="fetch")
    assert pipeline.run() == list(range(10))
    # (a slow start-up can be reported too: "has not armed its stack dump yet")
    report = next(r for r in reports if "in sleep_at_five" in r.workers[0].stack)
    (worker,) = report.workers
    assert worker.doing.startswith("stage 'fetch', on source item")
    assert "parallelkit: no item has finished" in str(report)


def test_pipeline_stall_options_are_checked() -> None:
    with pytest.raises(ValueError, match="stall_timeout"):
        pk.Pipeline(range(3), stall_timeout=-1)
    with pytest.raises(ValueError, match="own worker processes"):
        pk.Pipeline(range(3), stall_timeout=1.0).map(wp.square).run(backend="thread")
