"""Pipelines move large buffers through shared memory (issue 22, goal 5): the router routes
only where they are.  Every failure a region in flight can meet is made to happen here:
a stage SIGKILLed, a stage raising, the consumer stopping early, the parent SIGKILLed, no
room in shared memory; and items the consumer keeps are never written under.
The autouse leak check fails any test that leaves a segment behind.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import parallelkit as pk
import tasks.pipeline as w
from child import kill_group, package_env
from parallelkit import StartMethod, _platform
from parallelkit._pipeline import messages
from parallelkit._pipeline.messages import DONE, TASK
from parallelkit._wire import arena as _arena
from parallelkit._wire import shm as _shm
from parallelkit._wire.arena import ResultReader

TESTS = Path(__file__).resolve().parent
SHM = _platform.SEGMENT_DIR
MB = w.MB


def _segments() -> list[str]:
    return sorted(name for name in os.listdir(SHM) if _shm.NAME_RE.fullmatch(name))


def _ours(*pids: int) -> set[str]:
    prefixes = tuple(f"pk_{pid}_" for pid in pids)
    return {name for name in os.listdir(SHM) if name.startswith(prefixes)}


# ------------------------------------------------------------------ the message


def test_a_large_buffer_travels_in_shared_memory_not_in_the_message() -> None:
    writer = messages.shared_writer()
    reader = ResultReader()
    try:
        items: list[Any] = [w.payload(1), bytearray(w.payload(2)), 7, np.arange(MB // 8)]
        message = messages.encode(items, TASK, 5, len(items), writer=writer)
        assert message.buffers == []
        assert len(message.body) < 4096  # only where the buffers are
        assert message.size() >= 3 * MB  # ... but it weighs what it carries
        got = messages.decode(message, reader)
        assert [type(x) for x in got] == [bytes, bytearray, int, np.ndarray]
        assert got[:3] == items[:3]
        assert np.array_equal(got[3], items[3])
        home = writer.current
        assert home is not None
        home.collect()
        assert len(home.allocated) == 1  # the bytes were copied out; the array is still in use
        array = weakref.ref(got[3])
        del got
        gc.collect()
        assert array() is None  # nothing of ours holds it
        home.collect()
        assert home.allocated == []  # ... and its region went back with it
    finally:
        reader.close()
        writer.close(unlink=True)


def test_with_no_room_in_shared_memory_a_message_goes_in_band(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def full(self: object, size: int, *, heir: bool = True) -> None:
        raise OSError(errno.ENOSPC, "no room (forced by the test)")

    monkeypatch.setattr(_arena._ResultSegment, "__init__", full)
    writer = messages.shared_writer()
    items = [w.payload(i) for i in range(3)]
    message = messages.encode(items, DONE, 1, 3, writer=writer)
    assert message.size() >= 3 * MB
    assert messages.decode(message) == items  # no reader needed: nothing is shared
    assert _segments() == []
    writer.close(unlink=True)


# ------------------------------------------------------------------ pipelines


def test_large_items_cross_two_stages_intact(start_method: StartMethod) -> None:
    source = [w.payload(i) for i in range(12)]
    pipeline = pk.Pipeline(source, start_method=start_method)
    got = pipeline.map(w.reversed_bytes).map(w.identity, max_workers=2).run()
    assert [w.number_of(x) for x in got] == list(range(12))
    assert all(type(x) is bytes for x in got)
    arrays = [np.full(MB // 8, i, dtype=np.int64) for i in range(6)]
    out = pk.Pipeline(arrays, start_method=start_method).map(w.array_plus_one).run()
    assert [int(a[0]) for a in out] == [1, 2, 3, 4, 5, 6]
    assert all(a.flags.writeable and bool((a == a[0]).all()) for a in out)


def test_no_room_in_shared_memory_falls_back_to_the_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forced in the parent and (fork) in every stage: nothing is lost, nothing is left."""
    tried: list[int] = []

    def full(self: object, size: int, *, heir: bool = True) -> None:
        tried.append(size)
        raise OSError(errno.ENOSPC, "no room (forced by the test)")

    monkeypatch.setattr(_arena._ResultSegment, "__init__", full)
    source = [w.payload(i) for i in range(10)]
    got = pk.Pipeline(source, start_method="fork").map(w.reversed_bytes).map(w.identity).run()
    assert [w.number_of(x) for x in got] == list(range(10))
    assert tried  # the router tried (the stages did too, in their copies of the patch)


