"""The Dask backend on real clusters: in-process, a process-based LocalCluster, and a separate
``dask scheduler`` with two ``dask worker`` processes on 127.0.0.1.

The conformance tests of ``test_backends.py`` run here too (imported below, with the
``backend`` fixture overridden), on the in-process and the LocalCluster clients.

Clusters take seconds to start, so each is a module-scoped fixture shared by the tests.
Dask clients start threads (an event loop, a process-wide offload pool) that outlive any
single test, so the tests here are marked ``no_leak_check``; instead ``_nothing_left``
wraps the whole module in the same leak check, after every cluster has been closed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed", reason="Dask is not installed (extra: dask)")

import dask  # noqa: E402

import child  # noqa: E402
import parallelkit as pk  # noqa: E402
import tasks.args as wa  # noqa: E402
import tasks.basic as w  # noqa: E402
import tasks.pipeline as wp  # noqa: E402
from parallelkit.testing import check_no_leaks  # noqa: E402

Options = dict[str, object]


# Reason: Dask's threads live as long as the module's clusters; see the module docstring.
pytestmark = pytest.mark.no_leak_check

Client = Any  # distributed.Client; the tests only call its public methods

# Without a dashboard the scheduler still serves a few HTTP routes, on port 8787 unless told
# otherwise: a random port instead, so that a busy 8787 (a warning, hence an error) is moot.
NO_FIXED_PORT = {"dashboard_address": "127.0.0.1:0"}


@pytest.fixture(scope="module", autouse=True)
def _nothing_left() -> Iterator[None]:
    """The leak check, around the whole module: no process or thread outlives it."""
    with check_no_leaks(grace=15.0, kill=True):
        yield
        # distributed keeps one process-wide "Dask-Offload" thread once it has been used;
        # no Dask test runs after this module, so stop it (later fork-based tests would
        # otherwise fork with a foreign thread running).
        from distributed import utils

        utils._offload_executor.shutdown(wait=True)


@pytest.fixture(scope="module")
def inproc_client() -> Iterator[Client]:
    with distributed.Client(
        processes=False,
        n_workers=1,
        threads_per_worker=2,
        dashboard_address=None,
        scheduler_kwargs=NO_FIXED_PORT,
    ) as client:
        yield client


@pytest.fixture(scope="module")
def cluster_client() -> Iterator[Client]:
    # A worker death fails the task at once (no retries): the crash test below needs that.
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            scheduler_kwargs=NO_FIXED_PORT,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture(params=["inproc", "local-cluster"])
def backend(request: pytest.FixtureRequest) -> Options:
    """Overrides test_backends' fixture: the conformance suite on two Dask clusters."""
    name = "inproc_client" if request.param == "inproc" else "cluster_client"
    return {"backend": request.getfixturevalue(name)}


# ------------------------------------------------------------------ a separate cluster


class RemoteCluster:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.scheduler_file = directory / "scheduler.json"
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        # cwd is a bare temporary directory: the workers cannot import the tests' modules,
        # so a test function only runs there because it is sent by value.
        dask_cli = [sys.executable, "-m", "dask"]
        scheduler = (
            "scheduler --host 127.0.0.1 --port 0 --no-dashboard --dashboard-address 127.0.0.1:0 "
            "--idle-timeout 120s"
        )
        self.scheduler = self._popen(
            [*dask_cli, *scheduler.split(), "--scheduler-file", str(self.scheduler_file)]
        )
        deadline = time.monotonic() + 30
        while not self.scheduler_file.exists() or not self.scheduler_file.read_text():
            assert time.monotonic() < deadline, "the Dask scheduler did not start"
            assert self.scheduler.poll() is None, "the Dask scheduler exited"
            time.sleep(0.05)
        address = json.loads(self.scheduler_file.read_text())["address"]
        worker = "--host 127.0.0.1 --nthreads 1 --no-nanny --no-dashboard --death-timeout 10s"
        for i in range(2):
            self.workers.append(
                self._popen([*dask_cli, "worker", address, *worker.split(), "--name", f"w{i}"])
            )

    def _popen(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop(self) -> None:
        procs = [*self.workers, *([self.scheduler] if self.scheduler else [])]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="class")
def remote_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    cluster = RemoteCluster(tmp_path_factory.mktemp("dask"))
    try:
        cluster.start()
        with distributed.Client(scheduler_file=str(cluster.scheduler_file), timeout=30) as client:
            client.wait_for_workers(2, timeout=30)
            yield client
    finally:
        cluster.stop()


