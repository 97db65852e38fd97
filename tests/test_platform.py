"""The platform seam (``parallelkit._platform``): each portable fallback run for real on Linux.

Each test forces one facility's fallback -- in a fresh interpreter with
``PARALLELKIT_PORTABLE=<facility>`` (so that every child, under every start method,
inherits it), or in this process by replacing ``_platform.OFFERS`` where only the parent
uses the facility -- and makes the thing the facility serves happen.  CI also runs the
whole suite with ``PARALLELKIT_PORTABLE=1``.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import parallelkit as pk
import tasks.auto as tasks_auto
from child import TESTS, package_env, run_python
from parallelkit import _platform
from parallelkit._wire import direct as _direct
from parallelkit._wire import stream as _stream

SCRIPT = str(Path(TESTS) / "scripts" / "platform_fallback.py")
LINUX_ONLY = pytest.mark.skipif(not _platform.LINUX, reason="the fast paths are Linux's")


def _env(tmp_path: Path, forced: str) -> dict[str, str]:
    # a private TMPDIR: the portable segment directory is this test's alone
    return package_env(TESTS, PARALLELKIT_PORTABLE=forced, TMPDIR=str(tmp_path))


def _run(tmp_path: Path, facility: str, *, forced: str | None = None) -> dict[str, Any]:
    result = run_python(SCRIPT, facility, timeout=240, env=_env(tmp_path, forced or facility))
    assert result.returncode == 0, result.stderr
    seen: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    assert seen["offered"] is False  # the fallback ran, not the fast path
    return seen


def _maps_ok(seen: dict[str, Any]) -> None:
    for method, what in seen["maps"].items():
        assert what == {"squares": True, "stack": True, "note": ""}, method


def _without(monkeypatch: pytest.MonkeyPatch, **facilities: bool) -> None:
    monkeypatch.setattr(_platform, "OFFERS", _platform.OFFERS._replace(**facilities))


# ------------------------------------------------------------------ deciding


def test_portable_mode_forces_every_fallback() -> None:
    assert _platform._forced("1") == frozenset(_platform.FACILITIES)
    assert _platform._forced("") == frozenset()
    assert _platform._forced("0") == frozenset()
    assert _platform._forced("memfd, pidfd") == {"memfd", "pidfd"}
    offers = _platform.decide(frozenset(_platform.FACILITIES))
    assert offers.portable
    assert not any(getattr(offers, name) for name in _platform.FACILITIES)


def test_an_unknown_facility_is_refused_at_import_naming_the_valid_ones(tmp_path: Path) -> None:
    result = run_python("-c", "import parallelkit", timeout=60, env=_env(tmp_path, "memfd,nosuch"))
    assert result.returncode != 0
    assert "PARALLELKIT_PORTABLE='memfd,nosuch': unknown facilities nosuch" in result.stderr
    assert "pidfd" in result.stderr


def test_windows_is_refused_at_import_naming_what_works(tmp_path: Path) -> None:
    # what `import parallelkit` does where sys.platform says Windows
    script = "import sys\nsys.platform = 'win32'\nimport parallelkit\n"
    result = run_python("-c", script, timeout=60, env=_env(tmp_path, "0"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: parallelkit runs on POSIX systems only (Linux, and macOS")
    assert "WSL 2" in last
    assert "concurrent.futures.ProcessPoolExecutor" in last


@LINUX_ONLY
def test_linux_offers_every_fast_path_unless_portable() -> None:
    if _platform.FORCED:  # the CI's portable run: what it says is what it gets
        assert _platform.decide(_platform.FORCED) == _platform.OFFERS
        return
    assert not _platform.OFFERS.portable
    assert _platform.OFFERS.dev_shm
    assert Path("/dev/shm") == _platform.SEGMENT_DIR


# ------------------------------------------------------------------ each fallback


@LINUX_ONLY
def test_memfd_fallback_an_unlinked_file_serves_slots_queue_and_stack_dumps(
    tmp_path: Path,
) -> None:
    seen = _run(tmp_path, "memfd")
    assert seen["forced"] == ["memfd"]
    assert seen["links"] == 0  # no name: gone with its last descriptor
    assert seen["cloexec"]
    assert seen["target"].startswith(f"{_platform.DEV_SHM}/parallelkit-probe-")  # dev_shm on
    assert seen["target"].endswith("(deleted)")
    assert seen["queue"] == [0, 1, 2, 3, 4]
    _maps_ok(seen)  # progress slots under spawn/forkserver, stacks read through /proc


@LINUX_ONLY
def test_dev_shm_fallback_segments_are_files_in_a_private_directory(tmp_path: Path) -> None:
    seen = _run(tmp_path, "dev_shm")
    assert seen["dir"] == str(tmp_path / f"parallelkit-{os.getuid()}")
    assert seen["mode"] == 0o700
    assert seen["exists"]
    assert seen["gone"]  # the creator's close unlinked it
    assert seen["added"] == [2, 2, 2]
    _maps_ok(seen)
    assert os.listdir(seen["dir"]) == []  # nothing left (the arena's segments included)


def test_the_portable_directory_must_be_private(tmp_path: Path) -> None:
    shared = tmp_path / f"parallelkit-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # as another user could have made it
    result = run_python(
        "-c",
        "import parallelkit as pk; pk.SharedCounter()",
        timeout=60,
        env=_env(tmp_path, "dev_shm"),
    )
    assert result.returncode != 0
    assert "is not a private directory of this user" in result.stderr


@LINUX_ONLY
def test_fallocate_fallback_writes_the_whole_size(tmp_path: Path) -> None:
    seen = _run(tmp_path, "fallocate")
    assert seen["size"] == 3 << 20
    assert seen["allocated"] >= 3 << 20  # every page backed now: no SIGBUS later


def test_fallocate_fallback_no_room_is_an_oserror_not_a_sigbus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _without(monkeypatch, fallocate=False)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    writes: list[int] = []

    def full(fd: int, data: bytes, offset: int) -> int:
        writes.append(offset)
        if offset >= 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", full)
    try:
        with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)) as caught:
            _platform.reserve(fd, 3 << 20)
        assert caught.value.errno == errno.ENOSPC
        assert writes == [0, 1 << 20]
    finally:
        os.close(fd)


@LINUX_ONLY
def test_affinity_fallback_counts_the_machines_cpus(tmp_path: Path) -> None:
    seen = _run(tmp_path, "affinity")
    assert seen["usable"] == min(seen["cpu_count"], _cgroup_cap())
    fast = run_python(SCRIPT, "affinity", timeout=60, env=_env(tmp_path, "0"))
    assert fast.returncode == 0, fast.stderr
    if not _platform.FORCED:
        assert json.loads(fast.stdout.splitlines()[-1])["usable"] == 1  # the mask


def _cgroup_cap() -> int:
    from parallelkit._util.context import _cgroup_cpu_quota

    return _cgroup_cpu_quota() or sys.maxsize


@LINUX_ONLY
@pytest.mark.parametrize("facility", ["madvise", "process_vm", "sockbuf", "pidfd"])
def test_parent_side_fallbacks_run_maps_under_every_start_method(
    tmp_path: Path, facility: str
) -> None:
    _maps_ok(_run(tmp_path, facility))


@LINUX_ONLY
def test_seqpacket_fallback_log_records_go_as_datagrams_whole_under_every_start_method(
    tmp_path: Path,
) -> None:
    # (test_logs.py runs the fallback with macOS's small datagrams: records in pieces)
    seen = _run(tmp_path, "seqpacket")
    assert seen["type"] == socket.SOCK_DGRAM
    assert seen["logs"] == {"fork": True, "forkserver": True, "spawn": True}


NO_MSG_NOSIGNAL = """
import socket
del socket.MSG_NOSIGNAL  # as on macOS
import multiprocessing
import parallelkit as pk
from tasks import basic as wb
from tasks import channel as wc
from tasks import queue as wq