@pytest.mark.timeout(120)
def test_a_stage_sigkilled_with_regions_in_flight_leaves_nothing(
    start_method: StartMethod,
) -> None:
    """Stage 2 dies on payload 3: stage 1's regions are in flight to it, its own segment
    holds the outputs it sent before, the router's holds what it sent stage 1."""
    source = (w.payload(i) for i in range(40))
    pipeline = pk.Pipeline(source, start_method=start_method).map(w.identity, name="first")
    pipeline = pipeline.map(w.kill_self_on_payload_3, name="victim")
    with pytest.raises(pk.PipelineError, match="'victim'") as caught:
        for _ in pipeline:
            pass
    crash = caught.value.__cause__
    assert isinstance(crash, pk.WorkerCrashedError)
    assert crash.signal == "SIGKILL"
    assert _segments() == []


def test_a_stage_raising_on_a_large_item_leaves_nothing(start_method: StartMethod) -> None:
    source = (w.payload(i) for i in range(40))
    pipeline = pk.Pipeline(source, start_method=start_method).map(w.identity)
    pipeline = pipeline.map(w.fail_on_payload_3, name="picky")
    with pytest.raises(pk.PipelineError, match="'picky'") as caught:
        pipeline.run()
    assert isinstance(caught.value.__cause__, ValueError)
    assert _segments() == []


