"""The parallel-map comparison: its workloads, its contenders, and one run of them.

Run by ``python -m benchmarks`` (``bench_map.py``: full sizes, ``--quick`` for smaller ones,
JSON lines, README tables).  Workloads:

* ``tiny``: many items of ``x*x`` -- nothing but per-item overhead;
* ``cpu``: pure-Python tasks of ~0.1 s -- speed-up over serial and efficiency;
* ``arrays``: 8 MB float64 arrays as arguments, ``float(a.sum())`` back -- how each library
  moves large buffers; the reference is data already in one ``SharedMemory`` segment;
* ``arrays-results``: a small argument in, an 8 MB array back;
* ``tiles``: 2 MB tiles cut from a larger image (views: not contiguous), from a generator and
  from a list, ordered and not, each result placed into an output array by the caller;
  ``tiles-rows``: the same with contiguous bands of rows;
* ``membound``: an 8 MB array in, ``1.5 a + a`` back -- memory-bound numpy, where moving
  the arrays costs more than the work, so serial beats every process pool;
* ``startup-W``: start W workers, each runs one trivial task, shut down -- against W bare
  ``multiprocessing.Process``es; ``startup-W-heavy`` (spawn) does it while ``__main__``
  imports numpy, which spawn children import again.

The array workloads need numpy and are skipped, with a line saying so, without it.  Peers
(mpire, joblib, loky, pebble) join when importable.  Only the standard library is imported
at the top of this module.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import math
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from . import harness as h
from .settings import PEERS, Settings, usable_cpus
from .tasks import array_sum, burn, make_array, run_one, scale_add, shm_sum, square, tile_scale

if TYPE_CHECKING:
    from parallelkit import StartMethod


@dataclass
class Workload:
    """One workload, ready to run: what to map, who maps it, how results are checked."""

    key: str
    title: str
    fn: Callable[[Any], Any]
    items: Sequence[Any]
    contenders: list[h.Contender[Any]]
    check: h.Check
    ideal_speedup: int | None = None  # adds speed-up and efficiency columns
    baseline: str | None = None  # adds an "x <baseline>" column
    workers: int | None = None  # when not the run's
    around: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext


@dataclass
class Report:
    """A run's results: the ``meta`` record, JSON lines, and a markdown table a workload."""

    meta: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # key, title, table


# ------------------------------------------------------------------ contenders


def batched_chunksize(n: int, workers: int) -> int:
    """What ``Pool.map`` picks by default, ceil(n / (4 * workers)); given to PPE and peers.

    ``ProcessPoolExecutor.map`` defaults to ``chunksize=1``: one message per item, ~100x
    slower on tiny items, which measures nobody's engine.  We give it Pool's default rule.
    """
    return max(1, math.ceil(n / (4 * workers)))


