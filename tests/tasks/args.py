"""Task functions for the tests of several arguments per item (``tests/test_args.py``)."""

from __future__ import annotations

import time

from parallelkit import SharedCounter


def power(base: int, exp: int) -> int:
    return int(base**exp)


def affine(x: int, scale: int, offset: int = 0, *, sign: int = 1) -> int:
    return sign * (x * scale + offset)


def describe(name: str, *, size: int, unit: str = "B") -> str:
    return f"{name}:{size}{unit}"


def counted_power(base: int, exp: int, calls: SharedCounter) -> int:
    calls.add()
    return int(base**exp)


def slow_power(base: int, exp: int, delay: float) -> int:
    time.sleep(delay)
    return int(base**exp)


def fail_on_zero_exp(base: int, exp: int) -> int:
    if exp == 0:
        raise ValueError(f"zero exponent for {base}")
    return int(base**exp)


def keep_ref(x: int, ballast: object) -> int:
    return x


def is_multiple(x: int, of: int) -> bool:
    return x % of == 0


def repeat(x: int, times: int) -> list[int]:
    return [x] * times


def to_record(x: int, *, unit: str) -> dict[str, object]:
    return {"name": f"n{x}", "size": x, "unit": unit}


def first_of(x: int, y: int, ballast: object) -> int:
    return x


def unchanged(item: object) -> object:
    """The item as it is (a stage before a star() stage)."""
    return item