def test_a_consumer_that_stops_early_keeps_valid_items(start_method: StartMethod) -> None:
    arrays = (np.full(MB // 8, i, dtype=np.int64) for i in range(60))
    pipeline = pk.Pipeline(arrays, start_method=start_method).map(w.array_plus_one)
    kept = []
    with iter(pipeline.map(w.identity)) as results:
        for array in results:
            kept.append(array)
            if len(kept) == 3:
                break
    assert _segments() == []  # the run is over: every segment is unlinked ...
    # ... not unmapped: what the consumer kept is intact
    assert [int(a.sum()) for a in kept] == [(i + 1) * (MB // 8) for i in range(3)]
    bytes_source = (w.payload(i) for i in range(60))
    items = iter(pk.Pipeline(bytes_source, start_method=start_method).map(w.identity))
    assert w.number_of(next(items)) == 0
    items.close()
    assert _segments() == []


def test_arrays_the_consumer_keeps_are_never_written_under(start_method: StartMethod) -> None:
    """Every other array is kept while 200 more pass through the same stages: each keeps
    its own values (the writer never reuses a region whose array lives), and each array
    dropped is gone at once (nothing of the pipeline holds it)."""
    n = 200
    source = (np.full(64 * 1024, i, dtype=np.int64) for i in range(n))
    pipeline = pk.Pipeline(source, start_method=start_method).map(w.array_plus_one)
    kept: dict[int, Any] = {}
    dropped: list[weakref.ref[Any]] = []
    for i, array in enumerate(pipeline.map(w.identity)):
        assert int(array[0]) == i + 1
        if i % 2:
            kept[i] = array
        else:
            dropped.append(weakref.ref(array))
        del array
        # the iterator holds the batch it hands out, no older one
        assert all(ref() is None for ref in dropped[:-1])
    assert all(ref() is None for ref in dropped)
    assert len(kept) == n // 2
    for i, array in kept.items():
        assert bool((array == i + 1).all()), f"array {i} was written under"


@pytest.mark.timeout(90)
def test_a_sigkilled_parent_leaves_no_segment(start_method: StartMethod) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "scripts" / "pipeline_parent_death.py"), start_method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=package_env(str(TESTS)),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(b"SEGMENTS"), proc.stderr.read() if proc.stderr else ""
        workers = [int(pid) for pid in line.split()[1:]]
        created = _ours(proc.pid, *workers)
        assert _ours(proc.pid)  # the router's
        assert _ours(*workers)  # the stages'
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        if not _platform.OFFERS.dev_shm:  # portable mode: no tracker; stale once all died
            while any(map(_shm.pid_alive, workers)) and time.monotonic() < deadline:
                time.sleep(0.05)  # they die with their parent (no pid to wait on here)
            _shm.remove_stale_segments()  # what the tracker does on Linux (some may be gone:
            # a stage unlinks its own retired segments once they are given back)
        while _ours(proc.pid, *workers) and time.monotonic() < deadline:
            time.sleep(0.05)  # the resource tracker unlinks them once every process is gone
        assert not _ours(proc.pid, *workers), created
    finally:
        kill_group(proc)


@pytest.mark.timeout(90)
@pytest.mark.skipif(not _platform.OFFERS.dev_shm, reason="portable mode: no tracker is involved")
@pytest.mark.parametrize("point", ["shm.made", "shm.half_removed"])
@pytest.mark.parametrize("who", ["router", "stage"])
def test_a_parent_sigkilled_while_a_segment_is_made_or_removed_leaves_none(
    start_method: StartMethod, who: str, point: str, tmp_path: Path
) -> None:
    """The parent is SIGKILLed while the router (in it) or a stage worker (which dies with
    it) is held between the two steps of making a segment (the file, its registration with
    the resource tracker) or of removing one: once the tracker has exited, no file is left."""
    before = set(_segments())
    fifo = tmp_path / "held"
    os.mkfifo(fifo)
    script = str(TESTS / "scripts" / "pipeline_held_death.py")
    proc = subprocess.Popen(
        [sys.executable, script, start_method, who, point, str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=package_env(str(TESTS)),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == [b"TRACKER"], line
        tracker = os.pidfd_open(int(line[1]))
        try:
            with open(fifo) as held:  # returns once the holder is at the point
                holder = int(held.readline())
            assert holder == proc.pid if who == "router" else holder != proc.pid
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
            # the tracker cleans up and exits once every process holding its pipe is gone
            readable, _, _ = select.select([tracker], [], [], 60)
            assert readable, "the resource tracker did not exit"
        finally:
            os.close(tracker)
        assert set(_segments()) - before == set()
    finally:
        kill_group(proc)


@pytest.mark.timeout(90)
@pytest.mark.skipif(not _platform.OFFERS.dev_shm, reason="portable mode: no tracker is involved")
@pytest.mark.parametrize("point", ["shm.made", "shm.half_removed"])
def test_a_stage_sigkilled_while_a_segment_is_made_or_removed_leaves_the_tracker_settled(
    start_method: StartMethod, point: str, tmp_path: Path
) -> None:
    """A stage SIGKILLed between the two steps of making or removing one of its segments,
    its parent alive: the parent removes what it left and settles the resource tracker
    (whose stderr is the script's), which then has nothing to report: no name it holds
    without a file, no leak."""
    before = set(_segments())
    fifo = tmp_path / "held"
    os.mkfifo(fifo)
    script = str(TESTS / "scripts" / "pipeline_held_death.py")
    env = package_env(str(TESTS))
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, script, start_method, "stage-killed", point, str(fifo)],
        check=False,
        capture_output=True,
        text=True,
        timeout=80,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[2:] == ["CRASHED"], proc.stdout
    assert proc.stderr == ""
    assert set(_segments()) - before == set()


def test_a_process_forked_from_one_with_a_ledger_keeps_none() -> None:
    """A stage's own children (the workers of a pool it runs under fork, say) are not its
    parent's to settle: they must not write into the stage's slot of the ledger."""
    slot = memoryview(bytearray(_shm.LEDGER_SLOT))
    _shm.keep_ledger(slot)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0 if _shm._ledger is None else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        _shm.keep_ledger(None)
    assert os.waitstatus_to_exitcode(status) == 0
