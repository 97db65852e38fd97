"""``backend="auto"``: it measures the first items in the caller, then runs the rest
serially, on threads or on processes; the choice is in the stats and one debug log line.

Each choice is forced by what the items do, not by a clock: trivial items cannot pay for
any pool, items that sleep leave the GIL free and use no CPU (threads), items that spin in
pure Python hold the GIL (processes).  Options that only processes honour must pick
processes without running an item in the caller.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import parallelkit as pk
import tasks.auto as tasks
from parallelkit import _platform
from parallelkit._map.backends import auto as A


def _stats_of(call: Any) -> pk.MapStats:
    seen: list[pk.MapStats] = []
    call(seen.append)
    assert len(seen) == 1
    return seen[0]


def _choice(stats: pk.MapStats) -> pk.AutoChoice:
    assert stats.choice is not None
    return stats.choice


# ------------------------------------------------------------------ the three choices


@pytest.mark.parametrize("kind", ["list", "range", "generator"])
def test_trivial_items_run_serially(kind: str) -> None:
    n = 300_000  # more than the probe runs: the rest runs after it
    items: Any = {
        "list": list(range(n)),
        "range": range(n),
        "generator": (x for x in range(n)),
    }[kind]
    if kind == "generator":
        with pk.imap_parallel(tasks.square, items, backend="auto") as it:
            results = list(it)
        stats = it.stats
    else:
        results = []
        stats = _stats_of(
            lambda on: results.extend(
                pk.run_parallel(tasks.square, items, backend="auto", on_stats=on)
            )
        )
    assert results == [x * x for x in range(n)]
    choice = _choice(stats)
    assert choice.backend == "serial", choice.reason
    assert choice.workers == 1
    assert 0 < choice.probed <= n
    assert stats.items == n
    assert {w.pid for w in stats.workers} == {None}  # nothing ran in another process


def test_items_that_sleep_run_on_threads() -> None:
    n = 24
    results: list[tuple[int, int, str]] = []
    stats = _stats_of(
        lambda on: results.extend(pk.run_parallel(tasks.nap, range(n), backend="auto", on_stats=on))
    )
    choice = _choice(stats)
    assert choice.backend == "thread", choice.reason
    assert [r[0] for r in results] == list(range(n))
    assert {r[1] for r in results} == {os.getpid()}
    threads = {r[2] for r in results[choice.probed :]}
    assert all(name.startswith("parallelkit-thread") for name in threads)
    assert {r[2] for r in results[: choice.probed]} == {threading.current_thread().name}


def test_pure_python_work_runs_on_processes(start_method: pk.StartMethod) -> None:
    n = 40
    results: list[tuple[int, int]] = []
    stats = _stats_of(
        lambda on: results.extend(
            pk.run_parallel(
                tasks.spin,
                range(n),
                backend="auto",
                max_workers=2,
                start_method=start_method,
                on_stats=on,
            )
        )
    )
    choice = _choice(stats)
    assert choice.backend == "process", choice.reason
    assert choice.workers == 2
    assert [r[0] for r in results] == list(range(n))
    # the probe's items ran here, and their results were kept; the rest ran elsewhere
    assert {r[1] for r in results[: choice.probed]} == {os.getpid()}
    assert os.getpid() not in {r[1] for r in results[choice.probed :]}
    assert stats.items == n
    assert sum(w.items for w in stats.workers if w.pid is not None) == n - choice.probed


def test_a_generator_on_processes_loses_nothing(start_method: pk.StartMethod) -> None:
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for x in range(30):
            pulled.append(x)
            yield x

    with pk.imap_parallel(
        tasks.spin, source(), backend="auto", max_workers=2, start_method=start_method
    ) as it:
        results = list(it)
    assert [r[0] for r in results] == list(range(30))
    assert pulled == list(range(30))
    choice = it.stats.choice
    assert choice is not None
    assert choice.backend == "process", choice.reason


def test_items_that_cannot_be_pickled_rule_processes_out() -> None:
    lock = threading.Lock()
    items = [(lock, i) for i in range(40)]
    results: list[int] = []
    stats = _stats_of(
        lambda on: results.extend(
            pk.run_parallel(tasks.spin_locked, items, backend="auto", max_workers=2, on_stats=on)
        )
    )
    assert results == list(range(40))
    choice = _choice(stats)
    assert choice.backend in ("serial", "thread")
    assert "process" not in choice.predicted


# ------------------------------------------------------------------ options


PROCESS_ONLY: list[tuple[str, dict[str, Any]]] = [
    ("timeout", {"timeout": 60.0}),
    ("initializer", {"initializer": tasks.remember, "initargs": (7,)}),
    ("finalizer", {"finalizer": tasks.remember, "finalargs": (8,)}),
    ("max_tasks_per_worker", {"max_tasks_per_worker": 3}),
    ("stall_timeout", {"stall_timeout": 60.0}),
    ("on_stall", {"on_stall": print}),
    ("forward_logs", {"forward_logs": False}),
]


@pytest.mark.parametrize(("name", "options"), PROCESS_ONLY, ids=[p[0] for p in PROCESS_ONLY])
def test_options_only_processes_honour_pick_processes(
    name: str, options: dict[str, Any], start_method: pk.StartMethod
) -> None:
    # trivial items: without the option, auto would run them serially
    fn = tasks.recall if name == "initializer" else tasks.where
    results: list[Any] = []
    stats = _stats_of(
        lambda on: results.extend(
            pk.run_parallel(
                fn, range(10), backend="auto", start_method=start_method, on_stats=on, **options
            )
        )
    )
    choice = _choice(stats)
    assert choice.backend == "process"
    assert choice.probed == 0  # not one item ran in the caller
    assert name in choice.reason
    if name == "initializer":
        assert results == [7] * 10
    else:
        assert os.getpid() not in {pid for pid, _ in results}


@pytest.mark.parametrize(("name", "options"), PROCESS_ONLY[:2], ids=["timeout", "initializer"])
def test_options_only_processes_honour_on_imap(name: str, options: dict[str, Any]) -> None:
    fn: Any = tasks.recall if name == "initializer" else tasks.where
    with pk.imap_parallel(fn, iter(range(5)), backend="auto", **options) as it:
        results: list[Any] = list(it)
    assert it.stats.choice is not None
    assert it.stats.choice.backend == "process"
    if name == "initializer":
        assert results == [7] * 5
    else:
        assert os.getpid() not in {pid for pid, _ in results}


def test_progress_counts_the_probed_items() -> None:
    seen: list[pk.Progress] = []
    n = 300_000
    results = pk.run_parallel(tasks.square, range(n), backend="auto", progress=seen.append)
    assert len(results) == n
    assert seen[-1].done == n
    assert seen[-1].total == n


def test_max_workers_bounds_threads() -> None:
    stats = _stats_of(
        lambda on: pk.run_parallel(tasks.nap, range(12), backend="auto", max_workers=2, on_stats=on)
    )
    choice = _choice(stats)
    assert choice.backend == "thread", choice.reason
    assert choice.workers == 2
    assert len([w for w in stats.workers if w.name.startswith("thread")]) <= 2


# ------------------------------------------------------------------ errors and edges


def test_an_item_failing_in_the_probe_raises_as_on_the_serial_backend() -> None:
    with pytest.raises(ValueError, match="bad item 3") as serial:
        pk.run_parallel(tasks.fail_at, range(100), backend="serial")
    with pytest.raises(ValueError, match="bad item 3") as auto:
        pk.run_parallel(tasks.fail_at, range(100), backend="auto")
    assert type(auto.value) is type(serial.value)
    assert any("on item 3" in note for note in auto.value.__notes__)
    assert any("backend='auto'" in note for note in auto.value.__notes__)


def test_an_item_failing_in_the_probe_of_imap_comes_after_the_results_before_it() -> None:
    got: list[int] = []
    it = pk.imap_parallel(tasks.fail_at, iter(range(100)), backend="auto")
    with it, pytest.raises(ValueError, match="bad item 3"):  # noqa: PT012 - the loop is the point
        for r in it:
            got.append(r)
    assert got == [0, 1, 4]
    choice = it.stats.choice
    assert choice is not None
    assert choice.backend == "serial"
    assert "item 3 failed" in choice.reason


def test_return_exceptions_keeps_the_probe_failures_in_their_slots() -> None:
    n = 5000
    results = pk.run_parallel(tasks.fail_at, range(n), backend="auto", return_exceptions=True)
    assert len(results) == n
    for x, r in enumerate(results):
        if x == 3 or (x and x % 1000 == 0):
            assert isinstance(r, ValueError)
            assert f"bad item {x}" in str(r)
        else:
            assert r == x * x


def test_a_failure_after_the_probe_fails_the_call() -> None:
    # items 1000, 2000, ... fail after the probe, when the probe is short
    with pytest.raises(ValueError, match="bad item"):
        pk.run_parallel(tasks.fail_at, range(4, 300_000), backend="auto")


@pytest.mark.parametrize("given", [2, 3])
def test_the_input_raising_during_the_probe(given: int) -> None:
    # 3: the input raised inside the probe's third batch (items 2 and 3), after item 2
    def source() -> Iterator[int]:
        yield from range(1, given + 1)
        raise OSError("the source broke")

    got: list[int] = []
    it = pk.imap_parallel(tasks.square, source(), backend="auto")
    with it, pytest.raises(OSError, match="the source broke") as raised:
        got.extend(it)
    assert got == [x * x for x in range(1, given + 1)]
    assert f"after item {given - 1}" in "".join(raised.value.__notes__)


def test_no_items_and_one_item() -> None:
    stats = _stats_of(lambda on: pk.run_parallel(tasks.square, [], backend="auto", on_stats=on))
    assert stats.items == 0
    assert _choice(stats).backend == "serial"
    assert pk.run_parallel(tasks.square, [3], backend="auto") == [9]
    assert list(pk.imap_parallel(tasks.square, [], backend="auto")) == []
    assert list(pk.imap_parallel(tasks.square, iter([5]), backend="auto")) == [25]


def test_unordered_results_are_all_there() -> None:
    results = pk.run_parallel(tasks.square, range(5000), backend="auto", ordered=False)
    assert sorted(results) == [x * x for x in range(5000)]
    with pk.imap_parallel(tasks.nap, range(10), backend="auto", ordered=False) as it:
        assert sorted(r[0] for r in it) == list(range(10))


def test_an_endless_generator_is_read_lazily() -> None:
    with pk.imap_parallel(tasks.square, itertools.count(), backend="auto") as it:
        first = list(itertools.islice(it, 10))
    assert first == [x * x for x in range(10)]


def test_bad_arguments_raise_one_clear_error() -> None:
    with pytest.raises(TypeError, match="callable"):
        pk.run_parallel(3, range(3), backend="auto")  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        pk.run_parallel(tasks.square, 5, backend="auto")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="max_workers"):
        pk.run_parallel(tasks.square, range(3), backend="auto", max_workers=0)
    with pytest.raises(pk.StartMethodError):
        pk.run_parallel(tasks.square, range(3), backend="auto", start_method="frok")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="'auto'"):
        pk.run_parallel(tasks.square, range(3), backend="autp")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="run_parallel and imap_parallel"):
        pk.Pipeline(range(3)).map(tasks.square).run(backend="auto")  # type: ignore[arg-type]


def test_star_items_of_the_wrong_kind_are_reported_by_the_chosen_backend() -> None:
    items: list[Any] = [(2, 3)] * 5 + [7] + [(1, 1)]
    with pytest.raises(TypeError, match="item 5 is 'int'"):
        pk.run_parallel(pk.star(pow), items, backend="auto")
    with pytest.raises(TypeError, match="is 'int'"):
        list(pk.imap_parallel(pk.star(pow), iter(items), backend="auto"))


# ------------------------------------------------------------------ what it says


def test_one_debug_line_says_what_it_chose(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="parallelkit"):
        pk.run_parallel(tasks.square, range(1000), backend="auto")
    lines = [r for r in caplog.records if "backend='auto' chose" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].name == "parallelkit"
    assert lines[0].levelno == logging.DEBUG
    assert "serial" in lines[0].getMessage()


def test_the_stats_say_what_it_chose() -> None:
    stats = _stats_of(
        lambda on: pk.run_parallel(tasks.square, range(1000), backend="auto", on_stats=on)
    )
    assert "backend='auto' chose serial" in str(stats)
    plain = _stats_of(
        lambda on: pk.run_parallel(tasks.square, range(10), backend="serial", on_stats=on)
    )
    assert plain.choice is None


# ------------------------------------------------------------------ the model alone


def _measured(**kw: Any) -> A.Measured:
    base: dict[str, Any] = {
        "items": 1,
        "seconds_per_item": 0.01,
        "cpu_share": 1.0,
        "gil_free": 0.0,
        "item": (100, 1e-6),
        "result": (100, 1e-6),
    }
    base.update(kw)
    return A.Measured(**base)


def _pick(m: A.Measured, remaining: int, method: str = "fork") -> str:
    predicted = A.predict(
        m,
        remaining,
        workers=2,
        threads=2,
        cpus=2,
        start_method=method,
        items_inherited=False,
    )
    return A.choose(predicted, ["serial", "thread", "process"])


def test_the_model() -> None:
    # tiny items: nothing pays for a pool
    assert _pick(_measured(seconds_per_item=5e-8), 10**6) == "serial"
    # long pure-Python items: processes
    assert _pick(_measured(seconds_per_item=0.1), 16) == "process"
    # spawn's start-up does not pay for a little work
    assert _pick(_measured(seconds_per_item=0.01), 10, "spawn") == "serial"
    # numpy that frees the GIL, with large arrays to move: threads
    big = (8_000_000, 0.004)  # 8 MB, 4 ms one way
    assert _pick(_measured(seconds_per_item=0.005, gil_free=0.95, item=big, result=big), 32) == (
        "thread"
    )
    # the same holding the GIL: moving the arrays costs more than the work
    assert _pick(_measured(seconds_per_item=0.005, item=big, result=big), 32) == "serial"
    # not picklable: never processes
    predicted = A.predict(
        _measured(seconds_per_item=0.1, item=None),
        16,
        workers=2,
        threads=2,
        cpus=2,
        start_method="fork",
        items_inherited=False,
    )
    assert "process" not in predicted
    # only processes allowed: processes, whatever the prediction
    assert A.choose({"serial": 1.0, "process": 5.0}, ["process"]) == "process"


@pytest.mark.parametrize("make", ["list", "generator"])
def test_a_probed_result_handed_out_is_not_held(make: str) -> None:
    # the probe's results are the job's first: once handed out, only the caller holds them
    source: Any = list(range(50)) if make == "list" else iter(range(50))
    with pk.imap_parallel(tasks.box, source, backend="auto") as it:
        first = next(it)
        ref = weakref.ref(first)
        del first
        gc.collect()
        assert ref() is None
        assert [b.x for b in it] == list(range(1, 50))
    assert it.stats.choice is not None
    assert it.stats.choice.probed >= 1


def test_the_gil_watcher_sees_pure_python_hold_the_gil() -> None:
    # a loaded machine once made a spinning caller look GIL-free (the watcher, having taken
    # the GIL, found it free again and again while the caller waited for a CPU)
    for _ in range(3):
        watch = A._GilWatch()
        watch.running = True
        tasks.spin(0)
        watch.running = False
        assert watch.close() < 0.5


def test_the_gil_watcher_ignores_a_free_gil_while_the_caller_waits_for_a_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Seen under load (GIL "free" 67-100% of the time for a spinning item, so threads were
    # chosen): the caller had handed the GIL over and then waited for a CPU to take it
    # back, so the watcher found it free at every wake-up.  Here the caller uses no CPU
    # while the platform says it is runnable: no wake-up may count.  The caller is a thread
    # of its own, watched only once its CPU clock stands still (the test's own thread
    # spends CPU entering and leaving a wait, which a wake-up may rightly count).
    if not hasattr(time, "pthread_getcpuclockid"):
        pytest.skip("needs a thread's CPU clock (time.pthread_getcpuclockid)")
    monkeypatch.setattr(_platform, "runnable", lambda native_id: True)
    made: queue.SimpleQueue[A._GilWatch] = queue.SimpleQueue()
    release = threading.Event()

    def caller() -> None:
        made.put(A._GilWatch())
        release.wait()

    thread = threading.Thread(target=caller)
    thread.start()
    watch = made.get(timeout=10)
    try:
        clock = time.pthread_getcpuclockid(thread.ident or 0)
        before = time.clock_gettime(clock)
        while True:  # until the caller is blocked in release.wait()
            time.sleep(0.02)
            now = time.clock_gettime(clock)
            if now == before:
                break
            before = now
        watch.running = True
        time.sleep(0.1)
        watch.running = False
        assert time.clock_gettime(clock) == before  # the premise: the caller never ran
    finally:
        watch.close()
        release.set()
        thread.join()
    assert watch.late == []


def test_the_gil_watcher_counts_a_caller_blocked_in_a_call_as_gil_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the same caller, blocked (as in time.sleep or I/O): the GIL is free for real
    monkeypatch.setattr(_platform, "runnable", lambda native_id: False)
    watch = A._GilWatch()
    watch.running = True
    while len(watch.late) <= A.HELD_SAMPLES:  # the caller blocked, a few looks at a time
        watch.stop.wait(0.01)
    watch.running = False
    assert watch.close() == 1.0
    assert len(watch.late) >= A.HELD_SAMPLES


def test_a_watcher_that_could_not_tell_watches_one_more_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a loaded machine left the watcher too few wake-ups during the first item (longer
    # than the probe) to tell whether the GIL was free; the choice depends on it, so one
    # more item runs, watched
    looks: list[bool] = []

    def can_tell(self: A._GilWatch) -> bool:
        looks.append(bool(looks))  # not the first time it is asked
        return looks[-1]

    monkeypatch.setattr(A._GilWatch, "can_tell", can_tell)
    # spawn: processes start slowly enough for threads to win if the GIL were free
    model = A.Model(workers=2, cpus=2, start_method="spawn", items_inherited=False)
    probe = A.run_probe(
        tasks.spin, list(range(24)), 24, fail_fast=True, measure_items=True, model=model
    )
    assert probe.count == 2
    assert looks == [False]  # asked once: the extra item is the last
    assert [r[0] for r in probe.results] == [0, 1]


@pytest.mark.timeout(30)
def test_a_watcher_told_to_look_now_ends_its_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    # the probe found its first item long: the watcher's delay (there so that tiny items
    # pay no hand-overs) would only lengthen the probe, serial work while a pool could run
    monkeypatch.setattr(_platform, "runnable", lambda native_id: False)  # a blocked caller
    watch = A._GilWatch(delay=3600.0)  # would not look within the test's timeout
    watch.running = True
    watch.look_now()
    while len(watch.late) < A.HELD_SAMPLES + 1:
        watch.stop.wait(0.01)
    watch.running = False
    watch.close()


def test_the_probe_watches_at_once_after_a_long_first_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    told: list[int] = []

    def look_now(self: A._GilWatch) -> None:
        told.append(len(told))
        self.go.set()

    monkeypatch.setattr(A._GilWatch, "look_now", look_now)
    model = A.Model(workers=2, cpus=2, start_method="fork", items_inherited=True)
    # each item sleeps 2 ms: at least A.WATCH_NOW_SECONDS whatever the load, and shorter
    # than the watcher's delay
    probe = A.run_probe(
        tasks.doze, list(range(32)), 32, fail_fast=True, measure_items=True, model=model
    )
    assert told == [0]  # after the first item, once
    assert probe.results == list(range(probe.count))


def test_a_pickle_timed_while_the_thread_waits_costs_nothing() -> None:
    # Seen under load: the 5-byte item's pickling timed in wall-clock time took a
    # preemption with it, so moving each item "cost" 12 ms and serial beat processes
    # for 30 ms items.  Here the pickling sleeps (no CPU, as when preempted).
    size = A._bytes_of(tasks.Sleepy(0.05))
    assert size is not None
    assert size[1] < 0.025


def test_the_cpu_share_leaves_out_the_time_spent_waiting_for_a_cpu() -> None:
    # Seen under load: an item sleeping 50 ms waited ~15 ms for a CPU once its sleep ended;
    # counted as CPU wanted, it read 25-38% busy and auto chose processes over threads
    assert A.cpu_share(0.001, 0.3, 1.0) < 0.01  # a sleeper, woken late
    assert A.cpu_share(0.4, 0.6, 1.0) == 1.0  # a spinner sharing its CPU
    assert A.cpu_share(0.25, 0.5, 1.0) == 0.5  # half computing, half waiting on I/O
    assert A.cpu_share(0.0, 1.0, 1.0) == 1.0  # it only ever waited for a CPU: busy
    assert A.cpu_share(0.3, 0.0, 1.0) == pytest.approx(0.3)  # no run-queue time known
