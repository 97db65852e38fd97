"""Task functions for the worker lifecycle and nesting tests (importable under spawn)."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from pathlib import Path

import parallelkit as pk


def info() -> tuple[int, int, int, str, str | None] | None:
    """What ``pk.worker_info()`` says here, as a plain tuple (or ``None``)."""
    found = pk.worker_info()
    if found is None:
        return None
    return (found.index, found.max_workers, found.pid, found.start_method, found.stage)


def info_of(_: object) -> tuple[int, int, int, str, str | None] | None:
    return info()


def write_info(directory: str, prefix: str = "exit") -> None:
    """Finalizer / initializer: one file per call, named by the pid, holding the index."""
    found = pk.worker_info()
    assert found is not None
    path = Path(directory) / f"{prefix}-{os.getpid()}"
    with open(path, "a") as f:  # "a": a second call would show as a second line
        f.write(f"{found.index}\n")


def records(directory: str, prefix: str = "exit") -> dict[int, list[int]]:
    """``{pid: [index, ...]}`` of what :func:`write_info` wrote."""
    out: dict[int, list[int]] = {}
    for path in Path(directory).glob(f"{prefix}-*"):
        out[int(path.name.split("-")[1])] = [int(line) for line in path.read_text().split()]
    return out


def kill_self_on_zero(x: int) -> tuple[int, int, int, str, str | None] | None:
    """Item 0 SIGKILLs its own worker; the others report where they ran."""
    if x == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return info()


def raise_in_finalizer() -> None:
    raise RuntimeError("finalizer failed on purpose")


def nested_sum(n: int) -> tuple[int, set[int], int]:
    """Runs run_parallel inside a task; (sum of squares, pids of the inner work, own pid)."""
    pids = pk.run_parallel(_pid_and_square, range(n))
    return sum(v for _, v in pids), {p for p, _ in pids}, os.getpid()


def nested_explicit(n: int) -> tuple[int, set[int], int]:
    """As :func:`nested_sum`, with two inner worker processes asked for."""
    method = pk.worker_info().start_method  # type: ignore[union-attr]
    pids = pk.run_parallel(_pid_and_square, range(n), max_workers=2, start_method=method)
    return sum(v for _, v in pids), {p for p, _ in pids}, os.getpid()


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def nested_pool(n: int) -> list[int]:
    """A WorkerPool created in a task, with the task's own start method."""
    method = pk.worker_info().start_method  # type: ignore[union-attr]
    with pk.WorkerPool(2, start_method=method) as pool:
        return list(pool.map(abs, range(-n, 0)))


def nested_pipeline(n: int) -> list[int]:
    """A Pipeline created in a task."""
    method = pk.worker_info().start_method  # type: ignore[union-attr]
    return pk.Pipeline(range(n), start_method=method).map(abs).filter(bool).run()


def children_of(pid: int) -> set[int]:
    """The pids of ``pid``'s children (Linux ``/proc``)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(p) for p in (task / "children").read_text().split())
    return found


def descendants_of(pid: int) -> set[int]:
    """Every process below ``pid`` (a forkserver's children are its server's)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children_of(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def hold_children(fifo: str) -> None:
    """Start an inner pool's workers, tell the test (through ``fifo``) our pid and those of
    every process below us, then wait to be killed."""
    method = pk.worker_info().start_method  # type: ignore[union-attr]
    pool = pk.WorkerPool(2, start_method=method)
    list(pool.map(abs, range(4), chunksize=1))  # both inner workers started
    kids = descendants_of(os.getpid())
    with open(fifo, "w") as f:
        f.write(" ".join(str(p) for p in [os.getpid(), *sorted(kids)]) + "\n")
    threading.Event().wait()  # until SIGKILLed


def _make_resource() -> dict[str, object]:
    return {"pid": os.getpid(), "serial": uuid.uuid4().hex}


def _close_resource(resource: dict[str, object]) -> None:
    directory = resource.get("dir")
    if isinstance(directory, str):
        with open(Path(directory) / f"closed-{os.getpid()}", "a") as f:
            f.write(f"{resource['serial']}\n")


RESOURCE = pk.WorkerLocal(_make_resource, close=_close_resource)


def use_resource(directory: str) -> tuple[int, object, object]:
    """(our pid, the pid that made our resource, its serial); the resource remembers where
    its close writes."""
    resource = RESOURCE.get()
    resource["dir"] = directory
    return os.getpid(), resource["pid"], resource["serial"]


def resource_through_pickle(holder: pk.WorkerLocal[dict[str, object]]) -> object:
    """The serial of the value a holder that came by pickling gives here."""
    return holder.get()["serial"]


def nested_with(method: pk.StartMethod) -> list[int]:
    """An inner map on two worker processes of start method ``method``."""
    return pk.run_parallel(abs, range(-3, 0), max_workers=2, start_method=method)
