"""Static checks of ``backend=`` on the map API and on pipelines; mypy runs this, nobody else.

    mypy --strict --warn-unused-ignores tests/typing

``assert_type`` pins each inference; each ``# type: ignore[code]`` marks a call that must
stay a type error.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Literal, assert_type

import distributed

import parallelkit as pk


def square(x: int) -> int:
    return x * x


def describe(x: int) -> str:
    return f"<{x}>"


def check_backends(xs: list[int], client: distributed.Client) -> None:
    assert_type(pk.run_parallel(square, xs, backend="serial"), list[int])
    assert_type(pk.run_parallel(square, xs, backend="thread", max_workers=8), list[int])
    assert_type(pk.run_parallel(square, xs, backend="dask"), list[int])
    assert_type(pk.run_parallel(describe, xs, backend=client), list[str])
    assert_type(
        pk.run_parallel(square, xs, backend=client, return_exceptions=True),
        list[int | BaseException],
    )
    assert_type(pk.imap_parallel(square, iter(xs), backend="serial"), pk.ResultIterator[int])
    assert_type(pk.imap_parallel(describe, xs, backend=client), pk.ResultIterator[str])
    with ThreadPoolExecutor(4) as threads:
        assert_type(pk.run_parallel(square, xs, backend=threads), list[int])
    with ProcessPoolExecutor(2) as processes:
        assert_type(pk.imap_parallel(square, xs, backend=processes), pk.ResultIterator[int])


def check_pipeline_backends(xs: list[int], client: distributed.Client) -> None:
    pipeline = pk.Pipeline(xs).map(square).map(describe)
    assert_type(pipeline.run(), list[str])
    assert_type(pipeline.run(backend=client), list[str])
    assert_type(pipeline.run(backend="serial"), list[str])
    with pk.WorkerPool(2) as pool:
        assert_type(pipeline.run(backend=pool), list[str])


def check_backend_errors(xs: list[int]) -> None:
    pk.run_parallel(square, xs, backend="threads")  # type: ignore[call-overload]
    pk.run_parallel(square, xs, backend=3)  # type: ignore[call-overload]
    pk.imap_parallel(square, xs, backend=object())  # type: ignore[call-overload]
    pk.Pipeline(xs).map(square).run(backend="cluster")  # type: ignore[arg-type]
    pk.Pipeline(xs).map(square).run("serial")  # type: ignore[call-arg]


def check_auto(xs: list[int]) -> None:
    assert_type(pk.run_parallel(square, xs, backend="auto"), list[int])
    assert_type(pk.run_parallel(square, xs, backend="auto", max_workers=4), list[int])
    assert_type(
        pk.run_parallel(square, xs, backend="auto", return_exceptions=True),
        list[int | BaseException],
    )
    assert_type(pk.imap_parallel(describe, iter(xs), backend="auto"), pk.ResultIterator[str])
    stats = pk.imap_parallel(square, xs, backend="auto").stats
    if stats.choice is not None:
        assert_type(stats.choice, pk.AutoChoice)
        assert_type(stats.choice.backend, Literal["serial", "thread", "process"])
    pk.run_parallel(square, xs, backend="Auto")  # type: ignore[call-overload]
    pk.Pipeline(xs).map(square).run(backend="auto")  # type: ignore[arg-type]