class TestSeparateCluster:
    """A ``dask scheduler`` and two ``dask worker`` processes, for this class only (first in
    the module, so that the cluster is gone before the others start)."""

    def test_results_and_errors_on_a_separate_cluster(self, remote_client: Client) -> None:
        items = list(range(500))
        assert pk.run_parallel(w.square, items, backend=remote_client) == [x * x for x in items]
        got = pk.run_parallel(
            w.fail_on_multiples_of_seven,
            range(1, 20),
            backend=remote_client,
            return_exceptions=True,
        )
        assert isinstance(got[6], ValueError)
        assert any(
            "on Dask worker tcp://127.0.0.1" in n and "item 6" in n for n in got[6].__notes__
        )
        assert [v for i, v in enumerate(got) if i not in (6, 13)] == [
            x for x in range(1, 20) if x % 7
        ]

    def test_a_pipeline_runs_on_the_cluster(self, remote_client: Client) -> None:
        pipeline = pk.Pipeline(range(100)).map(wp.square).filter(wp.is_even).flat_map(wp.twice)
        expected = [y for x in range(100) if x % 2 == 0 for y in (x * x, x * x)]
        assert pipeline.run(backend=remote_client) == expected

    def test_a_lambda_and_a_closure_travel_by_value(self, remote_client: Client) -> None:
        offset = 3
        got = pk.run_parallel(lambda x: x + offset, range(5), backend=remote_client)
        assert got == [3, 4, 5, 6, 7]

    def test_unpacked_items_travel_by_value(self, remote_client: Client) -> None:
        # star() and with_args() of the tests' own functions, which the workers cannot import
        pairs = [(2, 3), (3, 2)]
        assert pk.run_parallel(pk.star(wa.power), pairs, backend=remote_client) == [8, 9]
        call = pk.with_args(wa.affine, 2, offset=1)
        assert pk.run_parallel(call, [1, 2], backend=remote_client) == [3, 5]

    def test_killing_a_worker_mid_task_is_retried_elsewhere(self, remote_client: Client) -> None:
        # Last in the class: it leaves the separate cluster with one worker.
        result: list[object] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                result.extend(
                    pk.run_parallel(w.sleep_for, [1.0, 1.0], backend=remote_client, chunksize=1)
                )
            except BaseException as exc:
                failure.append(exc)

        pids: dict[str, int] = remote_client.run(os.getpid)
        thread = threading.Thread(target=run)
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while sum(len(v) for v in remote_client.processing().values()) < 2:
                assert time.monotonic() < deadline, "the tasks never started"
                time.sleep(0.02)
            time.sleep(0.2)  # well inside the tasks' one second
            busy = next(a for a, keys in remote_client.processing().items() if keys)
            os.kill(pids[busy], signal.SIGKILL)
        finally:
            thread.join(30)
        assert not thread.is_alive()
        assert not failure
        assert result == [1.0, 1.0]
        with contextlib.suppress(Exception):
            remote_client.wait_for_workers(1, timeout=5)
        assert len(remote_client.scheduler_info()["workers"]) == 1


# ------------------------------------------------------------------ Dask specifics


def _memory_keys(dask_scheduler: Any) -> list[str]:
    """On the scheduler: every key that was computed (reached memory), per its log."""
    return [str(entry[0]) for entry in dask_scheduler.transition_log if entry[2] == "memory"]


def test_one_task_per_chunk_with_unique_keys(inproc_client: Client) -> None:
    before = set(inproc_client.run_on_scheduler(_memory_keys))
    first = pk.run_parallel(w.square, range(1000), backend=inproc_client, chunksize=100)
    second = pk.run_parallel(w.square, range(1000), backend=inproc_client, chunksize=100)
    assert first == second == [x * x for x in range(1000)]
    computed = [k for k in inproc_client.run_on_scheduler(_memory_keys) if k not in before]
    chunks = [k for k in computed if k.startswith("parallelkit-square-")]
    functions = [k for k in computed if k.startswith("parallelkit-fn-square-")]
    # 10 chunks per call, each its own task; the identical second call was not merged with
    # the first; the function went to the cluster once per call
    assert len(chunks) == len(set(chunks)) == 20
    assert len(functions) == 2
    # and released: nothing of ours stays in the cluster's memory (releasing is
    # asynchronous, hence the polling)
    deadline = time.monotonic() + 10
    while [k for k in inproc_client.who_has() if str(k).startswith("parallelkit")]:
        assert time.monotonic() < deadline, "parallelkit's tasks were not released"
        time.sleep(0.02)