if __name__ == "__main__":
    assert pk.run_parallel(wb.square, range(20), max_workers=2, start_method="fork") == [
        x * x for x in range(20)
    ]
    with pk.start_process(wc.echo, start_method="fork") as child:
        assert child.request("hi", timeout=30) == "hi"
    queue = pk.Queue(start_method="fork")
    producer = multiprocessing.get_context("fork").Process(target=wq.produce, args=(queue, 0, 5))
    producer.start()
    assert [queue.get(timeout=30) for _ in range(5)] == [0, 1, 2, 3, 4]
    producer.join(30)
    print("ok")
"""


def test_a_socket_module_without_msg_nosignal_imports_and_runs(tmp_path: Path) -> None:
    # macOS's socket module has no MSG_NOSIGNAL (it has the SO_NOSIGPIPE option)
    result = run_python("-c", NO_MSG_NOSIGNAL, timeout=120, env=_env(tmp_path, "0"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]


@pytest.mark.timeout(60)
def test_preadv_fallback_a_queues_large_message_arrives(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # as on macOS before 11: no os.preadv at all (the consumer reads the message's file)
    _without(monkeypatch, preadv=False)
    monkeypatch.delattr(os, "preadv")
    big = bytes(range(256)) * (12 << 12)  # 12 MB: travels in an anonymous file
    queue: pk.Queue[object] = pk.Queue(start_method="fork")
    try:
        queue.put(["x" * (8 << 20), big])
        assert queue.get(timeout=30) == ["x" * (8 << 20), big]
    finally:
        queue.close()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"0123456789")
        into = bytearray(6)
        assert _platform.pread_into(fd, memoryview(into)[1:], 7) == 3
        assert into == b"\x00789\x00\x00"
    finally:
        os.close(fd)


def test_process_vm_fallback_results_travel_in_band(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, process_vm=False)
    monkeypatch.setattr(_direct, "_SYSCALL", None)
    assert not _direct.enabled()
    with pytest.raises(_direct.Unreadable) as caught:
        _direct.read(os.getpid(), [(0, 1)])
    assert caught.value.errno == errno.ENOSYS


def test_madvise_fallback_leaves_the_pages_to_the_last_mapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without(monkeypatch, madvise=False)
    mm = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        assert not _platform.dont_fork(mm)
        assert not _platform.free_pages(mm, 0, mmap.PAGESIZE)
    finally:
        mm.close()


def test_sockbuf_fallback_a_fixed_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, sockbuf=False)
    a, b = socket.socketpair()
    with a, b:
        assert _stream.widen(a) == _stream.ROOM_FLOOR  # was _map.handle.pipe_room (now widen)
        assert _stream.widen(a) == _stream.ROOM_FLOOR


def test_sockbuf_fallback_a_queues_receiver_takes_its_largest_datagram(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # where the receiver's buffer limits a datagram (macOS: 4 KB by default), the
    # consumers' end has its buffer raised and no message sent inline exceeds it
    from parallelkit._queue import datagrams

    _without(monkeypatch, sockbuf=False)
    sock, peer, inline_max = datagrams.socket_pair()
    with sock, peer:
        received = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert received >= datagrams.SOCKET_BUFFER
        assert inline_max <= received // 4


def test_pidfd_fallback_gives_no_descriptor(monkeypatch: pytest.MonkeyPatch) -> None:
    # test_lifecycle.py runs the waits without pidfds (1 ms sleeps, no spinning)
    _without(monkeypatch, pidfd=False)
    assert _platform.pidfd_open(os.getpid()) is None


@LINUX_ONLY
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pdeathsig_fallback_workers_die_with_their_sigkilled_parent(
    tmp_path: Path, method: str
) -> None:
    # fork and spawn children would be tied to the parent by PR_SET_PDEATHSIG; without
    # it a thread waiting on the parent's sentinel ends them
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "pdeathsig", method],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(tmp_path, "pdeathsig"),
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        pids = json.loads(proc.stdout.readline())["pids"]
        assert pids
        watches = [os.pidfd_open(pid) for pid in pids]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        try:
            for fd in watches:  # readable once the worker has exited
                assert select.select([fd], [], [], 60)[0], "a worker outlived its parent"
        finally:
            for fd in watches:
                os.close(fd)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


_QUEUED = """
import os, time
from parallelkit import _platform
cpu = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cpu})  # the child below inherits the one CPU
rival = os.fork()
if rival == 0:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        pass
    os._exit(0)
