"""One round of the stress run: a scenario, a start method and a seed, in this interpreter.

Run by tests/stress/test_stress.py in a child interpreter with ``PARALLELKIT_FUZZ`` set
(the schedule fuzzer reads it at import), or by hand to replay a round::

    PYTHONPATH=src:tests PARALLELKIT_FUZZ=SEED:MAX_MS:PERCENT \\
        python tests/stress/scenarios.py SCENARIO START_METHOD SEED

Every choice a scenario makes (API, sizes, worker counts, when to kill a worker) is drawn
from ``random.Random(SEED)`` and printed as a ``params`` line first, so the same command
makes the same choices.  The round checks every result exactly and runs the leak check
around the whole scenario; any failure is a traceback and exit status 1.  ``SIGUSR1``
dumps every thread's stack (the driver sends it to a round that hangs).
"""

from __future__ import annotations

import concurrent.futures as cf
import faulthandler
import gc
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]  # tests/: tasks.stress, importable by every child too

import numpy as np  # noqa: E402
import psutil  # noqa: E402

import parallelkit as pk  # noqa: E402
import tasks.stress as w  # noqa: E402
from parallelkit.testing import check_no_leaks  # noqa: E402

RESULT_WAIT: Final = 120.0  # seconds: a future's result or a child's reply (hangs: the driver)
LEAK_GRACE: Final = 10.0  # seconds for workers to exit and segments to go after a round


class Round:
    """The seeded choices of one round, recorded as they are made."""

    def __init__(self, scenario: str, method: str, seed: int) -> None:
        self.scenario = scenario
        self.method: Any = method
        self.seed = seed
        self.rng = random.Random(f"{scenario}|{method}|{seed}")
        self.params: dict[str, object] = {}

    def pick(self, name: str, choices: Sequence[Any]) -> Any:
        value = self.rng.choice(choices)
        self.params[name] = value
        return value

    def between(self, name: str, low: int, high: int) -> int:
        value = self.rng.randint(low, high)
        self.params[name] = value
        return value

    def chance(self, name: str, p: float) -> bool:
        value = self.rng.random() < p
        self.params[name] = value
        return value

    def show(self) -> None:
        print("params", json.dumps(self.params, default=repr), flush=True)


# ------------------------------------------------------------------------------ checking


def same(got: object, want: object) -> bool:
    """Exact equality that also compares numpy arrays (dtype, shape and every element)."""
    if isinstance(want, np.ndarray) or isinstance(got, np.ndarray):
        return (
            isinstance(got, np.ndarray)
            and isinstance(want, np.ndarray)
            and got.dtype == want.dtype
            and got.shape == want.shape
            and bool(np.array_equal(got, want))
        )
    if isinstance(want, tuple | list):
        return (
            type(got) is type(want)
            and len(got) == len(want)
            and all(same(g, x) for g, x in zip(got, want, strict=False))
        )
    return type(got) is type(want) and got == want


