"""The Dask backend: each chunk is one Dask task on a ``distributed.Client``'s cluster.

Imported only when a Dask backend is used (``pip install 'parallelkit[dask]'``).

- The function is pickled *by value* (cloudpickle; also for functions of the user's own
  modules), sent to the cluster once per job (as a task every chunk depends on, so that
  the scheduler can recompute it if a worker dies) and unpickled once per worker, so neither
  the scheduler nor the workers need to import the user's code, and a large object the
  function holds (a ``functools.partial`` over an array) travels once, not with every task.
- Each task has a unique key (never merged with an identical earlier call).
- The driver keeps at most ``2 x`` (the cluster's threads) tasks in flight.
- A worker that dies mid-task is Dask's to retry (``distributed.scheduler.allowed-failures``);
  when Dask gives up (``KilledWorker``), the chunk's items are re-run one per task and the
  item that kills workers fails with :class:`~parallelkit.WorkerCrashedError`.
- A running Dask task cannot be stopped: ``timeout=`` fails an item that ran too long when it
  finishes (on the worker), like the serial backend.
- A client closed (or our tasks cancelled) while a call runs fails the call with a
  :class:`~parallelkit.ParallelKitError` that says so, not with Dask's own errors.
"""

from __future__ import annotations

import functools
import itertools
import pickle
import sys
import sysconfig
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import CancelledError
from pathlib import Path
from types import ModuleType
from typing import Any

from parallelkit._map.backends.protocol import ChunkOutcome, ChunkTask, WorkerLostError, run_chunk
from parallelkit._wire.codec import dump_function, dumps, pickling_for_another_host
from parallelkit.errors import ParallelKitError

EXTRA_HINT = "install it with: pip install 'parallelkit[dask]'"
DESTINATION = "a Dask cluster (another host)"
_keys = itertools.count()


def import_distributed() -> ModuleType:
    """``distributed``, or an ImportError that names the extra to install."""
    try:
        import distributed  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(
            f"the Dask backend needs Dask's distributed scheduler; {EXTRA_HINT}"
        ) from exc
    return distributed


def default_client() -> object:
    """The current Dask client (``backend="dask"``)."""
    distributed = import_distributed()
    try:
        return distributed.get_client()
    except ValueError as exc:
        raise ValueError(
            "backend='dask' runs on the current Dask client, and there is none: create one "
            "(distributed.Client(...)) first, or pass it as backend=client"
        ) from exc


def _site_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"]}
    return tuple(str(Path(d).resolve()) for d in dirs if d)


def _user_module(fn: object) -> ModuleType | None:
    """The module of ``fn`` if it is the user's own code (not stdlib, not installed)."""
    name = getattr(fn, "__module__", None)
    if not name or name == "__main__" or name.split(".")[0] in sys.stdlib_module_names:
        return None
    if name.split(".")[0] == "parallelkit":
        return None
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if module is None or not file:
        return None
    if str(Path(file).resolve()).startswith(_site_dirs()):
        return None
    return module


def dump_by_value(fn: Callable[..., object]) -> bytes:
    """Pickle ``fn`` so that workers that cannot import its module can still run it.

    The user's own modules behind ``fn`` (a ``functools.partial``'s function, a pipeline's
    stage functions) travel by value too.  Single-host objects refuse to be pickled here.
    """
    inner = [getattr(fn, "func", fn), *getattr(fn, "functions", ())]
    modules = {id(m): m for m in map(_user_module, inner) if m is not None}
    with pickling_for_another_host(DESTINATION):
        if not modules:
            return dump_function(fn, by_value=True)
        import cloudpickle  # noqa: PLC0415 - a dependency of distributed

        for module in modules.values():
            cloudpickle.register_pickle_by_value(module)
        try:
            return bytes(cloudpickle.dumps(fn, pickle.HIGHEST_PROTOCOL))
        finally:
            for module in modules.values():
                cloudpickle.unregister_pickle_by_value(module)


