"""Parallel work started inside a task (issue 20, part 4; ``docs/nesting.md``).

A task that calls ``run_parallel``, makes a ``WorkerPool`` or runs a ``Pipeline`` used to
fail with multiprocessing's ``AssertionError: daemonic processes are not allowed to have
children``.  Now the inner call runs: in the worker's own process when the worker's share
of the CPUs is one, in processes of its own when it asks for them (or its share is
larger); and a worker that dies takes its own children with it.
"""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path

import pytest

import parallelkit as pk
import tasks.basic as b
import tasks.lifecycle as t
from parallelkit import StartMethod


def test_inner_run_parallel_runs_in_the_worker_when_its_share_is_one_cpu(
    start_method: StartMethod,
) -> None:
    outer = pk.usable_cpu_count()  # the outer workers take every CPU: each one's share is one
    out = pk.run_parallel(t.nested_sum, [3, 4, 5], max_workers=outer, start_method=start_method)
    assert [total for total, _, _ in out] == [5, 14, 30]
    for _, inner_pids, own_pid in out:
        assert inner_pids == {own_pid}  # no process started for the inner call


def test_inner_run_parallel_with_processes_asked_for(start_method: StartMethod) -> None:
    if start_method in ("forkserver", "fork"):
        # a forkserver already running in this process (an earlier test's): a forked worker
        # must not take it for its own
        pk.run_parallel(b.square, [1], start_method="forkserver")
    out = pk.run_parallel(t.nested_explicit, [3, 4], max_workers=2, start_method=start_method)
    assert [total for total, _, _ in out] == [5, 14]
    for _, inner_pids, own_pid in out:
        assert own_pid not in inner_pids
        assert len(inner_pids) >= 1


@pytest.mark.parametrize("inner", ["fork", "forkserver", "spawn"])
def test_every_start_method_inside_a_forked_worker_whose_parent_runs_a_forkserver(
    inner: StartMethod,
) -> None:
    pk.run_parallel(b.square, [1], start_method="forkserver")  # our forkserver runs
    out = pk.run_parallel(t.nested_with, [inner] * 2, max_workers=2, start_method="fork")
    assert out == [[3, 2, 1]] * 2


def test_inner_share_of_the_cpus() -> None:
    from parallelkit._util import context

    assert context.cpu_share() is None  # not a worker
    with pk.WorkerPool(1) as pool:
        # one outer worker: it may use every CPU for its own work
        assert pool.submit(_share).result() == pk.usable_cpu_count()
    with pk.WorkerPool(pk.usable_cpu_count() + 1) as pool:
        assert pool.submit(_share).result() == 1  # never less than one


def _share() -> int | None:
    from parallelkit._util import context

    return context.cpu_share()


def test_worker_pool_and_pipeline_in_a_task(start_method: StartMethod) -> None:
    with pk.WorkerPool(1, start_method=start_method) as pool:
        assert pool.submit(t.nested_pool, 3).result() == [3, 2, 1]
        assert pool.submit(t.nested_pipeline, 4).result() == [1, 2, 3]


def test_inner_imap_parallel_in_a_pipeline_stage(start_method: StartMethod) -> None:
    out = pk.Pipeline([2, 3], start_method=start_method).map(t.nested_sum).run()
    assert [total for total, _, _ in out] == [1, 5]


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until every pid has exited (they are not our children: pidfds); the living."""
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass  # gone already
    try:
        deadline = time.monotonic() + timeout
        while fds and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux 5.3)")
@pytest.mark.timeout(120)
def test_a_killed_worker_takes_its_children_with_it(
    start_method: StartMethod, tmp_path: Path
) -> None:
    fifo = tmp_path / "pids"
    os.mkfifo(fifo)
    with pk.WorkerPool(1, start_method=start_method) as pool:
        future = pool.submit(t.hold_children, str(fifo))
        with open(fifo) as f:  # opens when the task does: no polling
            worker, *below = (int(p) for p in f.readline().split())
        try:
            assert len(below) >= 2  # the inner pool's workers (and a forkserver's server)
        finally:
            os.kill(worker, signal.SIGKILL)
        with pytest.raises(pk.WorkerCrashedError):
            future.result(timeout=60)
        assert _wait_gone(below, 10.0) == []
        # the pool goes on, and nesting in its new worker still works
        assert pool.submit(t.nested_pool, 2).result() == [2, 1]