def expect_same(got: object, want: object, what: str) -> None:
    if not same(got, want):
        raise AssertionError(f"{what}: got {_short(got)}, expected {_short(want)}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) < 300 else text[:300] + f"... ({len(text)} characters)"


def expected_of(item: tuple[int, object]) -> tuple[int, object] | BaseException:
    """What :func:`tasks.stress.tagged` gives for ``item``: its result or its exception."""
    try:
        return w.tagged(item)
    except w.StressTaskError as exc:
        return exc


# ------------------------------------------------------------------------------ payloads


def make_items(r: Round, *, allow_fail: bool = True) -> list[tuple[int, object]]:
    """``(index, payload)`` pairs: small values, large arrays, or views of an image."""
    kind = r.pick("payload", ["small", "small", "large", "views", "mixed"])
    rng = np.random.default_rng(r.seed)
    payloads: list[object] = []
    if kind in ("small", "mixed"):
        n = r.between("small_items", 0, 1500)
        for i in range(n):
            payloads.append([i, f"s{i}", bytes([i % 256]) * (i % 40), (i, -i)][i % 4])
    if kind in ("large", "mixed"):
        for i in range(r.between("large_items", 1, 8)):
            megabytes = r.pick(f"large_{i}_mb", [1, 2, 4, 6])
            if i % 3 == 2:
                payloads.append(rng.bytes(megabytes << 20))
            else:
                payloads.append(rng.random(megabytes << 17))  # float64: 8 bytes each
    if kind in ("views", "mixed"):
        side = r.pick("image_side", [600, 1200, 2000])
        tiles = r.pick("tiles", [2, 4, 8])
        image = rng.random((side, side))
        step = side // tiles
        for i in range(tiles):
            for j in range(tiles):
                view = image[i * step : (i + 1) * step, j * step : (j + 1) * step]
                payloads.append(("view", view) if (i + j) % 2 else view)
    items = list(enumerate(payloads))
    if allow_fail and items and r.chance("some_fail", 0.2):
        for index in r.rng.sample(range(len(items)), k=min(len(items), 3)):
            items[index] = (index, ("fail", index))
    return items


def recycle_choices(r: Round) -> list[int | None]:
    """``max_tasks_per_worker`` values: small ones only where starting a worker is cheap
    (every retired worker is replaced; under spawn each replacement is an interpreter)."""
    return {"fork": [None, None, 1, 4, 50], "forkserver": [None, None, 10, 50]}.get(
        r.method, [None, None, 100]
    )


# ------------------------------------------------------------------------------ killing


def helper_pids() -> set[int]:
    """multiprocessing's resource tracker and forkserver: not workers."""
    from multiprocessing import forkserver, resource_tracker

    pids = {
        getattr(resource_tracker._resource_tracker, "_pid", None),
        getattr(forkserver._forkserver, "_forkserver_pid", None),
    }
    return {pid for pid in pids if isinstance(pid, int)}


HELPER_MAINS: Final = ("multiprocessing.forkserver import main", "resource_tracker import main")


def worker_pids(exclude: set[int] | None = None) -> list[int]:
    """The running descendants of this process, helpers (and ``exclude``) left out.

    A helper (a child of ours) is known by its command line too: multiprocessing records
    its pid only once it has started.  (The forkserver's children, workers, share its
    command line.)
    """
    skip = helper_pids() | (exclude or set())
    me = os.getpid()
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in skip or child.status() == psutil.STATUS_ZOMBIE:
                continue
            helper = child.ppid() == me and any(
                main in " ".join(child.cmdline()) for main in HELPER_MAINS
            )
        except psutil.Error:  # gone meanwhile
            continue
        if not helper:
            found.append(child.pid)
    return sorted(found)


def wait_gone(pid: int) -> None:
    """Until ``pid`` is no longer a running process (exited, perhaps not reaped yet)."""
    deadline = time.monotonic() + RESULT_WAIT
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} still runs {RESULT_WAIT} s after SIGKILL")


class Killer:
    """SIGKILLs one worker (a random descendant) at a random moment, unless told to stop
    first; ``killed`` is its pid, or ``None``."""

    def __init__(self, r: Round, *, within: float, exclude: set[int] | None = None) -> None:
        self.delay = r.rng.random() * within
        self.choice = r.rng.random()
        self.exclude = exclude
        self.killed: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stress-killer")
        self._thread.start()

    def _run(self) -> None:
        if self._stop.wait(self.delay):
            return
        while not self._stop.is_set():
            pids = worker_pids(self.exclude)
            if pids:
                pid = pids[int(self.choice * len(pids))]
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.killed = pid
                print(f"killed worker {pid} after {self.delay:.3f} s", flush=True)
                return
            self._stop.wait(0.002)  # no worker yet: the pool is still starting them

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join(RESULT_WAIT)
        return self.killed


def is_our_crash(exc: BaseException, killer: Killer | None) -> bool:
    """``exc`` is the WorkerCrashedError that the killer's SIGKILL must give."""
    if killer is None or killer.killed is None:
        return False
    cause = exc.__cause__ if isinstance(exc, pk.PipelineError) else exc
    return (
        isinstance(cause, pk.WorkerCrashedError)
        and cause.pid == killer.killed
        and cause.signal == "SIGKILL"
    )


# ------------------------------------------------------------------------------ maps


def check_results(
    got: list[object],
    items: list[tuple[int, object]],
    *,
    ordered: bool,
    complete: bool,
    killer: Killer | None = None,
) -> None:
    """Each result is its item's (or, with ``return_exceptions``, its exception).

    ``ordered``: result k belongs to item k; otherwise results carry their item's index.
    ``complete``: every item has its result (else a prefix, for ordered, or a subset).
    """
    if complete and len(got) != len(items):
        raise AssertionError(f"{len(got)} results for {len(items)} items")
    seen: set[int] = set()
    for position, result in enumerate(got):
        if isinstance(result, BaseException):
            if is_our_crash(result, killer):
                index = getattr(result, "item_index", None)
                if ordered and index != position:
                    raise AssertionError(f"crash of item {index} in slot {position}")
                if index is None:
                    raise AssertionError(f"crash without an item index: {result!r}")
                seen.add(index)
                continue
            if not isinstance(result, w.StressTaskError):
                raise AssertionError(f"slot {position}: unexpected {result!r}") from result
            index = int(str(result).split()[1])
        else:
            index = result[0]  # type: ignore[index]  # a (index, value) pair
        if ordered and index != position:
            raise AssertionError(f"slot {position} holds the result of item {index}")
        if index in seen:
            raise AssertionError(f"item {index} has two results")
        seen.add(index)
        want = expected_of(items[index])
        if isinstance(want, BaseException):
            if not isinstance(result, w.StressTaskError) or str(result) != str(want):
                raise AssertionError(f"item {index}: got {_short(result)}, expected {want!r}")
        else:
            expect_same(result, want, f"item {index}")


