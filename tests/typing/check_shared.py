"""Static checks of what users write with the shared-memory objects; mypy runs this.

    mypy --strict --warn-unused-ignores tests/typing

``assert_type`` pins each inference; each ``# type: ignore[code]`` marks a call that must
stay a type error.
"""

from __future__ import annotations

from typing import Any, Literal, assert_type

import numpy as np
import numpy.typing as npt

import parallelkit as pk
from parallelkit.testing import remove_stale_segments


def check_counter() -> None:
    with pk.SharedCounter() as counter:
        assert_type(counter, pk.SharedCounter)
        counter.add()
        counter.add(5)
        assert_type(counter.value, int)
        assert_type(counter.name, str)
        assert_type(counter.closed, bool)
    counter.close()


def check_counter_errors(counter: pk.SharedCounter) -> None:
    counter.add(1.5)  # type: ignore[arg-type]
    counter.add("1")  # type: ignore[arg-type]
    counter.value = 3  # type: ignore[misc]
    pk.SharedCounter(0)  # type: ignore[call-arg]


def check_accumulator() -> None:
    total = pk.SharedAccumulator("sum", dtype=int)
    assert_type(total, pk.SharedAccumulator[int])
    assert_type(total.value, int)
    total.add(3)
    lowest = pk.SharedAccumulator("min", dtype=float)
    assert_type(lowest.value, float)
    lowest.add(2.5)
    lowest.add(2)  # an int is a float to the type system
    default = pk.SharedAccumulator("max")
    assert_type(default, pk.SharedAccumulator[float])
    assert_type(default.value, float)
    assert_type(default.op, Literal["sum", "min", "max"])
    with pk.SharedAccumulator("sum", dtype=int) as acc:
        assert_type(acc, pk.SharedAccumulator[int])
        assert_type(acc.dtype, type[int])


def check_accumulator_errors(total: pk.SharedAccumulator[int]) -> None:
    total.add(1.5)  # type: ignore[arg-type]
    pk.SharedAccumulator("mean")  # type: ignore[call-overload]
    pk.SharedAccumulator("sum", dtype=str)  # type: ignore[call-overload]
    pk.SharedAccumulator(op="sum", dtype=int, extra=1)  # type: ignore[call-overload]
    pk.SharedAccumulator("sum", int)  # type: ignore[call-overload]
    wrong: str = pk.SharedAccumulator("sum", dtype=int).value  # type: ignore[assignment]
    del wrong


def check_array(source: npt.NDArray[np.float64]) -> None:
    with pk.SharedArray.zeros((3, 4), dtype="int32") as shared:
        assert_type(shared, pk.SharedArray)
        view = shared.array
        assert_type(view, np.ndarray[Any, Any])
        view[0, 0] = 1
    assert_type(pk.SharedArray.zeros(10), pk.SharedArray)
    assert_type(pk.SharedArray.zeros([2, 2], np.float32), pk.SharedArray)
    assert_type(pk.SharedArray.from_array(source), pk.SharedArray)
    assert_type(pk.SharedArray.from_array([[1, 2], [3, 4]]), pk.SharedArray)


def check_array_errors() -> None:
    pk.SharedArray.zeros("3")  # type: ignore[arg-type]
    pk.SharedArray.zeros(3, dtype="float64", order="C")  # type: ignore[call-arg]


def check_cleanup() -> None:
    assert_type(remove_stale_segments(), list[str])
