"""SharedCounter, SharedAccumulator and SharedArray: exact, by reference, and leak-free.

Every test runs under the suite's leak check, which fails a test that leaves a
``/dev/shm/pk_*`` segment behind.  The lifecycle traps of shared memory are made real:
an independent process that attaches and exits, a creator (and its resource tracker)
SIGKILLed, a tiny ``/dev/shm`` in a private mount namespace, a writer SIGKILLed in the
middle of its adds and a claimer SIGKILLed while it holds the claim lock.
"""

from __future__ import annotations

import contextlib
import doctest
import errno
import gc
import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parallelkit as pk
import tasks.shared as ws
from parallelkit import StartMethod, _platform
from parallelkit._shared import array as _shared_array
from parallelkit._shared import counters as _shared
from parallelkit._util.context import get_context
from parallelkit._wire import shm as _shm
from parallelkit.testing import remove_stale_segments

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "scripts" / "shared_segments.py"
SHM = _platform.SEGMENT_DIR  # /dev/shm, or the portable directory

Accumulator = pk.SharedAccumulator[int] | pk.SharedAccumulator[float]


def _segment_exists(name: str) -> bool:
    return (SHM / name).exists()


def _script_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(pk.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), src, env.get("PYTHONPATH")) if p)
    env.pop("PYTHONWARNINGS", None)
    return env


def _run_script(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_script_env(),
        check=False,
    )


