"""What ``python -m parallelkit demo`` runs: a CPU-bound map and a worker crash.

The task functions live in importable modules, rather than in ``__main__``: workers
started by spawn or forkserver import them by name.  The busy work and its calibration
(``spin``, ``calibrate``) are the quick benchmark's (``_bench``), so both measure the same.
"""

from __future__ import annotations

import functools
import os
import platform
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from parallelkit._bench import calibrate, spin
from parallelkit._map.api import run_parallel
from parallelkit._util.context import usable_cpu_count
from parallelkit._util.types import StartMethod
from parallelkit.errors import WorkerCrashedError

CRASHING_ITEM = 5
"""The item on which :func:`crash_on_five` kills its own worker."""


def crash_on_five(x: int) -> int:
    """Return ``x``, except on item 5, where the worker SIGKILLs itself (as the OOM killer)."""
    if x == CRASHING_ITEM:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@dataclass(frozen=True, slots=True)
class DemoPlan:
    """How much work the demo does."""

    items: int
    item_seconds: float

    @classmethod
    def for_this_machine(cls, cpus: int) -> DemoPlan:
        """Four items per usable CPU, sized so the serial run takes about a second."""
        items = 4 * cpus
        return cls(items=items, item_seconds=max(0.02, min(0.15, 1.2 / items)))


def _timed(run: Callable[[], list[int]]) -> tuple[list[int], float]:
    started = time.perf_counter()
    result = run()
    return result, time.perf_counter() - started


def run_demo(
    start_methods: Sequence[StartMethod], *, plan: DemoPlan | None = None, out: TextIO
) -> int:
    """Run the demo, printing to ``out``; the exit status (0: everything behaved)."""
    cpus = usable_cpu_count()
    plan = plan or DemoPlan.for_this_machine(cpus)
    rounds = calibrate(plan.item_seconds)
    work = [rounds] * plan.items
    width = max(len(m) for m in start_methods)
    ok = True

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    say(
        f"parallelkit demo on Python {platform.python_version()}, "
        f"{cpus} usable CPU{'s' if cpus != 1 else ''}"
    )
    say()
    say(
        f"1. A CPU-bound map: {plan.items} items of ~{plan.item_seconds * 1000:.0f} ms "
        "of pure-Python work each"
    )
    labels = {m: f"run_parallel(spin, items, start_method={m!r})" for m in start_methods}
    column = max(len(label) for label in labels.values())
    expected, serial = _timed(lambda: [spin(n) for n in work])
    say(f"   {'[spin(n) for n in items]  (serial)':<{column}}  {serial:5.2f} s")
    for method in start_methods:
        result, elapsed = _timed(functools.partial(run_parallel, spin, work, start_method=method))
        same = result == expected
        ok &= same
        say(
            f"   {labels[method]:<{column}}  {elapsed:5.2f} s  {serial / elapsed:4.1f}x speed-up"
            + ("" if same else "  RESULTS DIFFER FROM SERIAL")
        )
    if cpus == 1:
        say("   (one usable CPU: no speed-up to be had; parallelkit costs only start-up here)")
    say()
    say(f"2. A worker SIGKILLs itself on item {CRASHING_ITEM} of 8, as the OOM killer would")
    for method in start_methods:
        started = time.perf_counter()
        try:
            run_parallel(crash_on_five, range(8), start_method=method, max_workers=2)
        except WorkerCrashedError as exc:
            elapsed = time.perf_counter() - started
            say(
                f"   {method:<{width}}  WorkerCrashedError after {elapsed:.2f} s: "
                f"item {exc.item_index}, pid {exc.pid}, exit code {exc.exitcode} ({exc.signal})"
            )
            ok &= exc.item_index == CRASHING_ITEM
        else:
            say(f"   {method:<{width}}  no error raised: THIS IS A BUG")
            ok = False
    say("   (multiprocessing.Pool.map would wait forever for that item.)")
    say()
    say("All good." if ok else "Something did not behave: see above.")
    return 0 if ok else 1