def scenario_map(r: Round, *, kill: bool = False) -> None:
    """run_parallel, imap_parallel, WorkerPool.map and .imap over every payload kind."""
    api = r.pick("api", ["run_parallel", "imap_parallel", "pool.map", "pool.imap"])
    workers = r.pick("workers", [1, 2, 2, 3])
    chunksize = r.pick("chunksize", [None, None, 1, 2, 5, 16])
    ordered = api == "pool.map" or r.pick("ordered", [True, False])
    return_exceptions = api != "pool.map" and r.pick("return_exceptions", [False, True])
    repeat = r.between("repeat", 1, 3)
    keep = r.pick("results", ["kept", "dropped"])
    kill_window = r.pick("kill_within_s", [0.05, 0.3, 1.0]) if kill else 0.0
    items = make_items(r)
    r.show()
    failing = {i for i, payload in items if isinstance(expected_of((i, payload)), BaseException)}
    recycle = r.pick("max_tasks_per_worker", recycle_choices(r))
    pool = (
        pk.WorkerPool(workers, start_method=r.method, max_tasks_per_worker=recycle)
        if api.startswith("pool")
        else None
    )
    try:
        for _ in range(repeat):
            killer = Killer(r, within=kill_window) if kill else None
            options: dict[str, Any] = {"chunksize": chunksize}
            got: list[object] = []
            try:
                if api == "run_parallel":
                    got = pk.run_parallel(
                        w.tagged,
                        items,
                        max_workers=workers,
                        start_method=r.method,
                        ordered=ordered,
                        return_exceptions=return_exceptions,
                        **options,
                    )
                else:
                    if api == "imap_parallel":
                        iterator: Iterator[object] = pk.imap_parallel(
                            w.tagged,
                            iter(items),
                            max_workers=workers,
                            start_method=r.method,
                            ordered=ordered,
                            return_exceptions=return_exceptions,
                            **options,
                        )
                    elif api == "pool.map":
                        assert pool is not None
                        iterator = pool.map(w.tagged, items, **options)
                    else:
                        assert pool is not None
                        iterator = pool.imap(
                            w.tagged,
                            items,
                            ordered=ordered,
                            return_exceptions=return_exceptions,
                            **options,
                        )
                    for result in iterator:
                        if keep == "kept":
                            got.append(result)
                        else:  # check it and let it go at once
                            check_results(
                                [result], items, ordered=False, complete=False, killer=killer
                            )
                            got.append(None)
                    del iterator
            except w.StressTaskError as exc:
                if return_exceptions or not failing:
                    raise
                if int(str(exc).split()[1]) not in failing:
                    raise AssertionError(f"raised for the wrong item: {exc}") from exc
                if keep == "kept":
                    check_results(got, items, ordered=ordered, complete=False, killer=killer)
                continue
            except pk.WorkerCrashedError as exc:
                if killer is not None:
                    killer.stop()
                if not is_our_crash(exc, killer):
                    raise
                continue
            finally:
                if killer is not None:
                    killer.stop()
            if failing and not return_exceptions and (killer is None or killer.killed is None):
                raise AssertionError(f"items {sorted(failing)} fail, yet nothing was raised")
            if keep == "kept":
                check_results(got, items, ordered=ordered, complete=True, killer=killer)
            elif len(got) != len(items):
                raise AssertionError(f"{len(got)} results for {len(items)} items")
        if pool is not None:  # the pool still works, whatever happened to its workers
            small = [(i, i) for i in range(50)]
            expect_same(list(pool.map(w.tagged, small)), [w.tagged(x) for x in small], "after")
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def scenario_map_kill(r: Round) -> None:
    """As scenario_map, with one worker SIGKILLed at a random moment of each call."""
    scenario_map(r, kill=True)


def endless(items: list[tuple[int, object]]) -> Iterator[tuple[int, object]]:
    """The items, then more small ones for ever (the consumer closes the iterator)."""
    yield from items
    i = len(items)
    while True:
        yield (i, i)
        i += 1


