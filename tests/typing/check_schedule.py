"""Static checks of ``WorkerPool.schedule`` and ``TaskFuture``; mypy runs this, nobody else.

    mypy --strict --warn-unused-ignores tests/typing

``args`` is checked against the function's parameters (a tuple of the right types);
with ``kwargs`` the call is not checked beyond the function being callable.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import assert_type

import parallelkit as pk


def square(x: int) -> int:
    return x * x


def add(a: int, b: str = "") -> str:
    return f"{a}{b}"


def nothing() -> None:
    return None


def keyword_only(x: int, *, scale: float) -> float:
    return x * scale


def check_schedule(pool: pk.WorkerPool) -> None:
    assert_type(pool.schedule(square, args=(2,)), pk.TaskFuture[int])
    assert_type(pool.schedule(square, args=(2,), timeout=1.5), pk.TaskFuture[int])
    assert_type(pool.schedule(add, args=(1,)), pk.TaskFuture[str])
    assert_type(pool.schedule(add, args=(1, "x")), pk.TaskFuture[str])
    assert_type(pool.schedule(nothing), pk.TaskFuture[None])
    assert_type(pool.schedule(nothing, timeout=None), pk.TaskFuture[None])
    assert_type(pool.schedule(pow, args=(2, 10)), pk.TaskFuture[int])
    assert_type(pool.schedule(keyword_only, args=(1,), kwargs={"scale": 2.0}), pk.TaskFuture[float])
    assert_type(pool.schedule(add, kwargs={"a": 1}), pk.TaskFuture[str])
    future = pool.schedule(square, args=(2,))
    assert_type(future.result(), int)
    assert_type(future.cancel(), bool)
    as_future: Future[int] = future  # a real concurrent.futures.Future
    del as_future


def check_schedule_errors(pool: pk.WorkerPool) -> None:
    pool.schedule(square, args=("two",))  # type: ignore[arg-type]
    pool.schedule(square)  # type: ignore[arg-type]
    pool.schedule(square, args=(1, 2))  # type: ignore[arg-type]
    pool.schedule(square, args=[2])  # type: ignore[call-overload]
    pool.schedule(square, args=(2,), timeout="1")  # type: ignore[call-overload]
    pool.schedule(square, 2)  # type: ignore[call-overload]
    wrong: pk.TaskFuture[str] = pool.schedule(square, args=(2,))  # type: ignore[arg-type]
    del wrong