def test_imap_keeps_a_bounded_number_of_tasks_in_flight(inproc_client: Client) -> None:
    seen: list[int] = []
    with pk.imap_parallel(w.square, iter(range(10_000)), backend=inproc_client) as it:
        for value in it:
            seen.append(value)
            if len(seen) in (1, 100):
                processing = inproc_client.processing()
                in_flight = sum(len(v) for v in processing.values())
                assert in_flight <= 2 * 2  # 2 x the cluster's threads
            if len(seen) == 200:
                break
    assert seen == [x * x for x in range(200)]


def test_a_worker_that_keeps_dying_names_the_item(cluster_client: Client) -> None:
    with pytest.raises(pk.WorkerCrashedError, match="item 13") as info:
        pk.run_parallel(w.kill_13, range(20), backend=cluster_client, chunksize=5)
    assert info.value.item_index == 13
    assert isinstance(info.value.__cause__, distributed.KilledWorker)
    cluster_client.wait_for_workers(2, timeout=30)  # the nannies restarted them
    got = pk.run_parallel(
        w.kill_13, range(20), backend=cluster_client, chunksize=5, return_exceptions=True
    )
    assert isinstance(got[13], pk.WorkerCrashedError)
    assert got[13].item_index == 13
    assert [v for i, v in enumerate(got) if i != 13] == [x for x in range(20) if x != 13]
    cluster_client.wait_for_workers(2, timeout=30)


def test_single_host_objects_cannot_go_to_a_cluster(inproc_client: Client) -> None:
    with contextlib.ExitStack() as stack:
        counter = stack.enter_context(pk.SharedCounter())
        shared_objects: list[Any] = [counter, stack.enter_context(pk.SharedAccumulator("max"))]
        here, there = pk.channel_pair()
        stack.callback(here.close)
        stack.callback(there.close)
        shared_objects.append(there)
        with contextlib.suppress(ImportError):  # the numpy extra
            import numpy as np

            shared_objects.append(stack.enter_context(pk.SharedArray.from_array(np.zeros(3))))
        for shared in shared_objects:
            name = type(shared).__name__
            with pytest.raises(pk.SerializationError, match=f"a {name} lives in this machine"):
                pk.run_parallel(
                    functools.partial(wp.count_into, shared), [1], backend=inproc_client
                )
            with pytest.raises(pk.SerializationError, match="cannot be sent to a Dask cluster"):
                pk.run_parallel(wp.add_item, [(shared, 1)], backend=inproc_client)
        with pytest.raises(pk.SerializationError, match="SharedCounter"):
            pk.Pipeline([1, 2]).map(functools.partial(wp.count_into, counter)).run(
                backend=inproc_client
            )
        assert counter.value == 0  # nothing ran
        # the same objects still go to processes (by reference), as before
        pk.run_parallel(
            functools.partial(wp.count_into, counter),
            [1, 2],
            max_workers=1,
            start_method="forkserver",  # not fork: Dask's threads are running
        )
        assert counter.value == 3


def test_missing_dask_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"pip install 'parallelkit\[dask\]'"):
        pk.run_parallel(w.square, [1], backend="dask")


def test_backend_dask_uses_the_current_client(inproc_client: Client) -> None:
    with inproc_client.as_current():
        assert pk.run_parallel(w.square, range(10), backend="dask") == [x * x for x in range(10)]


# ------------------------------------------------------------------ errors in our words


@pytest.mark.timeout(120)
@pytest.mark.parametrize("call", ["pipeline", "run_parallel", "imap_parallel"])
def test_closing_the_client_during_a_call_is_a_clear_error(
    inproc_client: Client, call: str
) -> None:
    # a client of its own on the module's cluster, closed by the caller half-way through
    client = distributed.Client(inproc_client.scheduler.address)

    def close_client(progress: pk.Progress) -> None:  # the caller's thread, mid-call
        if progress.done >= 1 and client.status == "running":
            client.close()

    def run() -> None:
        items = range(12)
        if call == "pipeline":
            pk.Pipeline(items, progress=close_client).map(wp.sleepy).run(backend=client)
        elif call == "run_parallel":
            pk.run_parallel(w.sleep_a_bit, items, backend=client, progress=close_client)
        else:
            for value in pk.imap_parallel(w.sleep_a_bit, items, backend=client, chunksize=1):
                if value == 0:
                    client.close()

    with pytest.raises(pk.ParallelKitError, match="Dask client was closed") as caught:
        run()
    assert type(caught.value) is pk.ParallelKitError  # not Dask's own error ...
    assert caught.value.__cause__ is not None  # ... which is its cause
    client.close()
    assert pk.run_parallel(w.square, range(3), backend=inproc_client) == [0, 1, 4]