def scenario_imap_close(r: Round) -> None:
    """imap over a finite or endless input, closed early in several ways; two iterators
    open at once on one pool; the pool works afterwards."""
    api = r.pick("api", ["imap_parallel", "pool.imap"])
    workers = r.pick("workers", [1, 2, 3])
    chunksize = r.pick("chunksize", [None, 1, 3, 10])
    ordered = r.pick("ordered", [True, False])
    how = r.pick("close", ["close", "del", "with", "exhaust_one"])
    take = r.between("take", 0, 30)
    source = r.pick("source", ["finite", "endless"])
    items = make_items(r, allow_fail=False)
    r.show()
    extended = items + [(i, i) for i in range(len(items), len(items) + take + 1000)]

    def values() -> Iterator[tuple[int, object]]:
        return endless(items) if source == "endless" else iter(items)

    def open_one(pool: pk.WorkerPool | None) -> Any:
        if pool is None:
            return pk.imap_parallel(
                w.tagged,
                values(),
                max_workers=workers,
                start_method=r.method,
                chunksize=chunksize,
                ordered=ordered,
            )
        return pool.imap(w.tagged, values(), chunksize=chunksize, ordered=ordered)

    handed: dict[int, int] = {}  # id(iterator) -> results it gave so far

    def consume(iterator: Any, n: int) -> None:
        for _ in range(n):
            k = handed.get(id(iterator), 0)
            try:
                result = next(iterator)
            except StopIteration:
                if source == "endless" or k < len(items):
                    raise AssertionError(f"ended after {k} results") from None
                return
            handed[id(iterator)] = k + 1
            index = result[0] if not ordered else k
            if ordered and result[0] != k:
                raise AssertionError(f"result {k} is of item {result[0]}")
            expect_same(result, w.tagged(extended[index]), f"item {index}")

    pool = pk.WorkerPool(workers, start_method=r.method) if api == "pool.imap" else None
    try:
        first = open_one(pool)
        second = open_one(pool) if pool is not None and r.chance("two_open", 0.5) else None
        consume(first, take)
        if second is not None:
            consume(second, take // 2)
        if how == "close":
            first.close()
        elif how == "del":
            del first
            gc.collect()
        elif how == "with":
            with first:
                consume(first, 1)
        else:  # a finite input, consumed to the end
            if source == "finite":
                consume(first, len(items) + 1)
                if handed.get(id(first), 0) != len(items):
                    raise AssertionError(f"{handed.get(id(first))} results of {len(items)}")
            first.close()
        if second is not None:
            consume(second, 3 if source == "endless" else 0)
            second.close()
        if pool is not None:
            small = [(i, i) for i in range(40)]
            expect_same(list(pool.map(w.tagged, small)), [w.tagged(x) for x in small], "after")
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


# ------------------------------------------------------------------------------ pools


def scenario_submit_storm(r: Round) -> None:
    """Threads submitting to one WorkerPool at once (and running maps on it); futures kept,
    dropped or cancelled (a scheduled one even as it runs: its worker is stopped); workers
    retired after a few tasks, sometimes."""
    workers = r.pick("workers", [1, 2, 3])
    threads = r.pick("threads", [1, 2, 4])
    per_thread = r.between("per_thread", 10, 150)
    large = r.chance("large", 0.3)
    cancel_futures = r.chance("shutdown_cancel_futures", 0.3)
    recycle = r.pick("max_tasks_per_worker", recycle_choices(r))
    maps = r.pick("share_of_maps", [0.0, 0.05])
    scheduled = r.pick("share_of_schedule", [0.0, 0.3])  # schedule(): cancel() stops it
    seeds = [r.rng.random() for _ in range(threads)]
    r.show()
    errors: list[BaseException] = []
    kept: list[tuple[tuple[int, object], cf.Future[Any], bool]] = []
    lock = threading.Lock()
    pool = pk.WorkerPool(workers, start_method=r.method, max_tasks_per_worker=recycle)

    def storm(t: int) -> None:
        rng = random.Random(seeds[t])
        try:
            for k in range(per_thread):
                index = t * per_thread + k
                payload: object = index
                if large and rng.random() < 0.1:
                    payload = np.full(rng.choice([1, 3]) << 17, float(index))
                elif rng.random() < 0.05:
                    payload = ("fail", index)
                item = (index, payload)
                if rng.random() < maps:  # a whole map from this thread, among the submits
                    batch = [(index, i) for i in range(rng.randint(0, 30))]
                    if rng.random() < 0.5:
                        got = list(pool.map(w.tagged, batch, chunksize=rng.choice([1, 4])))
                    else:
                        got = list(pool.imap(w.tagged, batch, ordered=False))
                        got.sort()
                    expect_same(got, [w.tagged(x) for x in batch], f"map in thread {t}")
                    continue
                future: cf.Future[Any]
                if rng.random() < scheduled:  # a cancel may stop it running
                    future = pool.schedule(w.tagged, args=(item,), timeout=RESULT_WAIT)
                else:
                    future = pool.submit(w.tagged, item)
                what = rng.random()
                if what < 0.4:  # dropped: nobody looks at it
                    del future
                    continue
                cancelled = what < 0.5 and future.cancel()
                with lock:
                    kept.append((item, future, cancelled))
        except BaseException as exc:
            errors.append(exc)

    try:
        pool_threads = [threading.Thread(target=storm, args=(t,)) for t in range(threads)]
        for thread in pool_threads:
            thread.start()
        for thread in pool_threads:
            thread.join(RESULT_WAIT)
        if errors:
            raise errors[0]
        if cancel_futures:
            pool.shutdown(wait=True, cancel_futures=True)
        for item, future, cancelled in kept:
            if cancelled or (cancel_futures and future.cancelled()):
                if not future.cancelled():
                    raise AssertionError(f"item {item[0]}: cancel() said yes, yet it ran")
                continue
            want = expected_of(item)
            if isinstance(want, BaseException):
                exc = future.exception(timeout=RESULT_WAIT)
                if not isinstance(exc, w.StressTaskError) or str(exc) != str(want):
                    raise AssertionError(f"item {item[0]}: got {exc!r}, expected {want!r}")
            else:
                expect_same(future.result(timeout=RESULT_WAIT), want, f"item {item[0]}")
        if not cancel_futures:
            small = [(i, i) for i in range(40)]
            expect_same(list(pool.map(w.tagged, small)), [w.tagged(x) for x in small], "after")
    finally:
        pool.shutdown(wait=True)


def scenario_map_timeout(r: Round) -> None:
    """Per-item timeouts: the late items (and only they) fail with TaskTimeoutError, their
    workers are replaced, every other item is exact; a pool works afterwards."""
    api = r.pick("api", ["run_parallel", "imap_parallel", "pool.imap"])
    workers = r.pick("workers", [1, 2, 3])
    chunksize = r.pick("chunksize", [None, 1, 4])
    ordered = r.pick("ordered", [True, False])
    n = r.between("items", 1, 60)
    late = set(r.rng.sample(range(n), k=min(n, r.pick("late", [1, 1, 2]))))
    r.params["late_items"] = sorted(late)
    r.show()
    timeout = 2.0  # seconds: far beyond an on-time item, far below a late one
    items = [(i, 600.0 if i in late else 0.0) for i in range(n)]
    pool = pk.WorkerPool(workers, start_method=r.method) if api == "pool.imap" else None
    options: dict[str, Any] = {
        "chunksize": chunksize,
        "ordered": ordered,
        "timeout": timeout,
        "return_exceptions": True,
    }
    try:
        if api == "run_parallel":
            got: list[object] = pk.run_parallel(
                w.nap, items, max_workers=workers, start_method=r.method, **options
            )
        elif api == "imap_parallel":
            got = list(
                pk.imap_parallel(
                    w.nap, items, max_workers=workers, start_method=r.method, **options
                )
            )
        else:
            assert pool is not None
            got = list(pool.imap(w.nap, items, **options))
        if len(got) != n:
            raise AssertionError(f"{len(got)} results for {n} items")
        seen: set[int] = set()
        for position, result in enumerate(got):
            if isinstance(result, pk.TaskTimeoutError):
                index = result.item_index
                if index not in late:
                    raise AssertionError(f"item {index} timed out, yet it does not sleep")
                if result.timeout != timeout:
                    raise AssertionError(f"timeout {result.timeout}, expected {timeout}")
            elif isinstance(result, int):
                index = result
                if index in late:
                    raise AssertionError(f"late item {index} returned a result")
            else:
                raise AssertionError(f"slot {position}: unexpected {result!r}")
            if ordered and index != position:
                raise AssertionError(f"slot {position} holds item {index}")
            if index is None or index in seen:
                raise AssertionError(f"slot {position}: item {index} twice or unnamed")
            seen.add(index)
        if pool is not None:
            small = [(i, i) for i in range(30)]
            expect_same(list(pool.map(w.tagged, small)), [w.tagged(x) for x in small], "after")
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def scenario_pool_big(r: Round) -> None:
    """Large functions and results through a WorkerPool (issue 17 §2): a bound method of
    a large object, a large argument, large results of a map left after the first."""
    workers = r.pick("workers", [1, 2])
    size = r.pick("megabytes", [1, 5, 20]) << 20
    r.show()
    with pk.WorkerPool(max_workers=workers, start_method=r.method) as pool:
        holder = w.Holder(size)
        expect_same(pool.submit(holder.size_plus).result(RESULT_WAIT), size, "bound method")
        expect_same(pool.submit(w.holder_size, w.Holder(size)).result(RESULT_WAIT), size, "arg")
        made = pool.submit(w.make_holder, size).result(RESULT_WAIT)
        expect_same(len(made.payload), size, "result")
        for obj in pool.map(w.make_holder, [size] * 6):
            expect_same(len(obj.payload), size, "first of a map")
            break
        other = w.Holder(size)
        expect_same(list(pool.imap(other.size_plus, range(10))), [size + i for i in range(10)], "")


def scenario_idle_death(r: Round) -> None:
    """An idle worker SIGKILLed between two maps (issue 23 §1): the next map is exact."""
    workers = r.pick("workers", [1, 2, 3])
    rounds = r.between("kills", 1, 3)
    small = [(i, i) for i in range(r.pick("items", [1, 2, 4, 10, 200]))]
    r.show()
    want = [w.tagged(x) for x in small]
    with pk.WorkerPool(workers, start_method=r.method) as pool:
        expect_same(list(pool.map(w.tagged, small)), want, "before")
        for k in range(rounds):
            pids = worker_pids()
            if not pids:
                raise AssertionError("no worker found after a map")
            victim = pids[r.rng.randrange(len(pids))]
            os.kill(victim, signal.SIGKILL)
            wait_gone(victim)
            expect_same(list(pool.map(w.tagged, small)), want, f"after kill {k}")


def scenario_leakcheck_pool(r: Round) -> None:
    """A leak-checked block around a WorkerPool (and a thread pool) created before it
    (issue 23 §2): no leak reported, nothing killed; both work after the block."""
    workers = r.pick("workers", [1, 2])
    warm = r.chance("used_before", 0.5)
    threads = r.chance("thread_pool_too", 0.5)
    r.show()
    small = [(i, i) for i in range(60)]
    want = [w.tagged(x) for x in small]
    with pk.WorkerPool(workers, start_method=r.method) as pool:
        executor = cf.ThreadPoolExecutor(2) if threads else None
        try:
            if warm:
                expect_same(list(pool.map(w.tagged, small)), want, "before the block")
            with check_no_leaks(kill=True, grace=2.0):
                expect_same(list(pool.map(w.tagged, small)), want, "in the block")
                if executor is not None:
                    expect_same(list(executor.map(w.tagged, small)), want, "threads")
            expect_same(list(pool.map(w.tagged, small)), want, "after the block")
        finally:
            if executor is not None:
                executor.shutdown(wait=True)


# ------------------------------------------------------------------------------ pipelines


def expected_pipeline(items: list[tuple[int, object]]) -> list[object]:
    """What the pipeline of :func:`scenario_pipeline` gives, computed in this process."""
    out: list[object] = []
    for item in items:
        mapped = w.tagged(item)
        if w.keep(mapped):
            out.extend(w.split(mapped))
    return out


def scenario_pipeline(r: Round) -> None:
    """map -> filter -> flat_map over every payload kind; run() or a consumer that stops
    early; ordered or not; with a worker SIGKILLed sometimes."""
    maxsize = r.pick("maxsize", [None, 1, 4, 32])
    workers = [r.pick(f"workers_{s}", [1, 2, 3]) for s in range(3)]
    ordered = r.pick("ordered", [True, False])
    consumer = r.pick("consumer", ["run", "iterate", "stop_early"])
    stop_after = r.between("stop_after", 0, 20)
    kill = r.chance("kill", 0.25)
    kill_window = r.pick("kill_within_s", [0.05, 0.3, 1.0]) if kill else 0.0
    items = make_items(r)
    r.show()
    failing = any(isinstance(expected_of(item), BaseException) for item in items)
    want = [] if failing else expected_pipeline(items)
    pipeline = (
        pk.Pipeline(iter(items), start_method=r.method, maxsize=maxsize)
        .map(w.tagged, max_workers=workers[0], ordered=ordered, name="tagged")
        .filter(w.keep, max_workers=workers[1])
        .flat_map(w.split, max_workers=workers[2])
    )
    killer = Killer(r, within=kill_window) if kill else None
    got: list[Any] = []
    try:
        if consumer == "run":
            got = pipeline.run()
        else:
            iterator = iter(pipeline)
            for result in iterator:
                got.append(result)
                if consumer == "stop_early" and len(got) >= stop_after:
                    break
            iterator.close()
    except pk.PipelineError as exc:
        if killer is not None:
            killer.stop()
        if is_our_crash(exc, killer):
            return
        if failing and isinstance(exc.__cause__, w.StressTaskError) and exc.stage == "tagged":
            return
        raise
    finally:
        if killer is not None:
            killer.stop()
    if failing and not (consumer == "stop_early" and len(got) >= stop_after):
        raise AssertionError("an item fails in stage 'tagged', yet nothing was raised")
    if failing:
        return  # stopped before the failing item came out
    if consumer == "stop_early":
        if len(got) != min(stop_after, len(want)) and not (stop_after == 0 and len(got) == 1):
            raise AssertionError(f"stopped with {len(got)} results, asked for {stop_after}")
        if ordered:
            expect_same(got, want[: len(got)], "first results")
        else:
            keys = Counter(w.key_of(x) for x in want)
            for one in got:
                if keys[w.key_of(one)] <= 0:
                    raise AssertionError(f"unexpected result {_short(one)}")
                keys[w.key_of(one)] -= 1
        return
    if ordered:
        expect_same(got, want, "results")
    else:
        expect_same(sorted(got, key=w.key_of), sorted(want, key=w.key_of), "results (sorted)")


# ------------------------------------------------------------------------------ queues


def scenario_queue(r: Round) -> None:
    """Several producer and consumer processes on one Queue; some consumers stop early.
    Every item put reaches exactly one consumer or stays in the queue (drained at the end);
    a consumer sees each producer's items in the order they were put."""
    producers = r.between("producers", 1, 3)
    consumers = r.between("consumers", 1, 3)
    maxsize = r.pick("maxsize", [0, 0, 8, 100])
    blob = r.pick("blob_bytes", [0, 0, 100, 100_000])
    plans = [
        [r.rng.choice([1, 1, 5, 50, 2000]) for _ in range(r.rng.randint(1, 20))]
        for _ in range(producers)
    ]
    if maxsize:  # a put_many of more than maxsize items cannot fit
        plans = [[min(size, maxsize) for size in plan] for plan in plans]
    limits = [r.rng.choice([-1, -1, 0, 1, 7, 500]) for _ in range(consumers)]
    batches = [r.rng.choice([1, 1, 10, 1000]) for _ in range(consumers)]
    r.params.update(plans=plans, limits=limits, batches=batches)
    r.show()
    q: pk.Queue[Any] = pk.Queue(maxsize, producers=producers, start_method=r.method)
    started: list[Any] = []
    try:
        for c in range(consumers):
            started.append(
                pk.start_process(w.consume, q, limits[c], batches[c], start_method=r.method)
            )
        for p in range(producers):
            started.append(pk.start_process(w.produce, q, p, plans[p], blob, start_method=r.method))
        taken = [started[c].recv(timeout=RESULT_WAIT) for c in range(consumers)]
        rest = list(q)  # the parent drains what the consumers left; ends after all closed
        sent = [started[consumers + p].recv(timeout=RESULT_WAIT) for p in range(producers)]
    finally:
        for child in started:
            child.close()
    for p, count_sent in enumerate(sent):
        if count_sent != sum(plans[p]):
            raise AssertionError(f"producer {p} sent {count_sent}, planned {sum(plans[p])}")
    for c, got in enumerate(taken):
        if limits[c] >= 0 and len(got) > limits[c]:
            raise AssertionError(f"consumer {c} took {len(got)} items, limit {limits[c]}")
        last: dict[int, int] = {}
        for item in got:
            p, i = item[0], item[1]
            if last.get(p, -1) >= i:
                raise AssertionError(f"consumer {c}: item {i} of producer {p} after {last[p]}")
            last[p] = i
            if blob and item[2] != w.blob_of(i, blob):
                raise AssertionError(f"consumer {c}: item {(p, i)} has the wrong payload")
    everything = [item[:2] for got in taken for item in got] + [item[:2] for item in rest]
    expected = [(p, i) for p in range(producers) for i in range(sum(plans[p]))]
    counts = Counter(everything)
    duplicated = [key for key, n in counts.items() if n > 1]
    missing = [key for key in expected if key not in counts]
    if duplicated or missing or len(counts) != len(expected):
        raise AssertionError(
            f"{len(missing)} items lost (first {missing[:5]}), {len(duplicated)} duplicated "
            f"(first {duplicated[:5]}); consumers took {[len(t) for t in taken]}, "
            f"{len(rest)} left in the queue"
        )


# ------------------------------------------------------------------------------ channels


def scenario_channel(r: Round) -> None:
    """Several threads sending requests on one channel to a serving process, some with
    timeouts that expire: every reply that arrives answers its own request."""
    threads = r.pick("threads", [1, 2, 4])
    per_thread = r.between("requests", 5, 60)
    large = r.chance("large", 0.3)
    seeds = [r.rng.random() for _ in range(threads)]
    r.show()
    errors: list[BaseException] = []
    outcomes = Counter[str]()
    lock = threading.Lock()
    with pk.start_process(w.serve, start_method=r.method) as server:

        def client(t: int) -> None:
            rng = random.Random(seeds[t])
            try:
                for k in range(per_thread):
                    ident = t * 1_000_000 + k
                    payload: object = ident
                    if large and rng.random() < 0.2:
                        payload = np.full(rng.choice([1, 4]) << 17, float(k))
                    delay = rng.choice([0, 0, 1, 5, 20])
                    timeout = rng.choice([None, None, 0.002, 0.01, 0.05, 1.0])
                    try:
                        reply = server.request((ident, delay, payload), timeout=timeout)
                    except TimeoutError:
                        if timeout is None:
                            raise
                        with lock:
                            outcomes["timed out"] += 1
                        continue
                    expect_same(reply, (ident, w.transform(payload)), f"reply to {ident}")
                    with lock:
                        outcomes["answered"] += 1
            except BaseException as exc:
                errors.append(exc)

        clients = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(RESULT_WAIT)
        if errors:
            raise errors[0]
        # the channel still works for a request without a timeout
        expect_same(server.request((-1, 0, 5), timeout=None), (-1, 26), "last reply")
    print("outcomes", dict(outcomes), flush=True)


# ------------------------------------------------------------------------------ shared


def scenario_shared(r: Round) -> None:
    """SharedCounter, SharedAccumulator and SharedArray written by workers and by threads
    of this process at once: every add counted, every row written."""
    workers = r.pick("workers", [1, 2, 3])
    tasks = r.between("tasks", 1, 40)
    per_task = r.between("adds_per_task", 1, 3000)
    local_threads = r.pick("local_threads", [1, 2, 4])  # they share this process's slot
    chunksize = r.pick("chunksize", [None, 1, 4])
    rows = r.between("rows", 1, 300)
    r.show()
    values = [
        [r.rng.randint(-1000, 1000) for _ in range(r.rng.randint(0, 50))] for _ in range(tasks)
    ]
    with (
        pk.SharedCounter() as counter,
        pk.SharedCounter() as by_value,
        pk.SharedAccumulator("sum", dtype=int) as total,
        pk.SharedAccumulator("max", dtype=float) as largest,
        pk.SharedArray.zeros((rows, 64)) as shared,
    ):
        local = [
            threading.Thread(target=w.count, args=((counter, per_task),))
            for _ in range(local_threads)
        ]
        for t in local:
            t.start()
        done = pk.run_parallel(
            w.count,
            [(counter, per_task)] * tasks,
            max_workers=workers,
            start_method=r.method,
            chunksize=chunksize,
        )
        for t in local:
            t.join(RESULT_WAIT)
        expect_same(done, [per_task] * tasks, "counts")
        expect_same(counter.value, per_task * (tasks + local_threads), "counter")
        lengths = pk.run_parallel(
            w.accumulate,
            [(total, largest, by_value, v) for v in values],
            max_workers=workers,
            start_method=r.method,
        )
        expect_same(lengths, [len(v) for v in values], "lengths")
        flat = [x for v in values for x in v]
        expect_same(total.value, sum(flat), "sum")
        expect_same(by_value.value, sum(flat), "counter by value")
        if flat:
            expect_same(largest.value, max(flat) / 2, "max")
        step = max(1, rows // (workers * 2))
        spans = [(shared, s, min(rows, s + step), 0.5) for s in range(0, rows, step)]
        expect_same(
            sum(pk.run_parallel(w.write_rows, spans, max_workers=workers, start_method=r.method)),
            rows,
            "rows written",
        )
        want = np.repeat((np.arange(rows) * 0.5)[:, None], 64, axis=1)
        expect_same(shared.array.copy(), want, "shared array")


SCENARIOS: Final[dict[str, Callable[[Round], None]]] = {
    "map": scenario_map,
    "map_kill": scenario_map_kill,
    "map_timeout": scenario_map_timeout,
    "imap_close": scenario_imap_close,
    "submit_storm": scenario_submit_storm,
    "pool_big": scenario_pool_big,
    "idle_death": scenario_idle_death,
    "leakcheck_pool": scenario_leakcheck_pool,
    "pipeline": scenario_pipeline,
    "queue": scenario_queue,
    "channel": scenario_channel,
    "shared": scenario_shared,
}


def main(argv: list[str]) -> int:
    scenario, method, seed = argv[1], argv[2], int(argv[3])
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if os.getpgrp() != os.getpid():  # run by hand: Ctrl-C rounds signal our group only
        os.setpgid(0, 0)
    r = Round(scenario, method, seed)
    print(f"round {scenario} {method} {seed} fuzz={os.environ.get('PARALLELKIT_FUZZ')}")
    with check_no_leaks(grace=LEAK_GRACE):
        SCENARIOS[scenario](r)
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