try:
    before = _platform.run_queue_seconds()
    spent = time.thread_time() + 0.5
    while time.thread_time() < spent:  # half a second of CPU, taking turns with the rival
        pass
    print(_platform.run_queue_seconds() - before)
finally:
    os.kill(rival, 9)
    os.waitpid(rival, 0)
"""


@LINUX_ONLY
@pytest.mark.timeout(120)
def test_schedstat_counts_the_time_a_busy_thread_waits_for_a_cpu() -> None:
    # backend="auto" adds this wait to the probe's CPU time: a busy item on a loaded
    # machine is not an item waiting for I/O
    result = run_python("-c", _QUEUED, timeout=100)
    assert result.returncode == 0, result.stderr
    queued = float(result.stdout)
    if _platform.OFFERS.schedstat:
        assert queued > 0.05  # it shared one CPU with a spinning process for 0.5 s of its own
    else:  # the CI's portable run
        assert queued == 0.0


def test_schedstat_fallback_auto_still_measures_and_chooses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without(monkeypatch, schedstat=False)
    assert _platform.run_queue_seconds() == 0.0
    seen: list[pk.MapStats] = []
    results = pk.run_parallel(
        tasks_auto.spin, range(40), backend="auto", max_workers=2, on_stats=seen.append
    )
    assert [r[0] for r in results] == list(range(40))
    assert seen
    assert seen[0].choice is not None
    assert seen[0].choice.probed > 0


@pytest.mark.timeout(60)
def test_schedstat_tells_a_blocked_thread_from_a_running_one() -> None:
    blocked = threading.Event()
    thread = threading.Thread(target=blocked.wait, args=(30,))
    thread.start()
    try:
        assert thread.native_id is not None
        # it has blocked once its state says so (a thread starting up is runnable)
        while _platform.runnable(thread.native_id):
            time.sleep(0.001)
        assert not _platform.runnable(thread.native_id)
        # this thread, reading, runs
        assert _platform.runnable(threading.get_native_id()) == _platform.OFFERS.schedstat
    finally:
        blocked.set()
        thread.join()
