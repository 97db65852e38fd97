"""Static checks of several arguments per item (``pk.star``, ``pk.star_kwargs``,
``pk.with_args``); mypy runs this, nobody else.

    mypy --strict --warn-unused-ignores tests/typing

``assert_type`` pins what mypy infers; each ``# type: ignore[code]`` is a call that must
stay a type error (an ignore that is no longer needed is itself an error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, assert_type

import parallelkit as pk


def power(base: int, exp: int) -> int:
    return base * exp


def label(x: int, name: str) -> str:
    return f"{name}{x}"


def scale(x: float, *, factor: float) -> float:
    return x * factor


def with_default(a: int, b: int = 2) -> int:
    return a * b


def describe(name: str, *, size: int) -> str:
    return f"{name}:{size}"


def check_star(pairs: list[tuple[int, int]], labelled: list[tuple[int, str]]) -> None:
    assert_type(pk.star(power), Callable[[tuple[int, int]], int])
    assert_type(pk.run_parallel(pk.star(power), pairs), list[int])
    assert_type(pk.run_parallel(pk.star(power), [(2, 3), (4, 5)]), list[int])
    assert_type(pk.run_parallel(pk.star(label), labelled), list[str])
    assert_type(pk.imap_parallel(pk.star(power), iter(pairs)), pk.ResultIterator[int])
    assert_type(
        pk.run_parallel(pk.star(power), pairs, return_exceptions=True), list[int | BaseException]
    )
    # the item type is checked against the function's parameters
    pk.run_parallel(pk.star(label), [("a", 2)])  # type: ignore[arg-type]
    pk.run_parallel(pk.star(power), [(2, 3, 4)])  # type: ignore[arg-type]
    pk.run_parallel(pk.star(power), [2, 3])  # type: ignore[arg-type]
    # with extra arguments the items are tuples of anything (a limit of the type system)
    assert_type(pk.star(power, args=(3,)), Callable[[tuple[Any, ...]], int])
    assert_type(pk.star(power, kwargs={"exp": 3}), Callable[[tuple[Any, ...]], int])
    assert_type(pk.run_parallel(pk.star(power, args=(3,)), [(2,)]), list[int])
    pk.star(power, 3)  # type: ignore[call-overload]  # extras are keyword options
    # a parameter with a default: mypy fits the tuple to the items when it can
    assert_type(pk.star(with_default), Callable[[tuple[int, int]], int])
    assert_type(pk.run_parallel(pk.star(with_default), [(2,)]), list[int])
    pk.run_parallel(pk.star(with_default), [(2, 3, 4)])  # type: ignore[arg-type]
    assert_type(pk.run_parallel(pk.star(with_default), [(2, 3)]), list[int])


def check_with_args(xs: list[int], floats: list[float]) -> None:
    assert_type(pk.with_args(label, "n"), Callable[[int], str])
    assert_type(pk.run_parallel(pk.with_args(label, "n"), xs), list[str])
    assert_type(pk.run_parallel(pk.with_args(scale, factor=2.0), floats), list[float])
    assert_type(pk.run_parallel(pk.with_args(label, name="n"), xs), list[str])
    pk.with_args(label, 3)  # type: ignore[arg-type]
    pk.with_args(scale, factor="x")  # type: ignore[arg-type]
    pk.with_args(scale, size=2)  # type: ignore[call-arg]
    pk.run_parallel(pk.with_args(label, "n"), ["s"])  # type: ignore[arg-type]


def check_star_kwargs(records: list[dict[str, object]], typed: list[Mapping[str, int]]) -> None:
    assert_type(pk.star_kwargs(describe), Callable[[Mapping[str, Any]], str])
    assert_type(pk.run_parallel(pk.star_kwargs(describe), records), list[str])
    assert_type(pk.run_parallel(pk.star_kwargs(describe), typed), list[str])
    pk.run_parallel(pk.star_kwargs(describe), [("a", 1)])  # type: ignore[arg-type]


def check_pool_and_pipeline(pairs: list[tuple[int, int]]) -> None:
    with pk.WorkerPool() as pool:
        assert_type(pool.imap(pk.star(power), pairs), pk.ResultIterator[int])
        assert_type(pool.map(pk.star(power), pairs), Iterator[int])
        assert_type(pool.submit(pk.star(power), (2, 3)), Future[int])
        pool.submit(pk.star(power), (2, "3"))  # type: ignore[arg-type]
        pool.imap(pk.star(label), pairs)  # type: ignore[arg-type]
    assert_type(pk.Pipeline(pairs).map(pk.star(power)), pk.Pipeline[int])
    assert_type(pk.Pipeline(pairs).map(pk.star(power)).run(), list[int])
    assert_type(pk.Pipeline([1, 2]).map(pk.with_args(label, "n")), pk.Pipeline[str])
    pk.Pipeline(pairs).map(pk.star(label))  # type: ignore[arg-type]


def is_multiple(x: int, of: int) -> bool:
    return x % of == 0


def repeat(x: int, times: int) -> list[int]:
    return [x] * times


def check_pipeline_stages(pairs: list[tuple[int, int]]) -> None:
    stage = pk.Pipeline(pairs).map(pk.star(power))
    assert_type(stage.filter(pk.with_args(is_multiple, 3)), pk.Pipeline[int])
    assert_type(stage.flat_map(pk.with_args(repeat, 2)), pk.Pipeline[int])
    stage.filter(pk.with_args(is_multiple, "3"))  # type: ignore[arg-type]
    pk.Pipeline(["a"]).filter(pk.with_args(is_multiple, 3))  # type: ignore[arg-type]
