"""Backends other than the process engine, behind one small protocol (see ``_protocol``).

:func:`check_backend` validates ``backend=`` and the options that go with it in the
caller, before anything starts, and returns a factory for the runner; the map API then
runs its :class:`~parallelkit._map.job.Job` on a :class:`ChunkEngine` over that runner.  The
``WorkerPool`` and ``"process"`` backends are the process engine and are handled by the map
API itself (``_map/api.py``).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from parallelkit._map.backends.driver import ChunkEngine
from parallelkit._map.backends.local import ExecutorRunner, SerialRunner, executor_workers
from parallelkit._map.backends.protocol import Runner
from parallelkit._util.checks import resolve_max_workers

if TYPE_CHECKING:
    from distributed import Client

    Backend: TypeAlias = Literal["process", "thread", "serial", "dask"] | cf.Executor | Client
    # the map API's: also "auto" (serial, threads or processes, from the first items)
    MapBackend: TypeAlias = Backend | Literal["auto"]
else:
    Backend: TypeAlias = object
    MapBackend: TypeAlias = object

__all__ = ("Backend", "ChunkEngine", "MapBackend", "Runner", "RunnerFactory", "check_backend")

VALID = (
    "'process' (the default), 'auto', 'thread', 'serial', 'dask' (the current Dask client), "
    "a WorkerPool, a concurrent.futures.Executor or a dask distributed.Client"
)

RunnerFactory: TypeAlias = Callable[[int | None], tuple[Runner[Any], bool]]


def _is_dask_client(backend: object) -> bool:
    cls = type(backend)
    return cls.__module__.split(".")[0] == "distributed" and any(
        c.__name__ == "Client" for c in cls.__mro__
    )


def _refuse(what: str, options: list[str]) -> None:
    if options:
        raise ValueError(
            f"{' and '.join(options)} cannot be used with {what}: "
            + (
                "set them where the executor or client is created"
                if "executor" in what or "client" in what
                else "they configure worker processes, and this backend has none"
            )
        )


def check_backend(
    backend: object,
    *,
    max_workers: int | None,
    start_method: str | None,
    initializer: Callable[..., object] | None,
    finalizer: Callable[..., object] | None = None,
    max_tasks_per_worker: int | None = None,
) -> RunnerFactory:
    """Validate a non-process ``backend`` and its options; a factory for its runner.

    The factory takes the number of items when known (so that no more threads start than
    there are items) and returns ``(runner, tracked)``.

    Raises:
        ValueError: an unknown backend, or options that make no sense for it.
        ImportError: ``backend="dask"`` without Dask installed.
    """
    given = [
        name
        for name, value in (
            ("max_workers", max_workers),
            ("start_method", start_method),
            ("initializer", initializer),
            ("finalizer", finalizer),
            ("max_tasks_per_worker", max_tasks_per_worker),
        )
        if value is not None
    ]
    if isinstance(backend, str):
        if backend == "serial":
            _refuse("backend='serial'", given)
            return lambda n: (SerialRunner(), False)
        if backend == "thread":
            _refuse("backend='thread'", [g for g in given if g != "max_workers"])
            workers = (
                resolve_max_workers(max_workers)
                if max_workers is not None
                else min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
            )
            return lambda n: _threads(workers if n is None else max(1, min(workers, n)))
        if backend == "dask":
            _refuse("a Dask client", given)
            from parallelkit._map.backends.dask import default_client  # noqa: PLC0415 - optional extra

            client = default_client()
            return lambda n: _dask_runner(client)
        raise ValueError(f"unknown backend {backend!r}; valid choices: {VALID}")
    if isinstance(backend, cf.Executor):
        _refuse("an executor backend", given)
        executor = backend
        tracked = isinstance(executor, cf.ThreadPoolExecutor)
        workers = executor_workers(executor)
        return lambda n: (ExecutorRunner(executor, owned=False, max_workers=workers), tracked)
    if _is_dask_client(backend):
        _refuse("a Dask client", given)
        return lambda n: _dask_runner(backend)
    raise ValueError(f"unknown backend {backend!r}; valid choices: {VALID}")


def _threads(n: int) -> tuple[Runner[Any], bool]:
    executor = cf.ThreadPoolExecutor(n, thread_name_prefix="parallelkit-thread")
    return ExecutorRunner(executor, owned=True, max_workers=n), True


def _dask_runner(client: object) -> tuple[Runner[Any], bool]:
    from parallelkit._map.backends.dask import DaskRunner  # noqa: PLC0415 - optional extra

    return DaskRunner(client), False