_MAIN_MODULE_ERROR = """
import sys
import distributed
import parallelkit as pk

class MyErr(Exception):
    pass

def fail_on_3(x):
    if x == 3:
        raise MyErr(f"bad {x}")
    return x

if __name__ == "__main__":
    with distributed.Client(
        processes=True, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:
        for backend in ("fork", "spawn", "thread", "serial", client):
            options = {"start_method": backend} if backend in ("fork", "spawn") else {}
            run = {} if backend in ("fork", "spawn") else {"backend": backend}
            try:
                pk.Pipeline(range(6), **options).map(fail_on_3).run(**run)
            except pk.PipelineError as exc:
                print("pipeline", str(exc))
"""


@pytest.mark.timeout(180)
def test_an_exception_class_of_the_main_module_is_named_alike_everywhere(
    tmp_path: Path,
) -> None:
    script = tmp_path / "main_error.py"
    script.write_text(_MAIN_MODULE_ERROR)
    done = child.run_python(str(script), timeout=150, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    pipeline = [line for line in lines if line.startswith("pipeline ")]
    assert len(pipeline) == 5, done.stdout
    # the Dask workers import the script as __mp_main__; it is MyErr there too
    assert set(pipeline) == {"pipeline stage 'map(fail_on_3)' failed on item 3: MyErr: bad 3"}


# ------------------------------------------------------------------ conformance
# Imported last, so that they run after the classes above (pytest collects in module order).
from test_args import (  # noqa: E402
    test_a_non_tuple_item_is_a_type_error_naming_its_index,
    test_a_pipeline_stage_unpacks_on_every_backend,
    test_an_unpacked_calls_exception_keeps_its_type_and_names_the_item,
    test_extra_arguments_for_every_call,
    test_star_kwargs_unpacks_each_mapping,
    test_star_unpacks_each_item,
)
from test_backends import (  # noqa: E402
    test_a_pipeline_runs_on_every_backend,
    test_a_pipeline_stage_error_names_the_stage_and_item,
    test_bad_options_raise_the_same_error,
    test_breaking_out_of_imap_stops_promptly,
    test_empty_input,
    test_exception_keeps_type_and_names_the_item,
    test_exception_with_constructor_arguments_arrives_intact,
    test_generators_and_explicit_chunksizes,
    test_imap_raises_the_items_exception,
    test_imap_streams_an_endless_generator_and_closes_early,
    test_results_equal_map,
    test_return_exceptions_fills_the_failed_slots,
    test_start_method_and_initializer_only_where_there_are_processes,
    test_system_exit_is_the_items_exception,
    test_timeout_fails_exactly_the_late_item,
    test_unordered_is_the_same_multiset,
)

# The imported tests are collected (and run) here as well, on Dask.
__all__ = (
    "test_a_non_tuple_item_is_a_type_error_naming_its_index",
    "test_a_pipeline_runs_on_every_backend",
    "test_a_pipeline_stage_error_names_the_stage_and_item",
    "test_a_pipeline_stage_unpacks_on_every_backend",
    "test_an_unpacked_calls_exception_keeps_its_type_and_names_the_item",
    "test_bad_options_raise_the_same_error",
    "test_breaking_out_of_imap_stops_promptly",
    "test_empty_input",
    "test_exception_keeps_type_and_names_the_item",
    "test_exception_with_constructor_arguments_arrives_intact",
    "test_extra_arguments_for_every_call",
    "test_generators_and_explicit_chunksizes",
    "test_imap_raises_the_items_exception",
    "test_imap_streams_an_endless_generator_and_closes_early",
    "test_results_equal_map",
    "test_return_exceptions_fills_the_failed_slots",
    "test_star_kwargs_unpacks_each_mapping",
    "test_star_unpacks_each_item",
    "test_start_method_and_initializer_only_where_there_are_processes",
    "test_system_exit_is_the_items_exception",
    "test_timeout_fails_exactly_the_late_item",
    "test_unordered_is_the_same_multiset",
)
