"""Start methods, the default worker count (affinity and cgroup quota) and contexts."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

import parallelkit
from child import TESTS, package_env, run_python
from parallelkit import StartMethod, _platform
from parallelkit._util import context as _context
from parallelkit._util.checks import resolve_max_workers, resolve_start_method
from parallelkit._util.context import (
    ALL_START_METHODS,
    _cgroup_cpu_quota,
    available_start_methods,
    default_start_method,
    get_context,
    usable_cpu_count,
)
from parallelkit.errors import StartMethodError

# ------------------------------------------------------------------------------ start methods


def test_all_three_start_methods_are_known() -> None:
    assert ALL_START_METHODS == ("fork", "forkserver", "spawn")


def test_available_start_methods_are_the_platform_ones_in_order() -> None:
    offered = multiprocessing.get_all_start_methods()
    available = available_start_methods()
    assert available
    assert set(available) == set(offered) & set(ALL_START_METHODS)
    assert list(available) == sorted(available, key=ALL_START_METHODS.index)


def test_default_start_method_is_the_platform_default() -> None:
    assert default_start_method() == multiprocessing.get_context().get_start_method()
    assert default_start_method() in available_start_methods()


def test_none_resolves_to_the_default() -> None:
    assert resolve_start_method(None) == default_start_method()


def test_each_available_method_resolves_to_itself(start_method: StartMethod) -> None:
    assert resolve_start_method(start_method) == start_method
    assert get_context(start_method).get_start_method() == start_method


@pytest.mark.parametrize("bad", ["frok", "", "FORK", "thread"])
def test_unknown_start_method_error_lists_the_valid_choices(bad: str) -> None:
    with pytest.raises(StartMethodError) as info:
        resolve_start_method(bad)
    message = str(info.value)
    assert f"unknown start method {bad!r}" in message
    for method in available_start_methods():
        assert repr(method) in message
    assert "None" in message


def test_start_method_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="valid choices"):
        resolve_start_method("frok")
    with pytest.raises(ValueError, match="valid choices"):
        get_context("frok")


def test_unavailable_start_method_is_called_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a platform without fork (Windows): a known name that is not offered here.
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(StartMethodError, match="unavailable start method 'fork'") as info:
        resolve_start_method("fork")
    assert "'spawn'" in str(info.value)
    assert "'forkserver'" not in str(info.value)


def test_get_context_does_not_touch_the_global_start_method(start_method: StartMethod) -> None:
    before = multiprocessing.get_start_method(allow_none=True)
    get_context(start_method)
    assert multiprocessing.get_start_method(allow_none=True) == before


# ------------------------------------------------------------------------------ max_workers


def test_max_workers_none_is_the_usable_cpu_count() -> None:
    assert resolve_max_workers(None) == usable_cpu_count()


@pytest.mark.parametrize("count", [1, 2, 7, 64])
def test_positive_max_workers_is_kept(count: int) -> None:
    assert resolve_max_workers(count) == count


@pytest.mark.parametrize("count", [0, -1, -100])
def test_zero_or_negative_max_workers_is_a_value_error(count: int) -> None:
    with pytest.raises(ValueError, match=r"positive int or None") as info:
        resolve_max_workers(count)
    assert str(count) in str(info.value)
    assert f"usable CPU count, {usable_cpu_count()} here" in str(info.value)


@pytest.mark.parametrize("value", [True, 1.5, "2", b"2"])
def test_non_int_max_workers_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError, match="max_workers must be a positive int or None"):
        resolve_max_workers(value)  # type: ignore[arg-type]  # the wrong type on purpose


# ------------------------------------------------------------------------------ CPU count


def test_usable_cpu_count_is_positive_and_at_most_the_machine() -> None:
    count = usable_cpu_count()
    assert 1 <= count <= (os.cpu_count() or count)
    assert parallelkit.usable_cpu_count is usable_cpu_count


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
@pytest.mark.skipif(
    not _platform.OFFERS.affinity, reason="portable mode: os.cpu_count (see test_platform.py)"
)
def test_usable_cpu_count_respects_cpu_affinity() -> None:
    # A fresh interpreter pinned to one CPU, as `taskset -c <cpu>` would do.
    cpu = min(os.sched_getaffinity(0))
    script = (
        "import os, sys\n"
        f"os.sched_setaffinity(0, {{{cpu}}})\n"
        "import parallelkit\n"
        "print(parallelkit.usable_cpu_count(), os.cpu_count())\n"
    )
    result = run_python("-c", script, timeout=60)
    assert result.returncode == 0, result.stderr
    usable, machine = result.stdout.split()
    assert usable == "1"
    assert int(machine) >= 1


def test_usable_cpu_count_respects_the_cgroup_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_context, "_cgroup_cpu_quota", lambda: 1)
    assert usable_cpu_count() == 1


def test_cgroup_quota_above_the_cpus_does_not_raise_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    baseline = usable_cpu_count()
    monkeypatch.setattr(_context, "_cgroup_cpu_quota", lambda: baseline + 100)
    assert usable_cpu_count() == baseline


# ------------------------------------------------------------------------------ cgroup files


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", None),  # unlimited
        ("100000 100000\n", 1),
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # 1.5 CPUs round up
        ("50000 100000\n", 1),  # half a CPU is still one worker
        ("400000 50000\n", 8),
        ("100000 0\n", None),  # nonsense period: ignore
        ("abc 100000\n", None),  # unreadable: ignore
    ],
)
def test_cgroup_v2_cpu_max(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    _write(tmp_path, "cpu.max", cpu_max)
    assert _cgroup_cpu_quota(tmp_path) == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [
        ("-1\n", "100000\n", None),  # unlimited
        ("100000\n", "100000\n", 1),
        ("250000\n", "100000\n", 3),
        ("300000\n", "100000\n", 3),
        ("0\n", "100000\n", None),
    ],
)
def test_cgroup_v1_cfs_quota(tmp_path: Path, quota: str, period: str, expected: int | None) -> None:
    _write(tmp_path, "cpu/cpu.cfs_quota_us", quota)
    _write(tmp_path, "cpu/cpu.cfs_period_us", period)
    assert _cgroup_cpu_quota(tmp_path) == expected


def test_cgroup_v2_wins_over_v1(tmp_path: Path) -> None:
    _write(tmp_path, "cpu.max", "100000 100000\n")
    _write(tmp_path, "cpu/cpu.cfs_quota_us", "400000\n")
    _write(tmp_path, "cpu/cpu.cfs_period_us", "100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 1


def test_unlimited_v2_falls_back_to_v1(tmp_path: Path) -> None:
    _write(tmp_path, "cpu.max", "max 100000\n")
    _write(tmp_path, "cpu/cpu.cfs_quota_us", "200000\n")
    _write(tmp_path, "cpu/cpu.cfs_period_us", "100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 2


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert _cgroup_cpu_quota(tmp_path) is None
    assert _cgroup_cpu_quota(tmp_path / "missing") is None


def test_unreadable_v1_files_mean_no_quota(tmp_path: Path) -> None:
    _write(tmp_path, "cpu/cpu.cfs_quota_us", "not a number\n")
    _write(tmp_path, "cpu/cpu.cfs_period_us", "100000\n")
    assert _cgroup_cpu_quota(tmp_path) is None


# ------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize("preload", ["1", "0"])
def test_forkserver_workers_inherit_what_main_imported(preload: str) -> None:
    # `python -c`: multiprocessing's forkserver then preloads nothing of the main module, so
    # without parallelkit's preload every worker imports tasks.preload itself.
    script = (
        "import multiprocessing.forkserver as fs\n"
        "import tasks.preload as preload_probe\n"
        "import parallelkit as pk\n"
        "here = pk.run_parallel(preload_probe.imported_here, range(4), max_workers=2,\n"
        "                       start_method='forkserver', chunksize=1)\n"
        "print(sorted(set(here)), 'parallelkit._map.worker' in fs._forkserver._preload_modules)\n"
    )
    env = package_env(TESTS, PARALLELKIT_FORKSERVER_PRELOAD=preload)
    result = run_python("-c", script, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    if preload == "1":
        assert result.stdout.split() == ["[False]", "True"]  # imported once, in the server
    else:
        assert result.stdout.split() == ["[True]", "False"]  # each worker imported it


LATE_SCRIPT = """\
import parallelkit as pk
import tasks.preload as preload_probe
pk.run_parallel(preload_probe.loaded, [[]] * 2, max_workers=2, start_method="forkserver")
import tasks.late as late  # after the server started: not among its preloads
for _ in range(2):
    if "{what}" == "function":
        got = pk.run_parallel(late.imported_here, range(4), max_workers=2,
                              start_method="forkserver", chunksize=1)
    elif "{what}" == "star":
        got = pk.run_parallel(pk.star(late.imported_here_of_two), [(i, i) for i in range(4)],
                              max_workers=2, start_method="forkserver", chunksize=1)
    else:
        got = pk.run_parallel(preload_probe.class_module_imported_here,
                              [late.Box(i) for i in range(4)], max_workers=2,
                              start_method="forkserver", chunksize=1)
    print(sorted(set(got)))
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("what", ["function", "items", "star"])
@pytest.mark.parametrize("preload", ["1", "0"])
def test_forkserver_imports_what_a_call_needs_once_for_all_workers(what: str, preload: str) -> None:
    # The parent imported tasks.late after the forkserver had started (a benchmark's numpy,
    # imported inside a function): every worker imported it again by itself, for every call.
    # Now the server imports the modules of the function and of the items' classes before
    # it forks the next worker, once.
    script = LATE_SCRIPT.format(what=what)
    env = package_env(TESTS, PARALLELKIT_FORKSERVER_PRELOAD=preload)
    result = run_python("-c", script, timeout=80, env=env)
    assert result.returncode == 0, result.stderr
    expected = "[False]" if preload == "1" else "[True]"
    assert result.stdout.split() == [expected, expected]
    assert result.stderr == ""


