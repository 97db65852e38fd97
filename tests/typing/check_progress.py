"""Static checks of progress, statistics and stall reports; mypy runs this, nobody else.

mypy --strict --warn-unused-ignores tests/typing
"""

from __future__ import annotations

from typing import assert_type

import parallelkit as pk


def square(x: int) -> int:
    return x * x


def show(p: pk.Progress) -> None:
    assert_type(p.done, int)
    assert_type(p.total, int | None)
    assert_type(p.elapsed, float)
    assert_type(p.fraction, float | None)
    for stage in p.stages:
        assert_type(stage, pk.StageProgress)
        assert_type(stage.name, str)
        assert_type(stage.items_out, int)


def keep(stats: pk.MapStats) -> None:
    assert_type(stats.items, int)
    assert_type(stats.seconds, float)
    assert_type(stats.utilisation, float)
    for worker in stats.workers:
        assert_type(worker, pk.WorkerStats)
        assert_type(worker.pid, int | None)
        assert_type(worker.busy_seconds, float)
        assert_type(worker.idle_seconds, float)


def stalled(report: pk.StallReport) -> None:
    assert_type(report.seconds, float)
    for worker in report.workers:
        assert_type(worker, pk.WorkerStack)
        assert_type(worker.item_index, int | None)
        assert_type(worker.stack, str)


def check_map_options(xs: list[int]) -> None:
    assert_type(pk.run_parallel(square, xs, progress=True), list[int])
    assert_type(pk.run_parallel(square, xs, progress=show), list[int])
    assert_type(pk.run_parallel(square, xs, progress=lambda p: print(p.done)), list[int])
    assert_type(
        pk.run_parallel(square, xs, stall_timeout=30.0, on_stall=stalled, on_stats=keep),
        list[int],
    )
    assert_type(
        pk.run_parallel(square, xs, return_exceptions=True, progress=True),
        list[int | BaseException],
    )
    results = pk.imap_parallel(square, iter(xs), progress=show, stall_timeout=10)
    assert_type(results, pk.ResultIterator[int])
    assert_type(results.stats, pk.MapStats)
    with pk.WorkerPool(2) as pool:
        assert_type(pool.stats, pk.MapStats)
        assert_type(pool.imap(square, xs, progress=True, on_stall=stalled), pk.ResultIterator[int])
    pk.run_parallel(square, xs, progress="yes")  # type: ignore[call-overload]
    pk.run_parallel(square, xs, on_stats=square)  # type: ignore[arg-type]


def check_pipeline(xs: list[int]) -> None:
    pipeline = pk.Pipeline(xs, progress=show).map(square)
    assert_type(pipeline, pk.Pipeline[int])
    assert_type(pk.Pipeline(xs, progress=True).run(), list[int])