class _Opaque:
    """Wraps a payload so that Dask does not look inside it for tasks or keys."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[object, ...]:
        return (_Opaque, (self.value,))


@functools.lru_cache(maxsize=16)
def _load(payload: bytes) -> Callable[[Any], object]:
    fn: Callable[[Any], object] = pickle.loads(payload)
    return fn


def _run_on_worker(
    fn: _Opaque, items: bytes, start: int, stop_on_error: bool, timeout: float | None
) -> ChunkOutcome:
    """The Dask task: run one chunk (its items pickled by us, see ``submit``) on a worker."""
    from distributed import get_worker  # noqa: PLC0415

    try:
        where = f"on Dask worker {get_worker().address}"
    except ValueError:
        where = "on a Dask worker"
    task = ChunkTask(
        _load(fn.value), pickle.loads(items), start, stop_on_error, timeout, capture=True
    )
    return run_chunk(task, where)


class DaskRunner:
    """Runs chunks as Dask tasks on ``client``'s cluster."""

    def __init__(self, client: Any) -> None:
        distributed = import_distributed()
        self.distributed = distributed
        self.client = client
        info = client.scheduler_info(n_workers=-1)
        threads = sum(int(w.get("nthreads", 1)) for w in info.get("workers", {}).values())
        self.max_workers = max(1, threads)
        self.capacity = 2 * self.max_workers
        self.in_caller = False
        self.token = uuid.uuid4().hex[:12]
        self.fn_future: Any = None
        self.name = "fn"
        self.futures: set[Any] = set()

    def prepare(self, fn: Callable[..., object]) -> None:
        payload = dump_by_value(fn)
        self.name = getattr(fn, "__name__", type(fn).__name__)
        if self.fn_future is not None:
            self.fn_future.release()
        # Sent to the cluster once, as a task of its own that every chunk depends on: the
        # scheduler keeps the payload, so (unlike scattered data) it can be recomputed if
        # the worker holding it dies.
        self.fn_future = self.client.submit(
            _Opaque, payload, key=f"parallelkit-fn-{self.name}-{self.token}-{next(_keys)}"
        )

    def submit(self, task: ChunkTask) -> Any:
        # Pickled here, in the caller's thread: a single-host object among the items fails
        # now with a clear error, and Dask never looks inside the items for tasks or keys.
        with pickling_for_another_host(DESTINATION):
            items = dumps(task.items if isinstance(task.items, list) else list(task.items))
        try:
            future = self.client.submit(
                _run_on_worker,
                self.fn_future,
                items,
                task.start,
                task.stop_on_error,
                task.timeout,
                key=f"parallelkit-{self.name}-{self.token}-{next(_keys)}",
                pure=False,
            )
        except Exception as exc:
            raise self._lost(exc) from exc
        self.futures.add(future)
        return future

    def wait(self, handles: Collection[Any], timeout: float | None) -> Collection[Any]:
        try:
            return self.distributed.wait(  # type: ignore[no-any-return]
                list(handles), timeout=timeout, return_when="FIRST_COMPLETED"
            ).done
        except TimeoutError:
            return ()
        except Exception as exc:  # cancelled futures (FuturesCancelledError): outcome() says
            done = [h for h in handles if h.done()]
            if not done:
                raise self._lost(exc) from exc
            return done

    def outcome(self, handle: Any) -> ChunkOutcome:
        self.futures.discard(handle)
        if handle.status == "error":
            exc = handle.exception()
            if isinstance(exc, self.distributed.KilledWorker):
                raise WorkerLostError(str(exc), retryable=True) from exc
            raise exc
        try:
            result: ChunkOutcome = handle.result()
        except Exception as exc:  # cancelled (the client closed), or the client is gone
            raise self._lost(exc) from exc
        return result

    def _lost(self, exc: Exception) -> Exception:
        """Dask's error, or ours when the client was closed or our tasks were cancelled
        under the call (Dask then says ``ClosedClientError``, ``FutureCancelledError``)."""
        status = str(getattr(self.client, "status", ""))
        if status in ("closing", "closed"):
            what = "the Dask client was closed while parallelkit was running work on it"
        elif isinstance(exc, CancelledError):  # Dask's FutureCancelledError and kin
            what = "a Dask task of this call was cancelled outside parallelkit"
        else:
            return exc
        return ParallelKitError(
            f"{what} ({type(exc).__name__}: {exc}); keep the client open, and its tasks "
            "running, until the call returns"
        )

    def close(self, *, wait: bool) -> None:
        futures = [f for f in self.futures if not f.done()]
        if futures:
            self.client.cancel(futures)
        self.futures.clear()
        if self.fn_future is not None:
            self.fn_future.release()
            self.fn_future = None