def test_the_forkserver_preloads_every_roles_loop() -> None:
    # The channel server's module was not preloaded (the pool worker's and the stage's
    # were): each start_process child under forkserver imported it itself.
    script = (
        "import multiprocessing.forkserver as fs\n"
        "import parallelkit as pk\n"
        "import tasks.channel as wc\n"
        "with pk.start_process(wc.echo, start_method='forkserver') as child:\n"
        "    assert child.request(1, timeout=30) == 1\n"
        "preloaded = fs._forkserver._preload_modules\n"
        "print(*(m in preloaded for m in ('parallelkit._proc.child', 'parallelkit._map.worker',\n"
        "    'parallelkit._pipeline.stage', 'parallelkit._channel.process')))\n"
    )
    result = run_python("-c", script, timeout=60, env=package_env(TESTS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"] * 4


def test_forkserver_imports_nothing_for_a_function_sent_by_value() -> None:
    # A closure from a module the parent imported late travels by value (cloudpickle): no
    # worker needs its module, so the server must not import it (its import could be
    # heavy, or do things a forkserver should not).
    pytest.importorskip("cloudpickle")
    script = (
        "import parallelkit as pk, tasks.preload as preload_probe\n"
        "pk.run_parallel(preload_probe.loaded, [[]] * 2, max_workers=2,\n"
        "                start_method='forkserver')\n"
        "import tasks.late as late\n"
        "pk.run_parallel(late.by_value(), range(2), max_workers=2, start_method='forkserver')\n"
        "print(pk.run_parallel(preload_probe.loaded, [['tasks.late']] * 2, max_workers=2,\n"
        "                      start_method='forkserver', chunksize=1))\n"
    )
    result = run_python("-c", script, timeout=60, env=package_env(TESTS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[], []]"


def test_forkserver_workers_start_with_the_shared_memory_wire_imported() -> None:
    # Every forkserver worker imported parallelkit._wire.arena (and _wire.shm) by itself, in
    # the middle of its first chunk with a large argument or result.
    names = ["parallelkit._wire.arena", "parallelkit._wire.shm"]
    script = (
        "import parallelkit as pk, tasks.preload as preload_probe\n"
        f"print(pk.run_parallel(preload_probe.loaded, [{names!r}] * 2, max_workers=2,\n"
        "                      start_method='forkserver', chunksize=1))\n"
    )
    result = run_python("-c", script, timeout=60, env=package_env(TESTS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr([names, names])


def test_a_spawn_worker_imports_neither_ctypes_nor_the_shared_ctypes_heap() -> None:
    # its progress slots come as a memfd, and it watches its parent with a thread rather
    # than loading ctypes for PR_SET_PDEATHSIG (each of those imports costs milliseconds)
    heavy = ["ctypes", "multiprocessing.sharedctypes", "multiprocessing.heap"]
    script = (
        "import parallelkit as pk, tasks.preload as preload_probe\n"
        f"got = pk.run_parallel(preload_probe.loaded, [{heavy!r}] * 2, max_workers=2,\n"
        "                      start_method='spawn', chunksize=1)\n"
        "print(got)\n"
    )
    result = run_python("-c", script, timeout=60, env=package_env(TESTS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[], []]"


MAIN_RUNS_SCRIPT = """\
import os, sys
import parallelkit as pk

with open(os.environ["RUNS_FILE"], "a") as runs:
    runs.write(f"{__name__} {os.getpid()} {' '.join(sys.argv[1:])}\\n")


def where(x):
    return os.getpid()


if __name__ == "__main__":
    pids = pk.run_parallel(where, range(8), max_workers=2, start_method="forkserver",
                           chunksize=1)
    print(*sorted(set(pids)))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("preload", ["1", "0"])
def test_forkserver_runs_the_main_script_once_not_in_every_worker(
    preload: str, tmp_path: Path
) -> None:
    # CPython < 3.13.8 never preloads __main__ in the forkserver (gh-126631): every child
    # ran the main script again.  parallelkit imports it in the server, once.
    script = tmp_path / "main_runs.py"
    script.write_text(MAIN_RUNS_SCRIPT)
    runs = tmp_path / "runs.txt"
    env = package_env(RUNS_FILE=str(runs), PARALLELKIT_FORKSERVER_PRELOAD=preload)
    result = run_python(str(script), "an-argument", timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    workers = {int(pid) for pid in result.stdout.split()}
    assert len(workers) == 2, result.stdout
    lines = [line.split() for line in runs.read_text().splitlines()]
    assert lines[0][0] == "__main__"
    assert lines[0][2:] == ["an-argument"]
    again = lines[1:]
    assert all(name == "__mp_main__" and rest == ["an-argument"] for name, _, *rest in again)
    ran_in = {int(pid) for _, pid, *_ in again}
    if preload == "1":
        assert len(again) == 1, lines  # once, in the server, with the script's argv
        assert not ran_in & workers
    else:
        assert ran_in == workers, lines  # once in each worker
        assert len(again) == 2, lines