def _json_line(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _join_all(procs: Sequence[multiprocessing.process.BaseProcess], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    assert [p.exitcode for p in procs] == [0] * len(procs)


def _split(values: Sequence[float], parts: int) -> list[list[float]]:
    return [list(values[i::parts]) for i in range(parts)]


def _expected(op: str, values: Sequence[float]) -> float:
    if op == "sum":
        return sum(values)
    return min(values) if op == "min" else max(values)


# ------------------------------------------------------------------ in one process


def test_counter_adds_and_reads() -> None:
    with pk.SharedCounter() as counter:
        assert counter.value == 0
        counter.add()
        counter.add(41)
        counter.add(-2)
        assert counter.value == 40
        assert _shm.NAME_RE.fullmatch(counter.name)
        assert counter.name.startswith(f"pk_{os.getpid()}_")
        assert _segment_exists(counter.name)
        assert "value=40" in repr(counter)
    assert counter.closed
    assert not _segment_exists(counter.name)


@pytest.mark.parametrize("dtype", [int, float])
def test_accumulator_ops(dtype: type[int] | type[float]) -> None:
    values = [dtype(v) for v in (5, -3, 12, 7)]
    for op in _shared.OPS:
        with pk.SharedAccumulator(op, dtype=dtype) as acc:
            for v in values:
                acc.add(v)
            assert acc.value == _expected(op, values)
            assert type(acc.value) is dtype
            assert (acc.op, acc.dtype) == (op, dtype)


def test_default_dtype_is_float_and_float_sum_uses_fsum() -> None:
    with pk.SharedAccumulator("sum") as acc:
        assert acc.dtype is float
        acc.add(1e16)
        together = threading.Barrier(2)

        def add_together(value: float) -> None:
            together.wait(10)  # both alive: two more writers, each with a slot of its own
            acc.add(value)

        writers = [threading.Thread(target=add_together, args=(v,)) for v in (1.0, -1e16)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        assert (1e16 + 1.0) + -1e16 == 0.0  # naive addition loses the 1.0
        assert acc.value == 1.0  # math.fsum of the partial sums


IEEE_SUMS = [
    pytest.param([[1e308], [1e308]], math.inf, id="overflow"),
    pytest.param([[-1e308], [-1e308]], -math.inf, id="negative-overflow"),
    pytest.param([[math.inf], [-math.inf]], math.nan, id="inf-minus-inf"),
    pytest.param([[1e308], [1e308], [math.inf]], math.inf, id="overflow-and-inf"),
    pytest.param([[math.nan], [1.0]], math.nan, id="nan"),
]


def _same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize(("shares", "expected"), IEEE_SUMS)
def test_a_float_sum_is_what_ieee_gives_however_the_adds_are_spread(
    start_method: StartMethod, shares: list[list[float]], expected: float
) -> None:
    ctx = get_context(start_method)
    with pk.SharedAccumulator("sum") as spread, pk.SharedAccumulator("sum") as one:
        procs = [ctx.Process(target=ws.add_values_target, args=(spread, share)) for share in shares]  # type: ignore[attr-defined]
        for p in procs:
            p.start()
        _join_all(procs)
        for share in shares:
            for value in share:
                one.add(value)
        assert spread._words[_shared.W_HWM] == len(shares) + 1  # a slot per writer
        assert _same_float(spread.value, expected)
        assert _same_float(one.value, expected)
        assert _same_float(sum(v for share in shares for v in share), expected)


def test_a_float_sum_back_in_range_is_exact() -> None:
    # The partial sums' running total overflows, but the total does not: fsum gives up on
    # the way, exact arithmetic does not.
    ctx = get_context("fork")
    with pk.SharedAccumulator("sum") as acc:
        for value in (1e308, 1e308, -1e308, 5.0):  # one writer after the other: slots 1..4
            writer = ctx.Process(target=ws.add_values_target, args=(acc, [value]))  # type: ignore[attr-defined]
            writer.start()
            _join_all([writer])
        assert acc._partials() == [1e308, 1e308, -1e308, 5.0]
        assert acc.value == 1e308  # 1e308 + 5.0 rounds to 1e308


def test_empty_sum_is_zero_and_empty_min_max_raise() -> None:
    with pk.SharedAccumulator("sum", dtype=int) as total:
        assert total.value == 0
        assert type(total.value) is int
    for op in ("min", "max"):
        with pk.SharedAccumulator(op) as acc:
            with pytest.raises(ValueError, match=f"the {op} of no values"):
                _ = acc.value
            assert "empty" in repr(acc)


def test_bad_op_and_dtype_list_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown op 'avg'; valid choices: 'sum', 'min', 'max'"):
        pk.SharedAccumulator("avg")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"unsupported dtype .*complex.*valid choices: int, float"):
        pk.SharedAccumulator("sum", dtype=complex)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="valid choices: int, float"):
        pk.SharedAccumulator("sum", dtype=bool)  # bool is an int to the type system only
    assert not [n for n in os.listdir(SHM) if n.startswith(f"pk_{os.getpid()}_")]


def test_wrong_value_type_leaves_the_total_alone() -> None:
    with pk.SharedAccumulator("sum", dtype=int) as acc:
        with pytest.raises(TypeError):
            acc.add(1.5)  # type: ignore[arg-type]  # first add: a claim
        acc.add(2)
        with pytest.raises(TypeError):
            acc.add(0.5)  # type: ignore[arg-type]  # the hot path
        assert acc.value == 2


def test_int64_overflow_of_a_writer_is_an_error_not_a_wrap() -> None:
    with pk.SharedCounter() as counter:
        counter.add(2**63 - 1)
        with pytest.raises(
            ValueError,
            match=r"^SharedCounter.add\(1\): this writer's total would leave int64 "
            r"\(its total 9223372036854775807 \+ 1 is outside -2\*\*63..2\*\*63-1\); "
            "nothing was added",
        ):
            counter.add(1)  # the hot path
        assert counter.value == 2**63 - 1
    with pk.SharedCounter() as counter:
        with pytest.raises(ValueError, match=r"would leave int64 \(9223372036854775808 is outside"):
            counter.add(2**63)  # a first add: the slot claim
        counter.add(-(2**63))
        with pytest.raises(ValueError, match=r"its total -9223372036854775808 \+ -1 is outside"):
            counter.add(-1)
        assert counter.value == -(2**63)


class _Index:
    """An integer that is not an int (like numpy's): it has ``__index__``."""

    def __index__(self) -> int:
        return 5


@pytest.mark.parametrize("bad", [1.5, True, "1", None], ids=repr)
def test_a_counter_takes_ints_only_and_says_so(bad: object) -> None:
    expected = rf"^SharedCounter.add\(\) takes an int; got {re.escape(repr(bad))} of type "
    with pk.SharedCounter() as counter:
        with pytest.raises(TypeError, match=expected + type(bad).__name__):
            counter.add(bad)  # type: ignore[arg-type]  # a first add: the slot claim
        counter.add(2)
        counter.add(_Index())  # type: ignore[arg-type]  # what typeshed cannot say: SupportsIndex
        with pytest.raises(TypeError, match=expected):
            counter.add(bad)  # type: ignore[arg-type]  # the hot path
        assert counter.value == 7


def test_a_counters_errors_read_the_same_in_a_worker(start_method: StartMethod) -> None:
    with pk.SharedCounter() as counter:
        with pytest.raises(ValueError, match=r"this writer's total would leave int64 \(its total"):
            pk.run_parallel(
                ws.add_each, [(counter, [2**63 - 1, 1])], start_method=start_method, max_workers=1
            )
        with pytest.raises(TypeError, match=r"takes an int; got 0.5 of type float"):
            pk.run_parallel(
                ws.add_each, [(counter, [0.5])], start_method=start_method, max_workers=1
            )
        assert counter.value == 2**63 - 1


def test_an_int_accumulator_says_what_it_takes() -> None:
    with pk.SharedAccumulator("max", dtype=int) as highest:
        with pytest.raises(
            TypeError, match=r"^SharedAccumulator.add\(\) takes int values; got 1.5 of type float"
        ):
            highest.add(1.5)  # type: ignore[arg-type]
        highest.add(3)
        with pytest.raises(TypeError, match="takes int values; got 'x' of type str"):
            highest.add("x")  # type: ignore[arg-type]
        assert highest.value == 3


# ------------------------------------------------------------------ file descriptors

RLIMIT_SCRIPT = TESTS / "scripts" / "shared_rlimit.py"


def test_a_counter_holds_one_descriptor_in_each_process_that_has_it(
    start_method: StartMethod,
) -> None:
    # Python's mmap keeps a duplicate of the file's descriptor: one each is the least a
    # mapping made by mmap.mmap() can hold.  The segment's own descriptor is closed once
    # mapped; the claim lock opens the file for the moment it is held.
    counters = [pk.SharedCounter() for _ in range(20)]
    try:
        assert ws.descriptors_after_adding(counters) == [1] * 20
        with pk.WorkerPool(1, start_method=start_method) as pool:
            in_worker = pool.submit(ws.descriptors_after_adding, counters).result()
        # under fork the worker also inherits the parent's: a second one, not its own
        assert in_worker == [2 if start_method == "fork" else 1] * 20
        assert sum(counter.value for counter in counters) == 40
    finally:
        for counter in counters:
            counter.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_out_of_descriptors_says_which_limit_and_what_to_do(start_method: StartMethod) -> None:
    proc = subprocess.run(
        [sys.executable, str(RLIMIT_SCRIPT), start_method, "12"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_script_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "CLEAN"
    phases = {entry["phase"]: entry for entry in map(json.loads, lines[:-1])}
    # One descriptor each, and a second one for a moment while one is made (the file's,
    # closed once mapped): 11 in 12 spare descriptors (6 when each kept 2).
    assert phases["create"]["made"] == 11
    for phase in ("create", "claim", "attach"):
        entry = phases[phase]
        assert entry["errno"] == errno.EMFILE, entry
        message = str(entry["message"])
        doing = "claim a slot in this SharedCounter" if phase == "claim" else "map another"
        assert f"cannot {doing}" in message, message
        assert "RLIMIT_NOFILE" in message, message
        assert "ulimit -n" in message, message
    assert re.search(r"this process's limit of \d+ open files", phases["create"]["message"])


def test_closed_objects_refuse_to_work() -> None:
    counter = pk.SharedCounter()
    counter.add()
    counter.close()
    counter.close()  # idempotent
    for use in (counter.add, lambda: counter.value, lambda: pickle.dumps(counter)):
        with pytest.raises(ValueError, match="SharedCounter is closed"):
            use()
    with pytest.raises(ValueError, match="is closed"), counter:
        pass
    assert "closed" in repr(counter)


def test_dropped_object_is_freed_by_its_finalizer() -> None:
    counter = pk.SharedCounter()
    counter.add()
    name = counter.name
    del counter
    gc.collect()
    assert not _segment_exists(name)


def test_threads_of_one_process_lose_nothing() -> None:
    with pk.SharedCounter() as counter:
        assert ws.count_in_threads((counter, 8, 5000)) == 40000
        counter.add()  # the main thread's too
        assert counter.value == 40001


class _PerThreadCounter(pk.SharedCounter):
    """A counter as a free-threaded build has it: a slot for each thread."""

    __slots__ = ()
    _per_thread = True
    add = pk.SharedCounter._add_per_thread


def test_the_counter_has_one_slot_a_process_where_there_is_a_gil() -> None:
    assert _shared.FREE_THREADED is ("t" in sys.abiflags)
    assert pk.SharedCounter._per_thread is _shared.FREE_THREADED
    assert pk.SharedAccumulator._per_thread  # user types may run Python code mid-add
    if not _shared.FREE_THREADED:
        assert pk.SharedCounter.add is not pk.SharedCounter._add_per_thread


RACY_THREADS, RACY_ADDS = 8, 20_000


def test_control_the_harness_counts_an_interrupted_adds_losses() -> None:
    # The next tests' harness sees lost updates: the same threads on an add that is
    # interrupted between its read and its write (held there on purpose) lose all but n.
    with pk.SharedCounter() as counter:
        counter.add(0)
        adds, _ = ws.add_in_switching_threads((counter._cell, RACY_THREADS, 200))
        assert (adds, counter.value) == (RACY_THREADS * 200, 200)


@pytest.mark.parametrize("kind", ["SharedCounter", "per-thread SharedCounter", "SharedAccumulator"])
def test_threads_switching_every_microsecond_lose_no_update(kind: str) -> None:
    writer: pk.SharedCounter | Accumulator = (
        pk.SharedCounter()
        if kind == "SharedCounter"
        else _PerThreadCounter()
        if kind == "per-thread SharedCounter"
        else pk.SharedAccumulator("sum", dtype=int)
    )
    with writer:
        adds, slots = ws.add_in_switching_threads((writer, RACY_THREADS, RACY_ADDS))
        assert writer.value == adds == RACY_THREADS * RACY_ADDS
        # the counter's threads share the process's slot (with the GIL); else one a thread
        shared = kind == "SharedCounter" and not _shared.FREE_THREADED
        assert slots == (1 if shared else RACY_THREADS)


def test_processes_of_switching_threads_lose_no_update_one_slot_each(
    start_method: StartMethod,
) -> None:
    with pk.SharedCounter() as counter:
        done = pk.run_parallel(
            ws.add_in_switching_threads,
            [(counter, 4, 5000)] * 4,
            start_method=start_method,
            max_workers=2,
            chunksize=1,
        )
        assert counter.value == sum(adds for adds, _ in done) == 80_000
        assert {slots for _, slots in done} == {1 if not _shared.FREE_THREADED else 4}


def test_writers_beyond_the_slots_share_the_locked_overflow_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_shared, "SLOTS", 3)  # the overflow slot and two writer slots
    overflow = _shared._base(0) + _shared.S_PID
    with pk.SharedAccumulator("sum", dtype=int) as acc:  # a slot for each thread
        assert ws.add_in_switching_threads((acc, 6, 3000)) == (18000, 2)
        assert acc.value == 18000
        assert acc._words[overflow] == _shared.OVERFLOW_OWNER


def test_processes_beyond_the_slots_share_the_locked_overflow_slot(
    monkeypatch: pytest.MonkeyPatch, start_method: StartMethod
) -> None:
    monkeypatch.setattr(_shared, "SLOTS", 3)  # the overflow slot and two writer slots
    ctx = get_context(start_method)
    with pk.SharedCounter() as counter:
        counter.add()  # this process takes a slot first
        together = ctx.Barrier(3)
        procs = [
            ctx.Process(target=ws.count_alive_together, args=(counter, together, 3000))  # type: ignore[attr-defined]
            for _ in range(3)
        ]
        for p in procs:
            p.start()
        _join_all(procs)
        assert counter.value == 9001
        # one child got the last slot, the two others added under the lock
        assert counter._words[_shared._base(0) + _shared.S_PID] == _shared.OVERFLOW_OWNER


def test_same_thread_attaching_again_reuses_its_slot() -> None:
    with pk.SharedCounter() as counter:
        counter.add()
        again = pickle.loads(pickle.dumps(counter))
        again.add(2)
        assert again.name == counter.name
        assert counter._words[_shared.W_HWM] == 2  # overflow slot + one writer slot
        again.close()  # unmaps only: an attached object never unlinks
        assert _segment_exists(counter.name)
        assert counter.value == 3


# ------------------------------------------------------------------ across processes: properties

ops = st.sampled_from(_shared.OPS)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[str, type[int] | type[float], list[float], int]:
    """An op, a dtype, values whose float sum is exact in any order, and a worker count."""
    op = draw(ops)
    dtype = draw(st.sampled_from([int, float]))
    ints = st.integers(min_value=-(10**6), max_value=10**6)
    values: list[float]
    if dtype is int:
        # magnitudes that overflow nothing, and some far beyond float precision
        big = st.integers(min_value=-(2**60), max_value=2**60)
        values = draw(st.lists(ints | big, min_size=1, max_size=40))
    else:
        # quarter-integers: every partial sum is exact, whatever the split
        values = draw(st.lists(ints.map(lambda i: i / 4), min_size=1, max_size=40))
    workers = draw(st.integers(min_value=1, max_value=6))
    return op, dtype, values, workers


@pytest.fixture
def warm_pool(start_method: StartMethod) -> Iterator[pk.WorkerPool]:
    with pk.WorkerPool(3, start_method=start_method) as pool:
        yield pool


@settings(
    max_examples=20,
    suppress_health_check=[*settings().suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(workload=workloads())
def test_property_pool_tasks_lose_no_update(
    warm_pool: pk.WorkerPool, workload: tuple[str, type[int] | type[float], list[float], int]
) -> None:
    op, dtype, values, shares = workload
    with pk.SharedAccumulator(op, dtype=dtype) as acc:  # type: ignore[call-overload]
        items = [(acc, share) for share in _split(values, shares)]
        pk.run_parallel(ws.add_values, items, backend=warm_pool, chunksize=1)
        assert acc.value == _expected(op, values)
        assert type(acc.value) is dtype


@settings(max_examples=4)
@given(workload=workloads(), runner=st.sampled_from(["run_parallel", "Process"]))
def test_property_fresh_processes_lose_no_update(
    start_method: StartMethod,
    workload: tuple[str, type[int] | type[float], list[float], int],
    runner: str,
) -> None:
    op, dtype, values, shares = workload
    shares = min(shares, 3)
    with pk.SharedAccumulator(op, dtype=dtype) as acc:  # type: ignore[call-overload]
        if runner == "run_parallel":
            items = [(acc, share) for share in _split(values, shares)]
            pk.run_parallel(
                ws.add_values, items, start_method=start_method, max_workers=shares, chunksize=1
            )
        else:
            ctx = get_context(start_method)
            procs = [
                ctx.Process(target=ws.add_values_target, args=(acc, share))  # type: ignore[attr-defined]
                for share in _split(values, shares)
            ]
            for p in procs:
                p.start()
            _join_all(procs)
        assert acc.value == _expected(op, values)


def test_two_processes_counting_in_a_tight_loop_are_exact(start_method: StartMethod) -> None:
    ctx = get_context(start_method)
    with pk.SharedCounter() as counter:
        procs = [ctx.Process(target=ws.count, args=((counter, 50_000),)) for _ in range(2)]  # type: ignore[attr-defined]
        for p in procs:
            p.start()
        counter.add(3)  # the parent writes at the same time
        _join_all(procs)
        assert counter.value == 100_003


def test_processes_with_several_threads_each_are_exact(start_method: StartMethod) -> None:
    with pk.SharedCounter() as counter:
        done = pk.run_parallel(
            ws.count_in_threads,
            [(counter, 4, 2000)] * 3,
            start_method=start_method,
            max_workers=3,
            chunksize=1,
        )
        assert sum(done) == counter.value == 24000


def test_fork_child_writes_its_own_slot_and_never_unlinks() -> None:
    ctx = multiprocessing.get_context("fork")
    with pk.SharedCounter() as counter:
        counter.add()  # the parent's slot is cached before the fork
        # Inherited, not pickled: the child has the parent's object, ownership and all.
        child = ctx.Process(target=ws.count, args=((counter, 20_000),))
        child.start()
        for _ in range(20_000):
            counter.add()
        _join_all([child])
        assert counter.value == 40_001
        assert _segment_exists(counter.name)  # the child's exit did not unlink it


def test_dead_writers_slot_is_taken_over_with_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_shared, "SLOTS", 2)  # the overflow slot and one writer slot
    ctx = multiprocessing.get_context("fork")
    with pk.SharedCounter() as counter:
        for n in (100, 200, 300):  # each child dies before the next one claims
            child = ctx.Process(target=ws.count, args=((counter, n),))
            child.start()
            _join_all([child])
        assert counter.value == 600
        overflow = _shared._base(0) + _shared.S_PID
        assert counter._words[overflow] == 0  # never needed: the dead slot was reused


# ------------------------------------------------------------------ crashes


def test_writer_killed_mid_loop_blocks_nobody_and_survivors_are_exact(
    start_method: StartMethod,
) -> None:
    ctx = get_context(start_method)
    step = 10**9  # the killed writer adds multiples of this; the survivors add ones
    with pk.SharedCounter() as counter:
        looper = ctx.Process(target=ws.add_forever, args=(counter, step))  # type: ignore[attr-defined]
        looper.start()
        deadline = time.monotonic() + 30
        while counter.value < 1000 * step and time.monotonic() < deadline:
            time.sleep(0.005)  # until it is well into its loop
        survivors = [ctx.Process(target=ws.count, args=((counter, 30_000),)) for _ in range(2)]  # type: ignore[attr-defined]
        for p in survivors:
            p.start()
        assert looper.pid is not None
        os.kill(looper.pid, signal.SIGKILL)
        looper.join(10)
        assert looper.exitcode == -signal.SIGKILL
        _join_all(survivors)
        killed_part, survivors_part = divmod(counter.value, step)
        assert survivors_part == 60_000  # exact, and no torn write of the killed writer
        assert killed_part >= 1000
        counter.add(7)  # the parent is not blocked either
        assert counter.value % step == 60_007


def test_claimer_killed_holding_the_claim_lock_blocks_nobody(start_method: StartMethod) -> None:
    ctx = get_context(start_method)
    with pk.SharedCounter() as counter:
        here, there = multiprocessing.Pipe()
        holder = ctx.Process(target=ws.hold_the_claim_lock, args=(counter, there))  # type: ignore[attr-defined]
        holder.start()
        there.close()
        assert here.poll(30)
        assert here.recv() == "locked"
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        here.close()
        assert pk.run_parallel(ws.count, [(counter, 1000)] * 2, start_method=start_method) == [
            1000,
            1000,
        ]
        counter.add()
        assert counter.value == 2001  # no deadlock: pytest-timeout would fail a hang


# ------------------------------------------------------------------ independent processes


def test_independent_process_attaching_and_exiting_leaves_the_segment() -> None:
    with pk.SharedCounter() as counter:
        counter.add(1)
        result = _json_line(_run_script("attach", pickle.dumps(counter).hex()))
        assert result["value"] == 6
        assert isinstance(result["tracker_pid"], int)  # it had a resource tracker of its own
        assert _segment_exists(counter.name)
        assert counter.value == 6
        counter.add()
        assert counter.value == 7


def test_control_the_stdlib_attach_does_unlink_the_creators_segment() -> None:
    """The trap is real here: the standard library's attach unlinks at exit (gh-82300)."""
    block = shared_memory.SharedMemory(create=True, size=4096)
    try:
        _json_line(_run_script("attach-stdlib", block.name))
        assert not _segment_exists(block.name.lstrip("/"))
    finally:
        block.close()
        with contextlib.suppress(FileNotFoundError):
            block.unlink()
        resource_tracker.unregister(f"/{block.name.lstrip('/')}", "shared_memory")


def _start_creator() -> tuple[subprocess.Popen[str], str, int]:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "create"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_script_env(),
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("NAME "), line + (proc.stderr.read() if proc.stderr else "")
    _, name, tracker = line.split()
    return proc, name, int(tracker)


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    """Wait until process ``pid`` (not our child) has exited: gone, or a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.01)
    return False


def _finish(proc: subprocess.Popen[str]) -> str:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)
    return stderr


@pytest.mark.skipif(SHM != _platform.DEV_SHM, reason="portable mode: see the test after this one")
def test_creator_sigkilled_its_resource_tracker_frees_the_segment() -> None:
    proc, name, _ = _start_creator()
    try:
        assert _segment_exists(name)
        os.kill(proc.pid, signal.SIGKILL)  # the creator alone; its tracker lives on
        deadline = time.monotonic() + 20
        while _segment_exists(name) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _segment_exists(name)
    finally:
        stderr = _finish(proc)
    assert "leaked shared_memory" in stderr  # the tracker says what it cleaned up


@pytest.mark.skipif(SHM == _platform.DEV_SHM, reason="the tracker frees it: the test before")
def test_portable_creator_sigkilled_the_leftover_is_removed_as_stale() -> None:
    # The resource tracker unlinks with shm_unlink, which never reaches the portable
    # directory, so it is not asked to: what a SIGKILLed creator leaves is stale.
    proc, name, _ = _start_creator()
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the creator alone; its tracker lives on
        proc.wait(timeout=10)
        assert _segment_exists(name)
        assert name in remove_stale_segments()
        assert not _segment_exists(name)
    finally:
        stderr = _finish(proc)
    assert "leaked" not in stderr  # the tracker never held it


def test_creator_and_tracker_sigkilled_the_leftover_is_recognised_and_removed() -> None:
    proc, name, tracker = _start_creator()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the creator and its tracker: a group kill
        proc.wait(timeout=10)
        assert _wait_gone(tracker)
        assert _segment_exists(name)  # nobody left to unlink it
        assert name in _shm.stale_segments()
        with pk.SharedCounter() as alive:  # a live creator's segment is not stale
            removed = remove_stale_segments()
            assert name in removed
            assert alive.name not in removed
            assert _segment_exists(alive.name)
        assert not _segment_exists(name)
        assert remove_stale_segments() == []
    finally:
        _finish(proc)
        with contextlib.suppress(FileNotFoundError):
            (SHM / name).unlink()


# ------------------------------------------------------------------ a full /dev/shm


def _in_tiny_shm(mode: str) -> subprocess.CompletedProcess[str]:
    # the segment directory is /dev/shm, or in portable mode one of the user's, private
    where = "/dev/shm" if mode == "sigbus" else str(SHM)
    options = "size=1m" if where == "/dev/shm" else "size=1m,mode=0700"
    command = (
        f"mkdir -p -m 0700 {where} && mount -t tmpfs -o {options} tmpfs {where} && "
        f'exec "{sys.executable}" "{SCRIPT}" {mode}'
    )
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        env=_script_env(),
        check=False,
    )


tiny_shm = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a private /dev/shm needs root and unshare(1)",
)


@tiny_shm
@pytest.mark.parametrize("mode", ["no-room", "no-room-fallocate"])
def test_no_room_in_dev_shm_fails_at_creation_with_a_clear_error(mode: str) -> None:
    # no-room: the free space seen before creating; no-room-fallocate: reserving the pages
    result = _json_line(_in_tiny_shm(mode))
    errors = result["errors"]
    assert isinstance(errors, list)
    assert errors
    for error in errors:
        assert error["errno"] == errno.ENOSPC
        assert f"no room in {SHM}" in error["message"]
        assert "4 MiB" in error["message"]
        assert "free of 1 MiB" in error["message"]
    assert result["left"] == []  # the failed segment was removed
    assert result["small"] == 3  # a small one still fits and works
    assert result["after"] == []


@tiny_shm
def test_control_the_stdlib_way_dies_of_sigbus_on_first_write() -> None:
    proc = _in_tiny_shm("sigbus")
    assert '"created"' in proc.stdout  # creating succeeded ...
    assert '"wrote"' not in proc.stdout
    assert proc.returncode == -signal.SIGBUS  # ... and the first write killed it


# ------------------------------------------------------------------ SharedArray


def test_array_zeros_from_array_and_views() -> None:
    np = pytest.importorskip("numpy")
    with pk.SharedArray.zeros((3, 4), dtype="int32") as zeros:
        assert zeros.array.shape == (3, 4)
        assert zeros.array.dtype == np.int32
        assert not zeros.array.any()
        assert zeros.array is zeros.array  # one view, no copy
        zeros.array[1, 2] = 9
        assert int(zeros.array.sum()) == 9
    source = np.arange(12.0).reshape(3, 4)
    with pk.SharedArray.from_array(source) as copy:
        np.testing.assert_array_equal(copy.array, source)
        source[0, 0] = 100  # a copy of the data, not a view of it
        assert copy.array[0, 0] == 0
    with pk.SharedArray.zeros(5) as flat, pk.SharedArray.zeros(0) as empty:
        assert flat.array.shape == (5,)
        assert flat.array.dtype == np.float64
        assert empty.array.size == 0


def test_array_refuses_objects_and_closed_use() -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match="Python objects"):
        pk.SharedArray.zeros(3, dtype=object)
    with pytest.raises(ValueError, match="Python objects"):
        pk.SharedArray.from_array(np.array([{}, []], dtype=object))
    with pytest.raises(TypeError, match=r"SharedArray\.zeros"):
        pk.SharedArray()
    shared = pk.SharedArray.zeros(4)
    kept = shared.array
    kept[:] = 2.5
    shared.close()
    shared.close()
    assert not _segment_exists(shared.name)
    assert kept.sum() == 10.0  # an array taken before close stays valid until dropped
    with pytest.raises(ValueError, match="SharedArray is closed"):
        _ = shared.array
    with pytest.raises(ValueError, match="SharedArray is closed"):
        pickle.dumps(shared)


def test_array_workers_write_their_slices_and_the_parent_sees_them(
    start_method: StartMethod,
) -> None:
    np = pytest.importorskip("numpy")
    rows = 12
    with pk.SharedArray.zeros((rows, 1000), dtype="int64") as shared:
        items = [(shared, start, start + 3) for start in range(0, rows, 3)]
        assert pk.run_parallel(ws.write_rows, items, start_method=start_method) == [3] * 4
        expected = np.repeat(np.arange(rows), 1000).reshape(rows, 1000)
        np.testing.assert_array_equal(shared.array, expected)
        shared.array[:] = 0
        ctx = get_context(start_method)
        procs = [
            ctx.Process(target=ws.write_rows_target, args=(shared, s, s + 6))  # type: ignore[attr-defined]
            for s in (0, 6)
        ]
        for p in procs:
            p.start()
        _join_all(procs)
        np.testing.assert_array_equal(shared.array, expected)


def test_array_pickles_by_reference_not_by_value() -> None:
    np = pytest.importorskip("numpy")
    with pk.SharedArray.zeros((1000, 1000)) as shared:  # 8 MB of data
        blob = pickle.dumps(shared)
        assert len(blob) < 1000
        other = pickle.loads(blob)
        other.array[3, 4] = 1.5
        assert shared.array[3, 4] == 1.5
        assert float(np.sum(shared.array)) == 1.5
        other.close()
        assert _segment_exists(shared.name)


def test_array_without_numpy_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import parallelkit as pk\n"
        "try:\n"
        "    pk.SharedArray.zeros(3)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env=_script_env(),
        check=True,
    )
    assert "SharedArray needs numpy" in proc.stdout
    assert "pip install 'parallelkit[numpy]'" in proc.stdout


def test_counter_needs_no_numpy() -> None:
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import parallelkit as pk\n"
        "with pk.SharedCounter() as c:\n"
        "    c.add(2)\n"
        "    print(c.value)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env=_script_env(),
        check=True,
    )
    assert proc.stdout.strip() == "2"


def test_floats_in_an_int_accumulator_are_a_type_error_for_mypy_too() -> None:
    # (the static side is in tests/typing/check_shared.py; here the runtime agrees)
    with pk.SharedAccumulator("max", dtype=float) as acc:
        acc.add(3)  # an int is a fine float
        acc.add(2.5)
        assert acc.value == 3.0
        assert isinstance(acc.value, float)


def test_the_readme_example_runs(tmp_path: Path) -> None:
    readme = TESTS.parent / "README.md"
    if not readme.is_file():
        pytest.skip("README.md not beside tests/")
    blocks = re.findall(r"^```python\n(.*?)^```", readme.read_text(), re.DOTALL | re.MULTILINE)
    example = next(b for b in blocks if "SharedCounter()" in b)
    script = tmp_path / "shared_example.py"
    script.write_text(example)
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_script_env(),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["6000"]


@pytest.mark.parametrize("module", [_shared, _shared_array, _shm], ids=lambda m: m.__name__)
def test_docstring_examples_run(module: ModuleType) -> None:
    if module is _shared_array:
        pytest.importorskip("numpy")
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
