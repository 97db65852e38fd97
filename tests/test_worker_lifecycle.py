"""A worker's life as a task sees it (issue 20, part 2): the finalizer, ``worker_info()``,
``max_tasks_per_worker`` on the one-call API.

Each event happens for real under every start method: workers retired by
``max_tasks_per_worker``, a worker SIGKILLed by its own task, a worker stopped at a
timeout, a pool shut down.  The finalizer writes a file named by its worker's pid, so the
test sees exactly which workers ran it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import parallelkit as pk
import tasks.basic as b
import tasks.lifecycle as t
from parallelkit import StartMethod

TESTS = Path(__file__).resolve().parent


def test_worker_info_outside_a_worker_is_none() -> None:
    assert pk.worker_info() is None
    # the in-process backends run tasks in this process: not a worker either
    assert pk.run_parallel(t.info_of, range(3), backend="serial") == [None] * 3
    assert pk.run_parallel(t.info_of, range(3), backend="thread") == [None] * 3


def test_worker_info_in_tasks(start_method: StartMethod) -> None:
    seen = pk.run_parallel(t.info_of, range(20), max_workers=2, start_method=start_method)
    assert all(info is not None for info in seen)
    by_pid = {info[2]: info for info in seen if info is not None}
    assert sorted(info[0] for info in by_pid.values()) == [0, 1]
    for _, max_workers, pid, method, stage in by_pid.values():
        assert (max_workers, method, stage) == (2, start_method, None)
        assert pid != os.getpid()


def test_worker_info_in_the_initializer(start_method: StartMethod, tmp_path: Path) -> None:
    with pk.WorkerPool(
        2, start_method=start_method, initializer=t.write_info, initargs=(str(tmp_path), "init")
    ) as pool:
        pids = {info[2] for info in pool.map(t.info_of, range(10)) if info is not None}
    written = t.records(str(tmp_path), "init")
    assert pids <= set(written)
    assert sorted(i for indices in written.values() for i in indices) == [0, 1]


def test_worker_info_in_pipeline_stages(start_method: StartMethod) -> None:
    seen = (
        pk.Pipeline(range(12), start_method=start_method)
        .map(t.info_of, max_workers=2, name="look")
        .run()
    )
    assert {(s[0], s[1], s[3], s[4]) for s in seen if s is not None} <= {
        (0, 2, start_method, "look"),
        (1, 2, start_method, "look"),
    }
    assert None not in seen


def test_finalizer_runs_once_per_worker_at_the_end_of_a_map(
    start_method: StartMethod, tmp_path: Path
) -> None:
    seen = pk.run_parallel(
        t.info_of,
        range(40),
        max_workers=2,
        start_method=start_method,
        finalizer=t.write_info,
        finalargs=(str(tmp_path),),
    )
    ran = {info[2]: info[0] for info in seen if info is not None}
    # every worker that ran items ran its finalizer, once, knowing its own index
    assert t.records(str(tmp_path)) == {pid: [index] for pid, index in ran.items()}


def test_finalizer_runs_at_pool_shutdown(start_method: StartMethod, tmp_path: Path) -> None:
    pool = pk.WorkerPool(
        2, start_method=start_method, finalizer=t.write_info, finalargs=(str(tmp_path),)
    )
    with pool:
        assert pool.submit(b.square, 3).result() == 9
        ran = {info[2]: info[0] for info in pool.map(t.info_of, range(20), chunksize=1) if info}
        assert t.records(str(tmp_path)) == {}  # not before the workers stop
    assert t.records(str(tmp_path)) == {pid: [index] for pid, index in ran.items()}


def test_finalizer_runs_in_workers_retired_by_max_tasks(
    start_method: StartMethod, tmp_path: Path
) -> None:
    seen = pk.run_parallel(
        t.info_of,
        range(6),
        max_workers=2,
        chunksize=1,
        start_method=start_method,
        max_tasks_per_worker=1,
        finalizer=t.write_info,
        finalargs=(str(tmp_path),),
    )
    pids = [info[2] for info in seen if info is not None]
    assert len(set(pids)) == 6  # one item per worker: each retired after its item
    written = t.records(str(tmp_path))
    assert set(written) == set(pids)
    # replacements take the index of the worker they replace
    assert {index for indices in written.values() for index in indices} == {0, 1}


def test_imap_parallel_recycles_workers(start_method: StartMethod, tmp_path: Path) -> None:
    with pk.imap_parallel(
        t.info_of,
        iter(range(5)),
        max_workers=1,
        chunksize=1,
        start_method=start_method,
        max_tasks_per_worker=2,
        finalizer=t.write_info,
        finalargs=(str(tmp_path),),
    ) as results:
        pids = [info[2] for info in results if info is not None]
    assert [len(set(pids[i : i + 2])) for i in (0, 2)] == [1, 1]
    assert len(set(pids)) == 3  # items 0-1, 2-3, 4
    assert t.records(str(tmp_path)) == {pid: [0] for pid in set(pids)}


def test_a_killed_worker_does_not_run_its_finalizer_and_its_replacement_keeps_its_index(
    start_method: StartMethod, tmp_path: Path
) -> None:
    pool = pk.WorkerPool(
        2, start_method=start_method, finalizer=t.write_info, finalargs=(str(tmp_path),)
    )
    with pool:
        before = {info[2]: info[0] for info in pool.map(t.info_of, range(8), chunksize=1) if info}
        assert sorted(before.values()) == [0, 1]
        with pytest.raises(pk.WorkerCrashedError) as crashed:
            pool.submit(t.kill_self_on_zero, 0).result()
        dead = crashed.value.pid
        assert dead in before
        assert crashed.value.signal == "SIGKILL"
        after = {info[2]: info[0] for info in pool.map(t.info_of, range(8), chunksize=1) if info}
        new = set(after) - set(before)
        assert len(new) == 1
        assert dead not in after
        assert after[new.pop()] == before[dead]  # the replacement holds the dead one's index
    written = t.records(str(tmp_path))
    assert dead not in written
    assert set(written) == set(after)


def test_a_worker_stopped_at_a_timeout_does_not_run_its_finalizer(
    start_method: StartMethod, tmp_path: Path
) -> None:
    out = pk.run_parallel(
        b.sleep_for,
        [60.0],
        max_workers=1,
        timeout=0.5,
        start_method=start_method,
        return_exceptions=True,
        finalizer=t.write_info,
        finalargs=(str(tmp_path),),
    )
    assert isinstance(out[0], pk.TaskTimeoutError)
    assert t.records(str(tmp_path)) == {}


@pytest.mark.timeout(120)
def test_a_finalizer_that_raises_is_reported_on_stderr(start_method: StartMethod) -> None:
    # in a program of its own: a forkserver's workers write to the stderr the server was
    # started with, which this test's capture does not see
    code = (
        "import parallelkit as pk, tasks.basic as b, tasks.lifecycle as t\n"
        f"out = pk.run_parallel(b.square, range(4), max_workers=1, start_method={start_method!r},"
        " finalizer=t.raise_in_finalizer)\n"
        "print(out)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[0, 1, 4, 9]\n"  # the map's results are not touched
    assert "parallelkit: an exit hook of worker pid" in done.stderr
    assert "RuntimeError: finalizer failed on purpose" in done.stderr


def test_process_options_are_refused_where_they_cannot_apply() -> None:
    with pytest.raises(ValueError, match="max_tasks_per_worker"):
        pk.run_parallel(b.square, [1], max_tasks_per_worker=0)
    with pytest.raises(TypeError, match="finalizer must be callable"):
        pk.run_parallel(b.square, [1], finalizer=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="finalargs must be a tuple"):
        pk.imap_parallel(b.square, [1], finalizer=print, finalargs=[1])  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="finalizer"):
        pk.run_parallel(b.square, [1], backend="thread", finalizer=print)
    with pytest.raises(ValueError, match="max_tasks_per_worker"):
        pk.run_parallel(b.square, [1], backend="serial", max_tasks_per_worker=2)
    with pk.WorkerPool(1) as pool, pytest.raises(ValueError, match="belong to the WorkerPool"):
        pk.run_parallel(b.square, [1], backend=pool, finalizer=print)
    with pytest.raises(TypeError, match="finalizer must be callable"):
        pk.WorkerPool(1, finalizer="print")  # type: ignore[arg-type]


def test_a_finalizer_that_cannot_be_pickled_is_refused_before_any_worker_starts() -> None:
    with pytest.raises(pk.SerializationError, match="finalargs"):
        pk.run_parallel(b.square, [1], finalizer=print, finalargs=(threading.Lock(),))


def test_worker_local_is_made_once_per_worker_and_closed_when_it_stops(
    start_method: StartMethod, tmp_path: Path
) -> None:
    mine = t.RESOURCE.get()  # made here first: a forked worker must not use it
    try:
        seen = pk.run_parallel(
            t.use_resource, [str(tmp_path)] * 30, max_workers=2, start_method=start_method
        )
    finally:
        t.RESOURCE.clear()
    serials: dict[int, set[object]] = {}
    for pid, maker, serial in seen:
        assert maker == pid  # made in the worker that uses it
        serials.setdefault(pid, set()).add(serial)
    assert all(len(s) == 1 for s in serials.values())  # once per worker
    assert mine["serial"] not in {s for group in serials.values() for s in group}
    closed = {
        int(path.name.split("-")[1]): path.read_text().split() for path in tmp_path.glob("closed-*")
    }
    assert closed == {pid: [str(serial) for serial in s] for pid, s in serials.items()}


def test_worker_local_copies_in_one_process_share_the_value(start_method: StartMethod) -> None:
    holder = pk.WorkerLocal(os.getpid)
    with pk.WorkerPool(1, start_method=start_method) as pool:
        first, second = (pool.submit(t.resource_through_pickle, t.RESOURCE) for _ in range(2))
        assert first.result() == second.result()  # two unpickled copies, one value
    assert repr(holder).startswith("<WorkerLocal of")
    with pytest.raises(TypeError, match="factory must be callable"):
        pk.WorkerLocal(3)  # type: ignore[arg-type]


def test_worker_local_in_the_parent_keeps_no_exit_hook() -> None:
    from parallelkit._proc import identity

    holder: pk.WorkerLocal[list[int]] = pk.WorkerLocal(list, close=list.clear)
    for _ in range(3):
        holder.get()
        holder.clear()
    assert identity._exit_hooks == []  # nothing runs them here: nothing may pile up


def test_a_worker_stopped_for_a_scheduled_timeout_does_not_run_its_finalizer(
    start_method: StartMethod, tmp_path: Path
) -> None:
    with pk.WorkerPool(
        1, start_method=start_method, finalizer=t.write_info, finalargs=(str(tmp_path),)
    ) as pool:
        first = pool.submit(t.info).result()
        assert first is not None
        with pytest.raises(pk.TaskTimeoutError):
            pool.schedule(b.sleep_for, args=(60.0,), timeout=0.5).result(timeout=60)
        second = pool.submit(t.info).result()
        assert second is not None
    assert second[2] != first[2]  # replaced, with the same index
    assert second[0] == first[0] == 0
    assert t.records(str(tmp_path)) == {second[2]: [0]}  # the stopped one ran nothing
