"""Suite-wide fixtures: the start-method fixture, the leak check and hang protection.

- ``start_method``: parametrizes a test over every start method this platform offers
  (``fork``, ``forkserver``, ``spawn``), with the method's name as the test id.
- Every test runs inside :func:`parallelkit.testing.check_no_leaks`: it fails if the test
  leaves a child process, a thread, a semaphore or a ``/dev/shm`` segment behind (leaked
  processes are then killed so the next test starts clean).  Mark a test
  ``@pytest.mark.no_leak_check`` (and say why) to opt out.
- pytest-timeout (``timeout_method = "signal"`` in pyproject.toml) fails a test that runs
  too long.  If the main thread is stuck where that signal cannot reach Python code, a
  watchdog process aborts the run a minute later, and ``faulthandler`` dumps every
  thread's stack first, so that CI never hangs silently (set ``PARALLELKIT_NO_WATCHDOG=1``
  to turn it off, say under a debugger).
- hypothesis profiles: ``ci`` (the default) and ``thorough``; choose with the
  ``HYPOTHESIS_PROFILE`` environment variable.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Generator, Iterator

import pytest
from hypothesis import HealthCheck, settings

from parallelkit import StartMethod
from parallelkit._util.context import available_start_methods
from parallelkit.testing import check_no_leaks

# ------------------------------------------------------------------------------ hypothesis

_SUPPRESSED = (
    HealthCheck.too_slow,
    # The start_method fixture is function-scoped but returns an immutable string, so not
    # resetting it between examples is harmless.
    HealthCheck.function_scoped_fixture,
)
# On CI (CI=true), examples are derandomized so that a run is reproducible.
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    suppress_health_check=_SUPPRESSED,
    derandomize=bool(os.environ.get("CI")),
    print_blob=True,
)
settings.register_profile(
    "thorough", deadline=None, max_examples=300, suppress_health_check=_SUPPRESSED
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ------------------------------------------------------------------------------ fixtures

START_METHODS: tuple[StartMethod, ...] = available_start_methods()


@pytest.fixture(params=START_METHODS, ids=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> StartMethod:
    """Each start method this platform offers, one test run per method."""
    method: StartMethod = request.param
    return method


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves processes, threads, semaphores or segments behind."""
    if request.node.get_closest_marker("no_leak_check") is not None:
        yield
        return
    with check_no_leaks(kill=True):
        yield


# ------------------------------------------------------------------------------ hang safety
#
# pytest-timeout's SIGALRM handler runs only when the main thread gets back to Python code.
# For the rare hang where it cannot, a watchdog *process* sends SIGABRT some time after a
# test's own timeout: pytest's faulthandler plugin then dumps every thread's stack to the
# real stderr and the run ends instead of hanging CI.  It is a process, not
# faulthandler.dump_traceback_later, because that starts a C thread in this process, and
# on Python 3.12+ every fork() from a process with a second thread warns "This process is
# multi-threaded, use of fork() may lead to deadlocks": the warning our fork tests assert
# parallelkit never causes.

_WATCHDOG_MARGIN = 60.0  # seconds beyond a test's timeout (leaves time for the leak check)
_WATCHDOG_SOURCE = """
import os, select, signal, sys, time
parent = int(sys.argv[1])
deadline, test = None, ""
while True:
    wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
    if select.select([sys.stdin], [], [], wait)[0]:
        line = sys.stdin.readline()
        if not line:
            break
        command, _, rest = line.strip().partition(" ")
        if command == "arm":
            seconds, _, test = rest.partition(" ")
            deadline = time.monotonic() + float(seconds)
        else:
            deadline = None
    if os.getppid() != parent:
        break
    if deadline is not None and time.monotonic() >= deadline:
        sys.stderr.write(f"\\nwatchdog: {test} hangs; dumping all stacks and aborting\\n")
        sys.stderr.flush()
        os.kill(parent, signal.SIGABRT)
        break
"""
_watchdog: subprocess.Popen[str] | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Start the watchdog process (it is in every test's leak-check baseline)."""
    global _watchdog
    if os.environ.get("PARALLELKIT_NO_WATCHDOG") or not hasattr(signal, "SIGABRT"):
        return
    _watchdog = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHDOG_SOURCE, str(os.getpid())],
        stdin=subprocess.PIPE,
        text=True,
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the watchdog: closing its stdin ends it."""
    global _watchdog
    if _watchdog is None:
        return
    watchdog, _watchdog = _watchdog, None
    if watchdog.stdin is not None:
        with contextlib.suppress(OSError):
            watchdog.stdin.close()
    try:
        watchdog.wait(timeout=10)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _tell_watchdog(line: str) -> None:
    global _watchdog
    if _watchdog is None or _watchdog.stdin is None:
        return
    try:
        _watchdog.stdin.write(line + "\n")
        _watchdog.stdin.flush()
    except OSError:  # it is gone; carry on without it
        _watchdog = None


def _timeout_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    if marker is not None and "timeout" in marker.kwargs:
        return float(marker.kwargs["timeout"])
    return float(item.config.getini("timeout") or 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Arm the watchdog for the setup, call and teardown of each test."""
    timeout = _timeout_of(item)
    if timeout <= 0:
        return (yield)
    _tell_watchdog(f"arm {timeout + _WATCHDOG_MARGIN} {item.nodeid}")
    try:
        return (yield)
    finally:
        _tell_watchdog("disarm")


# ------------------------------------------------------------------------------ ordering


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the Dask tests (tests/test_dask.py) after every other test.

    Dask clients leave process-wide state behind (imported C extensions, event-loop
    machinery) even after every thread they started is gone, and the rest of the suite
    forks worker processes, which is best done from a process that has not run them.
    (Hangs once blamed on this were an engine bug, fixed: see
    test_a_generator_found_empty_after_every_result_was_delivered.)
    """
    items.sort(key=lambda item: item.path.name == "test_dask.py")  # stable: order kept
