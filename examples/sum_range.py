"""Sum a big range on every core: the classic first parallel program.

The range is cut into one slice per worker; each worker sums its slice, and the parent adds
the partial sums.  Run it with ``python examples/sum_range.py [N]``.
"""

from __future__ import annotations

import sys
import time

import parallelkit as pk


def sum_slice(bounds: tuple[int, int]) -> int:
    start, stop = bounds
    total = 0
    for i in range(start, stop):  # a pure-Python loop: the kind of work worth spreading
        total += i
    return total


def slices(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def main(n: int) -> None:
    workers = pk.usable_cpu_count()
    begin = time.perf_counter()
    total = sum(pk.run_parallel(sum_slice, slices(n, 4 * workers), max_workers=workers))
    elapsed = time.perf_counter() - begin
    print(f"sum(range({n:_})) = {total:_}")
    print(f"matches n * (n - 1) // 2: {total == n * (n - 1) // 2}")
    print(f"{workers} workers, {elapsed:.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000)
