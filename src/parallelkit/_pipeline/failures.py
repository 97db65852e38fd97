"""The errors a pipeline run raises: what failed, where, and on which source items."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

from parallelkit._pipeline.messages import Message, decode
from parallelkit._proc import child
from parallelkit._proc.lifecycle import describe_exit, signal_name
from parallelkit._wire.codec import locate_unpicklable, rebuild_exception
from parallelkit.errors import PipelineError, SerializationError, WorkerCrashedError

__all__ = (
    "source_failed",
    "stage_failed",
    "startup_failed",
    "unpicklable_source_item",
    "worker_crashed",
)


def source_failed(exc: BaseException) -> PipelineError:
    """The source raised ``exc``."""
    error = PipelineError(
        f"the pipeline's source raised {type(exc).__name__}: {exc}",
        stage="source",
    )
    error.__cause__ = exc
    return error


def unpicklable_source_item(items: Sequence[Any], start: int, exc: Exception) -> PipelineError:
    """A batch of the source from item ``start`` on could not be pickled (``exc``)."""
    found = locate_unpicklable(items)
    position, cause = found if found is not None else (0, exc)
    index = start + position
    serialization = SerializationError(
        f"item {index} of the source cannot be pickled: {cause}",
        what="argument",
        item_index=index,
    )
    serialization.__cause__ = cause
    error = PipelineError(
        f"item {index} of the pipeline's source cannot be sent to a worker: {cause}",
        stage="source",
        item=items[position],
        item_index=index,
    )
    error.__cause__ = serialization
    return error


def stage_failed(stage: str, pid: int | None, index: int | None, message: Message) -> PipelineError:
    """Stage ``stage``'s worker ``pid`` sent an ERROR ``message``; ``index`` is the source
    item's (first stage only)."""
    record, shown, item_bytes = decode(message)
    where = f"in pipeline stage {stage!r} (worker pid {pid}) on item {shown}"
    cause = rebuild_exception(record, where=where)
    item: object = None
    if item_bytes is not None:
        with contextlib.suppress(Exception):
            item = pickle.loads(item_bytes)
    error = PipelineError(
        f"stage {stage!r} failed on item {shown}: {record.type_name}: {record.message}",
        stage=stage,
        item=item,
        item_index=index,
    )
    error.__cause__ = cause
    return error


def worker_crashed(stage: str, process: BaseProcess, holding: str) -> PipelineError:
    """A worker of ``stage`` died (``holding``: what it was working on, in words)."""
    code = process.exitcode
    if code == child.EXIT_MAIN_GUARD:  # as the map engine says it
        what = child.main_guard_note()
    else:
        what = f"{describe_exit(code)} {holding}"
    crash = WorkerCrashedError(
        f"a worker of pipeline stage {stage!r} (pid {process.pid}) {what}",
        item_index=None,
        pid=process.pid,
        exitcode=code,
        signal=signal_name(code),
    )
    error = PipelineError(
        f"stage {stage!r}: worker pid {process.pid} {what}",
        stage=stage,
    )
    error.__cause__ = crash
    return error


def startup_failed(stage: str, pid: int | None, message: Message) -> PipelineError:
    """A worker of ``stage`` could not start (see ``_proc.child.startup_error``)."""
    cause = child.startup_error(decode(message), pid)
    error = PipelineError(
        f"stage {stage!r}: worker pid {pid} could not start: {cause}", stage=stage
    )
    error.__cause__ = cause
    return error
