"""The opt-in timeline (``PARALLELKIT_TIMELINE``): parent and workers stamp one file."""

from __future__ import annotations

from pathlib import Path

import pytest

from child import TESTS, package_env, run_python
from parallelkit import StartMethod


@pytest.mark.timeout(90)
def test_a_call_stamps_its_start_up_tasks_replies_and_exits(
    tmp_path: Path, start_method: StartMethod
) -> None:
    stamps = tmp_path / "stamps"
    script = (
        "import os, parallelkit as pk, tasks.basic as b\n"
        f"assert pk.run_parallel(b.square, range(6), max_workers=2, chunksize=1,\n"
        f"                       start_method={start_method!r}) == [x * x for x in range(6)]\n"
        "print(os.getpid())\n"
    )
    result = run_python(
        "-c", script, timeout=80, env=package_env(TESTS, PARALLELKIT_TIMELINE=str(stamps))
    )
    assert result.returncode == 0, result.stderr
    parent = int(result.stdout)
    by_pid: dict[int, list[str]] = {}
    for line in stamps.read_text().splitlines():
        pid, _ns, what = line.split(" ", 2)
        by_pid.setdefault(int(pid), []).append(what)
    ours = " | ".join(by_pid.pop(parent))
    for event in ("parent.start", "parent.started", "parent.task_sent", "parent.reply"):
        assert event in ours
    assert len(by_pid) == 2  # the two workers
    for events in by_pid.values():
        assert events[0] == "child.main"
        assert any(e.startswith("worker.got task") for e in events)
        assert events[-1].startswith("child.exit (cpu ")