def stdlib_contenders(
    sm: str, workers: int, chunksize: int, *, pool_chunksize_1: bool = False
) -> list[h.Contender[Any]]:
    """``Pool.map`` (default chunking; also ``chunksize=1`` if asked) and ``PPE.map``."""
    ctx = multiprocessing.get_context(sm)

    def pool_open() -> Any:
        return ctx.Pool(workers)

    def pool_map(pool: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(pool.map(fn, items))

    def pool_map_1(pool: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(pool.map(fn, items, chunksize=1))

    def pool_close(pool: Any) -> None:
        pool.close()  # graceful, like every other contender (Pool.__exit__ terminates)
        pool.join()

    def ppe_open() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=ctx)

    def ppe_map(
        ex: ProcessPoolExecutor, fn: Callable[[Any], Any], items: Sequence[Any]
    ) -> list[Any]:
        return list(ex.map(fn, items, chunksize=chunksize))

    def ppe_close(ex: ProcessPoolExecutor) -> None:
        ex.shutdown(wait=True)

    out = [
        h.Contender(
            "Pool.map",
            "stdlib",
            "multiprocessing.Pool.map, default chunksize; close()+join()",
            pool_open,
            pool_map,
            pool_close,
            start_method=sm,
        )
    ]
    if pool_chunksize_1:
        out.append(
            h.Contender(
                "Pool.map(chunksize=1)",
                "stdlib",
                "multiprocessing.Pool.map(chunksize=1); close()+join()",
                pool_open,
                pool_map_1,
                pool_close,
                start_method=sm,
            )
        )
    why = "" if chunksize == 1 else " (Pool's rule; PPE's own default of 1 is ~100x slower)"
    out.append(
        h.Contender(
            "PPE.map",
            "stdlib",
            f"concurrent.futures.ProcessPoolExecutor.map(chunksize={chunksize}){why}",
            ppe_open,
            ppe_map,
            ppe_close,
            start_method=sm,
        )
    )
    return out


def parallelkit_contenders(
    sm: str, workers: int, *, one_shot_pool: bool = False
) -> list[h.Contender[Any]]:
    """``run_parallel`` (one-shot) on processes, ``"auto"`` and threads, a ``WorkerPool``
    and its ``imap`` (warm)."""
    import parallelkit as pk

    method = cast("StartMethod", sm)

    def one_shot(_: None, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return pk.run_parallel(fn, items, max_workers=workers, start_method=method)

    def auto(_: None, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return pk.run_parallel(fn, items, max_workers=workers, start_method=method, backend="auto")

    def threads(_: None, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return pk.run_parallel(fn, items, max_workers=workers, backend="thread")

    def pool_open() -> pk.WorkerPool:
        return pk.WorkerPool(workers, start_method=method)

    def pool_run(pool: pk.WorkerPool, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return pk.run_parallel(fn, items, backend=pool)

    def pool_imap(pool: pk.WorkerPool, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(pool.imap(fn, items))

    def pool_close(pool: pk.WorkerPool) -> None:
        pool.shutdown(wait=True)

    return [
        h.Contender(
            "parallelkit.run_parallel",
            "parallelkit",
            "run_parallel(fn, items, max_workers=W, start_method=SM), automatic chunksize",
            lambda: None,
            one_shot,
            lambda _: None,
            modes=("one-shot",),
            start_method=sm,
        ),
        h.Contender(
            "parallelkit.run_parallel(auto)",
            "parallelkit",
            'run_parallel(fn, items, max_workers=W, start_method=SM, backend="auto"): serial, '
            "threads or processes, chosen from the first items",
            lambda: None,
            auto,
            lambda _: None,
            modes=("one-shot",),
            start_method=sm,
        ),
        h.Contender(
            "parallelkit.run_parallel(thread)",
            "parallelkit",
            'run_parallel(fn, items, max_workers=W, backend="thread")',
            lambda: None,
            threads,
            lambda _: None,
            modes=("one-shot",),
            start_method=sm,
        ),
        h.Contender(
            "parallelkit.WorkerPool",
            "parallelkit",
            "run_parallel(fn, items, backend=pool) on a WorkerPool(W, start_method=SM)"
            + ("; one-shot: open, map, shutdown()" if one_shot_pool else ""),
            pool_open,
            pool_run,
            pool_close,
            modes=("one-shot", "warm") if one_shot_pool else ("warm",),
            start_method=sm,
        ),
        h.Contender(
            "parallelkit.WorkerPool.imap",
            "parallelkit",
            "list(pool.imap(fn, items)) on a WorkerPool(W, start_method=SM)",
            pool_open,
            pool_imap,
            pool_close,
            modes=("warm",),
            start_method=sm,
        ),
    ]


def shutdown_joblib_executor() -> None:
    """joblib keeps one process-wide loky executor alive after a call; stop it."""
    reusable_executor = importlib.import_module("joblib.externals.loky.reusable_executor")
    executor = getattr(reusable_executor, "_executor", None)
    if executor is None:
        return
    if hasattr(executor, "terminate"):  # joblib's memmapping executor also cleans up files
        executor.terminate(kill_workers=False)
    else:
        executor.shutdown(wait=True)


def peer_contenders(
    sm: str, workers: int, chunksize: int
) -> tuple[list[h.Contender[Any]], dict[str, str]]:
    """The peers that are importable, and why the others are missing."""
    out: list[h.Contender[Any]] = []
    missing: dict[str, str] = {}
    ctx = multiprocessing.get_context(sm)

    try:  # loky before joblib: the other order breaks joblib's memmap clean-up (1 s stalls)
        loky: Any = importlib.import_module("loky")

        def loky_open() -> Any:
            return loky.ProcessPoolExecutor(max_workers=workers)

        def loky_map(ex: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
            return list(ex.map(fn, items, chunksize=chunksize))

        def loky_close(ex: Any) -> None:
            ex.shutdown(wait=True)

        out.append(
            h.Contender(
                "loky.map",
                "peer",
                f"loky.ProcessPoolExecutor.map(chunksize={chunksize}); loky's own start method",
                loky_open,
                loky_map,
                loky_close,
                start_method="loky",
            )
        )
    except ImportError as exc:
        missing["loky"] = str(exc)

    try:
        joblib: Any = importlib.import_module("joblib")

        def joblib_map(_: None, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
            return list(joblib.Parallel(n_jobs=workers)(joblib.delayed(fn)(x) for x in items))

        out.append(
            h.Contender(
                "joblib",
                "peer",
                "joblib.Parallel(n_jobs=W)(delayed(fn)(x) ...), batch_size auto, loky backend, "
                "arrays over 1 MB memory-mapped; one-shot only (its executor is process-wide: "
                "a warm one would be shared)",
                lambda: None,
                joblib_map,
                lambda _: shutdown_joblib_executor(),
                modes=("one-shot",),
                start_method="loky",
            )
        )
    except ImportError as exc:
        missing["joblib"] = str(exc)

    try:
        mpire: Any = importlib.import_module("mpire")

        def mpire_open() -> Any:
            return mpire.WorkerPool(n_jobs=workers, start_method=sm, keep_alive=True)

        def mpire_map(pool: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
            if items and isinstance(items[0], tuple | dict):  # mpire would unpack them
                items = [(x,) for x in items]
            # without the flag, mpire joins numpy results into one array
            return list(pool.map(fn, items, concatenate_numpy_output=False))

        def mpire_close(pool: Any) -> None:
            pool.stop_and_join()

        out.append(
            h.Contender(
                "mpire.map",
                "peer",
                "mpire.WorkerPool(keep_alive=True).map(concatenate_numpy_output=False), "
                "default chunk_size",
                mpire_open,
                mpire_map,
                mpire_close,
                start_method=sm,
            )
        )
    except ImportError as exc:
        missing["mpire"] = str(exc)

    try:
        pebble: Any = importlib.import_module("pebble")

        def pebble_open() -> Any:
            return pebble.ProcessPool(max_workers=workers, context=ctx)

        def pebble_map(pool: Any, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
            return list(pool.map(fn, items, chunksize=chunksize).result())

        def pebble_close(pool: Any) -> None:
            pool.close()
            pool.join()

        out.append(
            h.Contender(
                "pebble.map",
                "peer",
                f"pebble.ProcessPool.map(chunksize={chunksize})",
                pebble_open,
                pebble_map,
                pebble_close,
                start_method=sm,
            )
        )
    except ImportError as exc:
        missing["pebble"] = str(exc)
    return out, missing


def processes_contender(sm: str) -> h.Contender[None]:
    """One bare ``multiprocessing.Process`` an item: started, result piped back, joined."""
    ctx = multiprocessing.get_context(sm)

    def map_(_: None, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        conns: list[Any] = []
        procs: list[Any] = []
        try:
            for x in items:
                recv, send = ctx.Pipe(duplex=False)
                conns.append(recv)
                proc = ctx.Process(target=run_one, args=(fn, x, send))  # type: ignore[attr-defined]
                proc.start()
                send.close()
                procs.append(proc)
            out = [c.recv() for c in conns]
            for proc in procs:
                proc.join()
        finally:
            for c in conns:
                c.close()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"bare processes exited with {bad}")
        return out

    return h.Contender(
        "Process",
        "baseline",
        "one bare multiprocessing.Process(target=fn(x) -> Pipe) an item: start all, "
        "receive, join all",
        lambda: None,
        map_,
        lambda _: None,
        modes=("one-shot",),
        start_method=sm,
    )


def shm_ideal_contender(
    sm: str, workers: int, segment_name: str, rows: int, n: int
) -> h.Contender[Any]:
    """``Pool.map(shm_sum, (name, i), chunksize=1)``: the arrays are already in shared memory."""
    ctx = multiprocessing.get_context(sm)
    specs = [(segment_name, i, rows, n) for i in range(rows)]

    def open_() -> Any:
        return ctx.Pool(workers)

    def map_(pool: Any, _fn: Callable[[Any], Any], _items: Sequence[Any]) -> list[Any]:
        return list(pool.map(shm_sum, specs, chunksize=1))

    def close(pool: Any) -> None:
        pool.close()
        pool.join()

    return h.Contender(
        "shm_ideal",
        "baseline",
        "data already in one SharedMemory segment (not timed); "
        "Pool.map(shm_sum, (name, i), chunksize=1): tasks carry coordinates only",
        open_,
        map_,
        close,
        start_method=sm,
    )


def serial_and_pools(
    settings: Settings,
    n_items: int,
    missing: dict[str, str],
    *,
    chunksize: int | None = None,
    pool_chunksize_1: bool = False,
    one_shot_pool: bool = False,
) -> list[h.Contender[Any]]:
    """serial, the stdlib, parallelkit and (unless turned off) the importable peers."""
    sm, w = settings.start_method, settings.workers
    cs = chunksize if chunksize is not None else batched_chunksize(n_items, w)
    contenders: list[h.Contender[Any]] = [h.serial_contender()]
    contenders += stdlib_contenders(sm, w, cs, pool_chunksize_1=pool_chunksize_1)
    contenders += parallelkit_contenders(sm, w, one_shot_pool=one_shot_pool)
    if settings.peers:
        peers, absent = peer_contenders(sm, w, cs)
        contenders += peers
        missing.update(absent)
    return contenders


def selected(settings: Settings, contenders: list[h.Contender[Any]]) -> list[h.Contender[Any]]:
    if not settings.only:
        return contenders
    keep = re.compile(settings.only)
    return [c for c in contenders if c.kind == "baseline" or keep.search(c.name)]


# ------------------------------------------------------------------ workloads


def calibrate(target_seconds: float) -> int:
    """Loop count for which ``burn`` takes ``target_seconds`` on one undisturbed core."""
    loops = 10_000
    while True:
        t0 = time.perf_counter()
        burn(loops)
        if time.perf_counter() - t0 >= 0.02:
            break
        loops *= 2
    tries = []
    for _ in range(5):
        t0 = time.perf_counter()
        burn(loops)
        tries.append(time.perf_counter() - t0)
    # the median, not the fastest: a brief try on an idle core runs faster than 16 tasks
    # on busy ones (the fastest try made tasks of ~0.15 s in a full run)
    return max(1, round(loops * target_seconds / statistics.median(tries)))


@contextlib.contextmanager
def heavy_main() -> Iterator[None]:
    """Make ``__main__`` a module that imports numpy, as a user's script might.

    spawn (and loky) children import the parent's ``__main__`` again by name; with this
    module in its place, each of them imports numpy, as it would for such a script.
    """
    module = importlib.import_module(f"{__package__}.heavy_main")
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = module
    try:
        yield
    finally:
        sys.modules["__main__"] = saved


def numpy_or_none() -> Any:
    try:
        return importlib.import_module("numpy")
    except ImportError:
        return None


def tiny_workload(settings: Settings, missing: dict[str, str]) -> Iterator[Workload]:
    n = settings.sizes.items
    items = list(range(n))
    yield Workload(
        "tiny",
        f"{n:,} items, `x*x`: per-item overhead",
        square,
        items,
        serial_and_pools(settings, n, missing),
        h.equals([x * x for x in items]),
    )


def cpu_workload(
    settings: Settings, missing: dict[str, str], meta: dict[str, Any]
) -> Iterator[Workload]:
    s = settings.sizes
    loops = calibrate(s.task_seconds)
    meta["cpu_task_loops"] = loops
    ideal = min(settings.workers, s.tasks)
    items = [loops + i for i in range(s.tasks)]
    yield Workload(
        "cpu",
        f"{s.tasks} pure-Python tasks of ~{s.task_seconds:g} s (`burn({loops:,})`); "
        f"speed-up over serial, ideal {ideal}x",
        burn,
        items,
        serial_and_pools(settings, s.tasks, missing),
        h.equals([burn(x) for x in items]),
        ideal_speedup=ideal,
    )


def arrays_workload(settings: Settings, missing: dict[str, str], np: Any) -> Iterator[Workload]:
    from multiprocessing import shared_memory

    rows, n = settings.sizes.arrays, settings.sizes.elements
    rng = np.random.default_rng(0)
    arrays = [rng.random(n) for _ in range(rows)]
    segment = shared_memory.SharedMemory(create=True, size=rows * n * 8)
    try:
        view = np.ndarray((rows, n), dtype=np.float64, buffer=segment.buf)
        for i, a in enumerate(arrays):
            view[i] = a
        del view
        contenders = serial_and_pools(settings, rows, missing, chunksize=1, pool_chunksize_1=True)
        contenders.append(
            shm_ideal_contender(settings.start_method, settings.workers, segment.name, rows, n)
        )
        yield Workload(
            "arrays",
            f"{rows} float64 arrays of {n * 8 / 1e6:g} MB as arguments, `float(a.sum())` back: "
            "moving large arguments",
            array_sum,
            arrays,
            contenders,
            h.equals([array_sum(a) for a in arrays]),
            baseline="shm_ideal",
        )
    finally:
        segment.close()
        segment.unlink()


def arrays_results_workload(
    settings: Settings, missing: dict[str, str], np: Any
) -> Iterator[Workload]:
    rows, n = settings.sizes.arrays, settings.sizes.elements
    base = np.arange(n, dtype=np.float64)

    def check(result: list[Any]) -> str | None:
        if len(result) != rows:
            return f"{len(result)} results"
        for i, a in enumerate(result):
            if not isinstance(a, np.ndarray) or a.dtype != np.float64:
                return f"result {i} is {type(a).__name__}"
            if not np.array_equal(a, base + i):
                return f"result {i} differs"
        return None

    yield Workload(
        "arrays-results",
        f"{rows} tasks, each returns a float64 array of {n * 8 / 1e6:g} MB "
        "(`arange(n) + i`): moving large results",
        make_array,
        [(i, n) for i in range(rows)],
        serial_and_pools(settings, rows, missing, chunksize=1, pool_chunksize_1=True),
        check,
    )


def tile_contenders(
    sm: str, workers: int, np: Any, image: Any, spots: list[tuple[int, int, int, int]]
) -> list[h.Contender[None]]:
    """Every contender cuts the tiles from ``image`` itself (``spots``: y, x, height,
    width), from a generator or into a list, and places each ``tile_scale`` result into a
    new output array, which it returns (in a list of one).  One-shot: open, map, close."""
    import parallelkit as pk

    method = cast("StartMethod", sm)
    ctx = multiprocessing.get_context(sm)
    size = {(y, x): (hh, ww) for y, x, hh, ww in spots}

    def tiles() -> Iterator[tuple[int, int, Any]]:
        for y, x, hh, ww in spots:
            yield y, x, image[y : y + hh, x : x + ww]

    def placed(results: Iterator[tuple[int, int, Any]]) -> list[Any]:
        out = np.empty_like(image)
        for y, x, tile in results:
            hh, ww = size[y, x]
            out[y : y + hh, x : x + ww] = tile
        return [out]

    def serial(_: None, fn: Callable[[Any], Any], _items: Sequence[Any]) -> list[Any]:
        return placed(map(fn, tiles()))

    def ppe(_: None, fn: Callable[[Any], Any], _items: Sequence[Any]) -> list[Any]:
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            return placed(ex.map(fn, tiles()))

    def pool_imap(
        unordered: bool,
    ) -> Callable[[None, Callable[[Any], Any], Sequence[Any]], list[Any]]:
        def map_(_: None, fn: Callable[[Any], Any], _items: Sequence[Any]) -> list[Any]:
            pool = ctx.Pool(workers)
            try:
                it = pool.imap_unordered(fn, tiles()) if unordered else pool.imap(fn, tiles())
                return placed(it)
            finally:
                pool.close()
                pool.join()

        return map_

    def imap(**options: Any) -> Callable[[None, Callable[[Any], Any], Sequence[Any]], list[Any]]:
        def map_(_: None, fn: Callable[[Any], Any], _items: Sequence[Any]) -> list[Any]:
            with pk.imap_parallel(
                fn, tiles(), max_workers=workers, start_method=method, **options
            ) as it:
                return placed(it)

        return map_

    def run(**options: Any) -> Callable[[None, Callable[[Any], Any], Sequence[Any]], list[Any]]:
        def map_(_: None, fn: Callable[[Any], Any], _items: Sequence[Any]) -> list[Any]:
            got = pk.run_parallel(
                fn, list(tiles()), max_workers=workers, start_method=method, **options
            )
            return placed(iter(got))

        return map_

    def one(name: str, kind: h.Kind, note: str, map_: Any) -> h.Contender[None]:
        return h.Contender(
            name,
            kind,
            note,
            lambda: None,
            map_,
            lambda _: None,
            modes=("serial",) if kind == "baseline" else ("one-shot",),
            start_method="" if kind == "baseline" else sm,
        )

    gen = "a generator of (y, x, view) items"
    return [
        one("serial", "baseline", f"map(fn, {gen}) in this process", serial),
        one("PPE.map", "stdlib", f"ProcessPoolExecutor(W).map(fn, {gen}) (chunksize=1)", ppe),
        one("Pool.imap", "stdlib", f"Pool(W).imap(fn, {gen}) (chunksize=1)", pool_imap(False)),
        one(
            "Pool.imap_unordered",
            "stdlib",
            f"Pool(W).imap_unordered(fn, {gen}) (chunksize=1)",
            pool_imap(True),
        ),
        one("imap_parallel", "parallelkit", f"imap_parallel(fn, {gen})", imap()),
        one(
            "imap_parallel(ordered=False)",
            "parallelkit",
            f"imap_parallel(fn, {gen}, ordered=False)",
            imap(ordered=False),
        ),
        one(
            "imap_parallel(chunksize=1)",
            "parallelkit",
            f"imap_parallel(fn, {gen}, chunksize=1)",
            imap(chunksize=1),
        ),
        one("run_parallel", "parallelkit", "run_parallel(fn, list of the items)", run()),
        one(
            "run_parallel(ordered=False)",
            "parallelkit",
            "run_parallel(fn, list of the items, ordered=False)",
            run(ordered=False),
        ),
        one(
            "run_parallel(chunksize=1)",
            "parallelkit",
            "run_parallel(fn, list of the items, chunksize=1)",
            run(chunksize=1),
        ),
    ]


def tiles_workloads(settings: Settings, np: Any) -> Iterator[Workload]:
    """2 MB float64 tiles of a (height, width) image: square views (strided), then bands of
    whole rows (contiguous); each contender places the results into an output array."""
    side = settings.sizes.tile_side
    rows, cols = settings.sizes.tile_grid
    image = np.random.default_rng(0).random((rows * side, cols * side))
    want = image * 0.5
    band = side * side // image.shape[1]  # rows of a contiguous tile of the same size

    def check(result: list[Any]) -> str | None:
        if len(result) != 1 or not np.array_equal(result[0], want):
            return "the output array differs"
        return None

    mb = side * side * 8 / 1e6
    cases = [
        (
            "tiles",
            f"{rows * cols} tiles of {mb:g} MB (`image[y:y+{side}, x:x+{side}]`, not contiguous) "
            f"of a {rows * side}x{cols * side} float64 image, `tile * 0.5` placed into an output",
            [
                (y, x, side, side)
                for y in range(0, rows * side, side)
                for x in range(0, cols * side, side)
            ],
        ),
        (
            "tiles-rows",
            f"{rows * cols} bands of {band} whole rows ({mb:g} MB, contiguous) of the same image, "
            "`tile * 0.5` placed into an output",
            [(y, 0, band, image.shape[1]) for y in range(0, image.shape[0], band)],
        ),
    ]
    for key, title, spots in cases:
        yield Workload(
            key,
            title,
            tile_scale,
            spots,
            tile_contenders(settings.start_method, settings.workers, np, image, spots),
            check,
            baseline="PPE.map",
        )


def membound_workload(settings: Settings, missing: dict[str, str], np: Any) -> Iterator[Workload]:
    rows, n = settings.sizes.arrays, settings.sizes.elements
    rng = np.random.default_rng(1)
    arrays = [rng.random(n) for _ in range(rows)]
    expected = [scale_add(a) for a in arrays]

    def check(result: list[Any]) -> str | None:
        if len(result) != rows:
            return f"{len(result)} results"
        for i, (a, b) in enumerate(zip(result, expected, strict=True)):
            if not np.array_equal(a, b):
                return f"result {i} differs"
        return None

    yield Workload(
        "membound",
        f"{rows} float64 arrays of {n * 8 / 1e6:g} MB as arguments, `1.5 a + a` (a new "
        "array) back: memory-bound numpy, where serial beats every process pool",
        scale_add,
        arrays,
        serial_and_pools(settings, rows, missing, chunksize=1),
        check,
    )


def startup_workloads(
    settings: Settings, missing: dict[str, str], meta: dict[str, Any]
) -> Iterator[Workload]:
    sm = settings.start_method
    heavy = [False]
    if settings.sizes.heavy_main and sm == "spawn":
        if numpy_or_none() is not None:
            heavy.append(True)
        else:
            meta.setdefault("skipped", {})["startup-W-heavy"] = "numpy is not installed"
            h.log("# startup-W-heavy: skipped, numpy is not installed")
    for w in settings.sizes.startup_workers:
        for is_heavy in heavy:
            local = replace(settings, workers=w)
            contenders = serial_and_pools(local, w, missing, chunksize=1, one_shot_pool=True)
            contenders = [
                replace(c, modes=tuple(m for m in c.modes if m in ("one-shot", "serial")))
                for c in contenders
                if c.kind != "baseline" or c.name == "serial"
            ]
            contenders = [c for c in contenders if c.modes]
            contenders.insert(0, processes_contender(sm))
            items = list(range(w))
            title = (
                f"start {w} workers, each runs one `x*x` task, shut down; "
                f"x Process = the time of {w} bare processes doing the same"
            )
            if is_heavy:
                title += "; `__main__` imports numpy (spawn children import it again)"
            yield Workload(
                f"startup-{w}" + ("-heavy" if is_heavy else ""),
                title,
                square,
                items,
                contenders,
                h.equals([x * x for x in items]),
                baseline="Process",
                workers=w,
                around=heavy_main if is_heavy else contextlib.nullcontext,
            )


def workloads(
    settings: Settings, meta: dict[str, Any], missing: dict[str, str]
) -> Generator[Workload, None, None]:
    """The chosen workloads, each built just before it runs (array data is large)."""
    wanted = settings.workloads
    if "tiny" in wanted:
        yield from tiny_workload(settings, missing)
    if "cpu" in wanted:
        yield from cpu_workload(settings, missing, meta)
    arrays = [k for k in ("arrays", "arrays-results", "membound") if k in wanted]
    np = numpy_or_none() if arrays else None
    if arrays and np is None:
        for key in arrays:
            meta.setdefault("skipped", {})[key] = "numpy is not installed"
            h.log(f"# {key}: skipped, numpy is not installed (pip install -e '.[bench]')")
    elif np is not None:
        if "arrays" in wanted:
            yield from arrays_workload(settings, missing, np)
        if "arrays-results" in wanted:
            yield from arrays_results_workload(settings, missing, np)
        if "membound" in wanted:
            yield from membound_workload(settings, missing, np)
    if "tiles" in wanted:
        np = numpy_or_none()
        if np is None:
            meta.setdefault("skipped", {})["tiles"] = "numpy is not installed"
            h.log("# tiles: skipped, numpy is not installed (pip install -e '.[bench]')")
        else:
            yield from tiles_workloads(settings, np)
    if "startup" in wanted:
        yield from startup_workloads(settings, missing, meta)


# ------------------------------------------------------------------ a run


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions(names: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def reexec_with_bytecode_cache() -> None:
    """Restart this program with ``.pyc`` files enabled, kept in a cache under /tmp.

    With ``PYTHONDONTWRITEBYTECODE`` set (as on our machines), a package run from its source
    tree -- parallelkit in an editable install -- is compiled anew by every spawn and
    forkserver child, while pip-installed peers ship their ``.pyc`` files: tens of ms per
    worker, charged to parallelkit alone.  Users have bytecode caches, so the benchmark does
    too.  The variable (and ``-B``, which multiprocessing passes on to its children) can only
    be dropped at interpreter start, hence the exec; the cache goes to a prefix outside the
    repository and is filled by the warm-up round.
    """
    if not sys.flags.dont_write_bytecode or os.environ.get(_REEXEC_MARK):
        return
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "parallelkit-bench"))
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [a for a in sys.orig_argv if a != "-B"]
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


_REEXEC_MARK = "PARALLELKIT_BENCH_REEXEC"


def new_meta(settings: Settings, *, benchmark: str, command: str) -> dict[str, Any]:
    """The ``meta`` record that starts a run's JSON lines."""
    import parallelkit

    return {
        "type": "meta",
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpus": usable_cpus(),
        "workers": settings.workers,
        "start_method": settings.start_method,
        "rounds": settings.run.rounds,
        "warmup": settings.run.warmup,
        "parallelkit": parallelkit.__version__,
        "git": git_revision(),
        "bytecode": "off (-B)" if sys.flags.dont_write_bytecode else "on",
        "pycache_prefix": sys.pycache_prefix,
        "peers": versions(PEERS) if settings.peers else {},
        "command": command,
    }


def run(
    settings: Settings,
    meta: dict[str, Any],
    *,
    on_table: Callable[[str, str, str], None] | None = None,
) -> Report:
    """Measure every chosen workload; ``on_table(key, title, table)`` as each one ends."""
    if settings.start_method not in multiprocessing.get_all_start_methods():
        raise SystemExit(f"start method {settings.start_method!r} is not available here")
    report = Report(meta)
    missing: dict[str, str] = {}
    meta["workloads"] = {}
    h.log(
        f"# {meta['benchmark']}: {settings.start_method}, {settings.workers} workers, "
        f"{settings.run.rounds} rounds; python {meta['python']}"
    )
    if settings.start_method == "forkserver":
        # The server is one per process, shared by every contender: started here, as
        # parallelkit starts it, every contender's workers inherit the same preloads
        # (otherwise whichever contender opened first would decide for all of them).
        from parallelkit._proc.forkserver import start_forkserver

        meta["forkserver_preload"] = start_forkserver()
    before = h.children()
    with contextlib.closing(workloads(settings, meta, missing)) as chosen:
        for wl in chosen:
            meta["workloads"][wl.key] = {
                "title": wl.title,
                "items": len(wl.items),
                "ideal_speedup": wl.ideal_speedup,
                "baseline": wl.baseline,
                "workers": wl.workers or settings.workers,
            }
            t0 = time.perf_counter()
            with wl.around():
                entries = h.run_interleaved(
                    selected(settings, wl.contenders),
                    wl.fn,
                    wl.items,
                    (),
                    settings.run,
                    title=wl.key,
                    check=wl.check,
                )
            elapsed = time.perf_counter() - t0
            meta["workloads"][wl.key]["run_seconds"] = round(elapsed, 1)
            h.log(f"# {wl.key}: measured in {elapsed:.1f} s")
            rows = h.summarise(wl.key, entries, speedup_over=wl.ideal_speedup, baseline=wl.baseline)
            report.lines += h.json_lines(rows, {**meta, "workers": wl.workers or settings.workers})
            table = h.markdown_table(rows)
            report.sections.append((wl.key, wl.title, table))
            if on_table is not None:
                on_table(wl.key, wl.title, table)
    meta["peers_missing"] = missing
    if settings.run.check_leftovers:
        left = h.leftover_children(before)
        meta["leftover_processes_at_exit"] = left
        if left:
            h.log(f"# child processes still alive after every pool was closed: {left}")
    return report


def json_text(report: Report) -> str:
    """The JSON lines of a run: the ``meta`` record first, then one line a result."""
    import json

    return "\n".join([json.dumps(report.meta), *report.lines]) + "\n"


def render(meta: dict[str, Any], sections: Sequence[tuple[str, str, str]]) -> str:
    """A run as markdown: a header line, then (workload, title, table)s."""
    peers = meta.get("peers") or {}
    missing = sorted(meta.get("peers_missing") or {})
    lines = [
        f"### {meta['start_method']}",
        "",
        f"Measured {meta['date']} on {meta['cpus']} cores ({meta['cpu_model']}), "
        f"Python {meta['python']}, parallelkit {meta['parallelkit']}"
        + (f" (git {meta['git']})" if meta.get("git") else "")
        + (", " + ", ".join(f"{k} {v}" for k, v in sorted(peers.items())) if peers else "")
        + f"; {meta['workers']} workers, {meta['rounds']} rounds after {meta['warmup']} "
        f"warm-up; `{meta['command']}`.",
    ]
    for key, title, table in sections:
        lines += ["", f"**{key}** — {title}", "", table]
    for key, why in sorted((meta.get("skipped") or {}).items()):
        lines += ["", f"**{key}** — skipped: {why}."]
    if missing:
        lines += ["", "Peers not installed (skipped): " + ", ".join(missing) + "."]
    return "\n".join(lines)
