"""Static checks of what users write with the parallel-map API; mypy runs this, nobody else.

    mypy --strict --warn-unused-ignores tests/typing

``assert_type`` pins each inference, so a regression in a public signature fails the check;
each ``# type: ignore[code]`` marks a call that must stay a type error (with
``--warn-unused-ignores``, an ignore that is no longer needed is itself an error).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor, Future
from typing import TypeVar, assert_type

import parallelkit as pk

T = TypeVar("T")


def square(x: int) -> int:
    return x * x


def describe(x: int) -> str:
    return f"<{x}>"


def add(a: int, b: int) -> int:
    return a + b


def scale(x: float, *, factor: float = 2.0) -> float:
    return x * factor


def first(xs: list[T]) -> T:
    return xs[0]


def init(prefix: str, level: int) -> None:
    del prefix, level


# ------------------------------------------------------------------------------ run_parallel


def check_run_parallel(xs: list[int], method: pk.StartMethod) -> None:
    assert_type(pk.run_parallel(square, xs), list[int])
    assert_type(pk.run_parallel(square, xs, return_exceptions=True), list[int | BaseException])
    assert_type(pk.run_parallel(square, xs, return_exceptions=False), list[int])
    assert_type(pk.imap_parallel(square, xs), pk.ResultIterator[int])
    assert_type(
        pk.imap_parallel(square, xs, return_exceptions=True), pk.ResultIterator[int | BaseException]
    )
    assert_type(pk.run_parallel(describe, xs), list[str])
    assert_type(pk.run_parallel(square, range(10)), list[int])
    assert_type(pk.run_parallel(square, iter(xs)), list[int])
    assert_type(pk.run_parallel(str, xs), list[str])
    assert_type(pk.run_parallel(abs, [-1, -2]), list[int])
    assert_type(pk.run_parallel(first, [[1], [2]]), list[int])
    assert_type(pk.run_parallel(lambda x: x + 1, xs), list[int])
    # An int item where a float is expected is fine (int is a float to the type system).
    assert_type(pk.run_parallel(scale, xs), list[float])
    assert_type(
        pk.run_parallel(
            square,
            xs,
            max_workers=2,
            start_method=method,
            chunksize=4,
            ordered=False,
            timeout=1.5,
            initializer=init,
            initargs=("x", 1),
        ),
        list[int],
    )
    with pk.WorkerPool(2) as pool:
        assert_type(pk.run_parallel(square, xs, backend=pool), list[int])
        assert_type(pk.run_parallel(square, xs, backend="process"), list[int])


def check_run_parallel_errors(xs: list[int], names: list[str], method: str) -> None:
    pk.run_parallel(square, names)  # type: ignore[arg-type]
    pk.run_parallel(add, xs)  # type: ignore[arg-type]
    pk.run_parallel(square, 3)  # type: ignore[call-overload]
    pk.run_parallel(square, xs, max_workers="2")  # type: ignore[call-overload]
    pk.run_parallel(square, xs, max_workers=1.5)  # type: ignore[call-overload]
    pk.run_parallel(square, xs, chunksize=1.5)  # type: ignore[call-overload]
    pk.run_parallel(square, xs, timeout="1")  # type: ignore[call-overload]
    pk.run_parallel(square, xs, start_method="frok")  # type: ignore[call-overload]
    pk.run_parallel(square, xs, start_method=method)  # type: ignore[call-overload]
    pk.run_parallel(square, xs, backend="processes")  # type: ignore[call-overload]
    pk.run_parallel(square, xs, initargs=["x", 1])  # type: ignore[call-overload]
    # fn and items are positional-only; every option is keyword-only.
    pk.run_parallel(fn=square, items=xs)  # type: ignore[call-overload]
    pk.run_parallel(square, xs, 2)  # type: ignore[call-overload]
    pk.run_parallel(square, xs, workers=2)  # type: ignore[call-overload]
    # The result is a list of the function's return type, not of anything else.
    wrong: list[str] = pk.run_parallel(square, xs)  # type: ignore[arg-type]
    del wrong


# ------------------------------------------------------------------------------ imap_parallel


def check_imap_parallel(xs: list[int]) -> None:
    for y in pk.imap_parallel(square, xs):
        assert_type(y, int)
    for s in pk.imap_parallel(describe, iter(xs), max_workers=2, ordered=False):
        assert_type(s, str)
    with pk.imap_parallel(square, xs, chunksize=8) as results:
        assert_type(next(results), int)
        assert_type(list(results), list[int])
        results.close()
    as_iterator: Iterator[int] = pk.imap_parallel(square, xs)
    del as_iterator
    with pk.WorkerPool(2) as pool:
        for z in pk.imap_parallel(square, xs, backend=pool):
            assert_type(z, int)


def check_imap_parallel_errors(xs: list[int], names: list[str]) -> None:
    pk.imap_parallel(square, names)  # type: ignore[arg-type]
    pk.imap_parallel(square, xs, ordered=None)  # type: ignore[call-overload]
    pk.imap_parallel(square, xs, start_method="threads")  # type: ignore[call-overload]
    pk.imap_parallel(items=xs, fn=square)  # type: ignore[call-overload]
    for y in pk.imap_parallel(square, xs):
        y.upper()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ WorkerPool


def check_worker_pool(xs: list[int]) -> None:
    pool = pk.WorkerPool(
        2, start_method="spawn", initializer=init, initargs=("x", 1), max_tasks_per_worker=100
    )
    executor: Executor = pool  # a real concurrent.futures.Executor
    del executor
    assert_type(pool.max_workers, int)
    assert_type(pool.start_method, pk.StartMethod)

    assert_type(pool.submit(square, 1), Future[int])
    assert_type(pool.submit(describe, 1), Future[str])
    assert_type(pool.submit(add, 1, 2), Future[int])
    assert_type(pool.submit(add, 1, b=2), Future[int])
    assert_type(pool.submit(scale, 1.0, factor=3.0), Future[float])
    assert_type(pool.submit(pow, 2, 10), Future[int])
    assert_type(pool.submit(square, 1).result(), int)
    assert_type(pool.submit(square, 1).result(timeout=1.0), int)

    assert_type(pool.map(square, xs), Iterator[int])
    assert_type(pool.map(add, xs, xs), Iterator[int])
    assert_type(
        pool.imap(square, xs, return_exceptions=True), pk.ResultIterator[int | BaseException]
    )
    assert_type(pool.map(add, xs, xs), Iterator[int])
    assert_type(pool.map(describe, xs, timeout=2.0, chunksize=4), Iterator[str])
    for y in pool.map(square, xs):
        assert_type(y, int)

    for z in pool.imap(square, xs):
        assert_type(z, int)
    with pool.imap(describe, iter(xs), chunksize=2, ordered=False, timeout=1.0) as names:
        assert_type(next(names), str)

    pool.shutdown()
    pool.shutdown(wait=False, cancel_futures=True)
    with pk.WorkerPool() as other:
        assert_type(other, pk.WorkerPool)


def check_worker_pool_errors(xs: list[int], names: list[str]) -> None:
    pool = pk.WorkerPool(2)
    pool.submit(square, "one")  # type: ignore[arg-type]
    pool.submit(add, 1)  # type: ignore[call-arg]
    pool.submit(add, 1, 2, 3)  # type: ignore[call-arg]
    pool.submit(scale, 1.0, factor="x")  # type: ignore[arg-type]
    pool.submit(scale, 1.0, scale=3.0)  # type: ignore[call-arg]
    pool.submit(fn=square)  # type: ignore[call-arg]
    wrong: Future[str] = pool.submit(square, 1)  # type: ignore[arg-type]
    del wrong
    pool.imap(square, names)  # type: ignore[arg-type]
    pool.imap(square, xs, 4)  # type: ignore[call-overload]
    pool.imap(square, xs, chunksize="4")  # type: ignore[call-overload]
    pool.map(square, xs, timeout="soon")  # type: ignore[call-overload]
    pool.shutdown(cancel=True)  # type: ignore[call-arg]
    pk.WorkerPool("2")  # type: ignore[arg-type]
    pk.WorkerPool(2, "spawn")  # type: ignore[call-arg]
    pk.WorkerPool(2, start_method="frok")  # type: ignore[arg-type]
    pk.WorkerPool(2, max_tasks_per_worker=1.5)  # type: ignore[arg-type]
    pk.WorkerPool(2, initargs=[1])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ errors


def check_errors() -> None:
    try:
        pk.run_parallel(square, [1], timeout=1.0)
    except pk.TaskTimeoutError as exc:
        assert_type(exc.item_index, int | None)
        assert_type(exc.timeout, float)
        timeout_error: TimeoutError = exc
        del timeout_error
    except pk.WorkerCrashedError as exc:
        assert_type(exc.item_index, int | None)
        assert_type(exc.pid, int | None)
        assert_type(exc.exitcode, int | None)
        assert_type(exc.signal, str | None)
    except pk.RemoteError as exc:
        assert_type(exc.type_name, str)
        assert_type(exc.remote_traceback, str)
    except pk.SerializationError as exc:
        assert_type(exc.item_index, int | None)
        type_error: TypeError = exc
        del type_error
    except pk.StartMethodError as exc:
        value_error: ValueError = exc
        del value_error
    for cls in (
        pk.StartMethodError,
        pk.SerializationError,
        pk.WorkerCrashedError,
        pk.TaskTimeoutError,
        pk.RemoteError,
        pk.PipelineError,
        pk.ChannelClosedError,
    ):
        base: type[pk.ParallelKitError] = cls
        del base
