"""Run CPython's own executor tests against ``WorkerPool``, under every start method.

The tests come from the running interpreter's ``test.test_concurrent_futures`` package
(imported here at run time; nothing of it is copied into this repository).  Every test
class built on one of its process-pool mixins is run again with ``WorkerPool`` in place of
``ProcessPoolExecutor``, through :class:`CPythonShapedPool`, which only translates the
constructor (``mp_context`` to ``start_method``, ``max_tasks_per_child`` to
``max_tasks_per_worker``).  A test that depends on something of ``ProcessPoolExecutor``
that ``WorkerPool`` does not share is skipped, and :data:`SKIPS` says what that is.

Usage: ``python tests/cpython_executor.py [-v] [-k PATTERN]`` (unittest's options).  Exits
with status 0 and a notice when the interpreter has no ``test.test_concurrent_futures``
(some distributions leave the ``test`` package out, or part of it).
"""

from __future__ import annotations

import importlib
import multiprocessing
import sys
import unittest
from multiprocessing.context import BaseContext
from typing import Any, Final

from parallelkit import WorkerPool

MODULES: Final = ("test_process_pool", "test_shutdown", "test_wait", "test_as_completed")

_PRIVATE = "ProcessPoolExecutor's private attribute"
# test name -> why it does not apply to WorkerPool (one line each)
SKIPS: Final[dict[str, str]] = {
    "test_killed_child": f"{_PRIVATE} _processes (the worker to terminate)",
    "test_saturation": f"{_PRIVATE} _processes and _max_workers",
    "test_idle_process_reuse_one": f"{_PRIVATE} _processes",
    "test_idle_process_reuse_multiple": f"{_PRIVATE} _processes",
    "test_max_tasks_per_child": (
        "ProcessPoolExecutor refuses max_tasks_per_child under fork (WorkerPool allows "
        f"max_tasks_per_worker there) and {_PRIVATE} _processes"
    ),
    "test_max_tasks_per_child_defaults_to_spawn_context": f"{_PRIVATE} _mp_context",
    "test_python_finalization_error": (
        "ProcessPoolExecutor's manager thread (threading._start_joinable_thread failing); "
        "WorkerPool starts no thread for map()"
    ),
    "test_traceback": (
        "ProcessPoolExecutor's cause type concurrent.futures.process._RemoteTraceback "
        "(WorkerPool's cause carries the same remote traceback text)"
    ),
    "test_max_workers_negative": (
        "ProcessPoolExecutor's message 'max_workers must be greater than 0' (WorkerPool "
        "raises ValueError with its own message)"
    ),
    "test_interpreter_shutdown": (
        "runs a child script that imports the executor class by name from concurrent.futures"
    ),
    "test_submit_after_interpreter_shutdown": (
        "runs a child script that imports the executor class by name from concurrent.futures"
    ),
    "test_hang_gh83386": "ProcessPoolExecutor hangs there (CPython skips it for its own pool)",
    "test_processes_terminate": f"{_PRIVATE} _processes",
    "test_cancel_futures": (
        "ProcessPoolExecutor's manager thread queues calls for its workers (running, not "
        "cancellable) before shutdown(cancel_futures=True); WorkerPool cancels every call "
        "not yet handed to a worker (documented)"
    ),
    "test_context_manager_shutdown": f"tests ProcessPoolExecutor itself ({_PRIVATE} _processes)",
    "test_del_shutdown": (
        f"tests ProcessPoolExecutor itself ({_PRIVATE} _executor_manager_thread, _call_queue)"
    ),
    "test_shutdown_no_wait": (
        f"tests ProcessPoolExecutor itself ({_PRIVATE} _executor_manager_thread, _call_queue)"
    ),
}


class CPythonShapedPool(WorkerPool):
    """``WorkerPool`` with ``ProcessPoolExecutor``'s constructor (what the tests call)."""

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: BaseContext | None = None,
        initializer: Any = None,
        initargs: tuple[object, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
    ) -> None:
        method = None if mp_context is None else mp_context.get_start_method()
        super().__init__(
            max_workers,
            start_method=method,  # type: ignore[arg-type]  # a context's name is one of three
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_worker=max_tasks_per_child,
        )


def _process_mixins(util: Any) -> tuple[type, ...]:
    return (util.ProcessPoolForkMixin, util.ProcessPoolForkserverMixin, util.ProcessPoolSpawnMixin)


def _skip(reason: str) -> Any:
    @unittest.skip(reason)
    def skipped(self: unittest.TestCase) -> None:  # pragma: no cover - never runs
        pass

    return skipped


def load_suite() -> unittest.TestSuite:
    """The process-pool test classes of CPython's modules, on ``WorkerPool``."""
    util = importlib.import_module("test.test_concurrent_futures.util")
    mixins = _process_mixins(util)
    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    for name in MODULES:
        module = importlib.import_module(f"test.test_concurrent_futures.{name}")
        for attr, cls in sorted(vars(module).items()):
            if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
                continue
            if not any(issubclass(cls, mixin) for mixin in mixins):
                continue
            namespace: dict[str, Any] = {
                "executor_type": CPythonShapedPool,
                "__module__": __name__,
            }
            for test in loader.getTestCaseNames(cls):
                if test in SKIPS:
                    namespace[test] = _skip(SKIPS[test])
            adapted = type(f"WorkerPool_{attr}", (cls,), namespace)
            globals()[adapted.__name__] = adapted  # picklable by reference, like the original
            suite.addTests(loader.loadTestsFromTestCase(adapted))
    return suite


def main(argv: list[str]) -> int:
    try:
        importlib.import_module("test.test_concurrent_futures.util")
    except ImportError as exc:
        print(
            f"{sys.executable} ({sys.version.split()[0]}) has no test.test_concurrent_futures "
            f"({exc}): CPython's executor tests were not run",
            file=sys.stderr,
        )
        return 0
    util = importlib.import_module("test.test_concurrent_futures.util")
    util.setup_module()
    verbosity = 2 if "-v" in argv else 1
    support: Any = importlib.import_module("test.support")
    support.verbose = verbosity > 1  # no per-test timings
    suite = load_suite()
    if "-k" in argv:
        pattern = argv[argv.index("-k") + 1]
        suite = unittest.TestSuite(t for t in _flatten(suite) if pattern in t.id())
    result = unittest.TextTestRunner(verbosity=verbosity).run(suite)
    unittest.case.doModuleCleanups()
    reasons: dict[str, int] = {}
    for _, reason in result.skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items()):
        print(f"skipped {count:2d}: {reason}")
    return 0 if result.wasSuccessful() and result.testsRun > 0 else 1


def _flatten(suite: unittest.TestSuite) -> list[unittest.TestCase]:
    out: list[unittest.TestCase] = []
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            out.extend(_flatten(test))
        else:
            out.append(test)
    return out


if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main(sys.argv[1:]))
