"""Bad input gets one clear error, not a flood (issue 17 §4): a main module the workers
cannot import, coroutine functions, arguments that only fork could pass."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import parallelkit as pk
from parallelkit import StartMethod
from tasks import basic
from tasks.refs import AsyncCallable, async_double, async_numbers, value_of

TESTS = Path(__file__).parent

# Run as `python - METHOD API` (the script on stdin) or `python -c SCRIPT METHOD API`; the
# task functions come from modules (abs, tests/tasks/channel.py).
SCRIPT = """
import sys
import threading
import time
import parallelkit as pk
import tasks.channel as wc

method, api = sys.argv[1], sys.argv[2]
if api == "run_parallel":
    assert pk.run_parallel(abs, [-1, -2], max_workers=2, start_method=method) == [1, 2]
elif api == "imap_parallel":
    assert list(pk.imap_parallel(abs, [-1], max_workers=1, start_method=method)) == [1]
elif api == "submit":
    with pk.WorkerPool(2, start_method=method) as pool:
        assert pool.submit(abs, -1).result() == 1
elif api == "pipeline":
    assert pk.Pipeline([-1], start_method=method).map(abs).run() == [1]
elif api == "start_process":
    with pk.start_process(wc.echo, start_method=method) as child:
        assert child.request("hi", timeout=30) == "hi"
print("DONE")
"""
APIS = ["run_parallel", "imap_parallel", "submit", "pipeline", "start_process"]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, *args],
        input=SCRIPT if args[0] == "-" else None,
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=TESTS,
        check=False,
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("api", APIS)
def test_script_on_stdin_gets_one_clear_error(start_method: StartMethod, api: str) -> None:
    done = _run(["-", start_method, api])
    if start_method == "fork":  # the workers never import the main module
        assert (done.returncode, done.stdout.split(), done.stderr) == (0, ["DONE"], "")
        return
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("Traceback") == 1, done.stderr  # ours: none from a child
    assert "FileNotFoundError" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("parallelkit.errors.StartMethodError:"), done.stderr
    assert "'<stdin>' does not exist" in last
    assert "start_method='fork'" in last


@pytest.mark.timeout(120)
@pytest.mark.parametrize("api", APIS)
def test_script_given_with_dash_c_works(start_method: StartMethod, api: str) -> None:
    # no file to run again: the workers do not import the main module at all
    done = _run(["-c", SCRIPT, start_method, api])
    assert (done.returncode, done.stdout.split(), done.stderr) == (0, ["DONE"], "")


ASYNC_FUNCTIONS = [
    async_double,
    functools.partial(async_double),
    async_numbers,
    AsyncCallable(),
]


@pytest.mark.parametrize("fn", ASYNC_FUNCTIONS, ids=["async-def", "partial", "async-gen", "object"])
def test_async_functions_are_refused_on_every_backend(fn: Any) -> None:
    message = "is an async function"
    for backend in (None, "serial", "thread"):
        with pytest.raises(TypeError, match=message):
            pk.run_parallel(fn, [1], backend=backend)
        with pytest.raises(TypeError, match=message):
            pk.imap_parallel(fn, [1], backend=backend)
    with ThreadPoolExecutor(1) as executor, pytest.raises(TypeError, match=message):
        pk.run_parallel(fn, [1], backend=executor)
    with pk.WorkerPool(1) as pool:
        for call in (
            lambda: pool.submit(fn, 1),
            lambda: pool.map(fn, [1]),
            lambda: pool.imap(fn, [1]),
            lambda: pk.run_parallel(fn, [1], backend=pool),
        ):
            with pytest.raises(TypeError, match=message):
                call()
    with pytest.raises(TypeError, match=message):
        pk.Pipeline([1]).map(fn)
    with pytest.raises(TypeError, match=message):
        pk.start_process(fn)
    with pytest.raises(TypeError, match=message):
        pk.run_parallel(abs, [1], initializer=fn)


def test_unpicklable_argument_fails_the_same_under_every_start_method(
    start_method: StartMethod,
) -> None:
    # Under fork the workers inherit the list and nothing needs pickling; the item still
    # fails there, as it must under forkserver and spawn (found out before moving)
    items: list[object] = [1, threading.Lock(), 3]
    with pytest.raises(pk.SerializationError) as caught:
        pk.run_parallel(value_of, items, max_workers=2, start_method=start_method)
    assert (caught.value.what, caught.value.item_index) == ("argument", 1)
    results = pk.run_parallel(
        value_of, items, max_workers=2, start_method=start_method, return_exceptions=True
    )
    assert results[0] == 1
    assert results[2] == 3
    assert isinstance(results[1], pk.SerializationError)
    assert results[1].item_index == 1


def _group(pgid: int) -> list[int]:
    """The living (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


EXIT_ROUNDS = 8  # the noise came in 3 to 5 runs out of 10


@pytest.mark.timeout(600)
@pytest.mark.parametrize("what", ["map", "pipeline"])
def test_exit_with_work_in_a_daemon_thread_is_quiet(
    start_method: StartMethod, what: str, tmp_path: Path
) -> None:
    script = TESTS / "scripts" / "daemon_thread_exit.py"
    for round_ in range(EXIT_ROUNDS):
        fifo = tmp_path / f"under-way-{round_}"
        os.mkfifo(fifo)
        child = subprocess.Popen(
            [sys.executable, str(script), start_method, what, str(fifo)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: everything it starts is in it
        )
        out, err = child.communicate(timeout=120)
        assert (child.returncode, out.split(), err) == (0, ["RETURNING"], "")
        # nothing left: the workers (and a forkserver, a resource tracker) go with it
        deadline = time.monotonic() + 30
        while (left := _group(child.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)  # reparented orphans cannot be waited on from here
        assert left == []


def _broken_after(n: int) -> Iterator[int]:
    yield from range(n)
    raise LookupError("the input broke")


@pytest.mark.parametrize("backend", ["process", "thread", "serial", "auto"])
@pytest.mark.parametrize("ordered", [True, False])
def test_an_input_that_raises_loses_no_result_before_it(backend: str, ordered: bool) -> None:
    # the input's error used to cancel the chunks in flight: results of items it had
    # given (and of the chunk it broke in) were lost; now it is raised after them all
    options: dict[str, Any] = {"max_workers": 2}
    if backend != "process":
        options = {"backend": backend} | ({} if backend == "serial" else options)
    for return_exceptions in (False, True):
        got: list[Any] = []
        it = pk.imap_parallel(
            basic.square,
            _broken_after(300),
            ordered=ordered,
            return_exceptions=return_exceptions,
            **options,
        )
        with it, pytest.raises(LookupError, match="the input broke") as raised:
            got.extend(it)
        assert (got if ordered else sorted(got)) == [x * x for x in range(300)]
        assert "after item 299" in "".join(raised.value.__notes__)
    with pytest.raises(LookupError, match="the input broke"):
        pk.run_parallel(basic.square, _broken_after(300), **options)
