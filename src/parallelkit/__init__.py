"""parallelkit: typed, safe and fast multiprocessing.

The one public import path::

    import parallelkit as pk

    squares = pk.run_parallel(abs, [-1, -2, -3])

See the README for a tour and ``python -m parallelkit demo`` for a demonstration.
"""

from __future__ import annotations

import importlib
import typing

from . import errors as errors
from ._types import StartMethod as StartMethod
from .errors import ChannelClosedError as ChannelClosedError
from .errors import ParallelKitError as ParallelKitError
from .errors import PipelineError as PipelineError
from .errors import QueueClosedError as QueueClosedError
from .errors import RemoteError as RemoteError
from .errors import SerializationError as SerializationError
from .errors import StartMethodError as StartMethodError
from .errors import TaskTimeoutError as TaskTimeoutError
from .errors import WorkerCrashedError as WorkerCrashedError

__version__ = "0.1.0.dev0"

if typing.TYPE_CHECKING:
    from ._channel import Channel as Channel
    from ._channel import channel_pair as channel_pair
    from ._channel_net import ChannelListener as ChannelListener
    from ._channel_process import ProcessChannel as ProcessChannel
    from ._channel_process import start_process as start_process
    from ._context import usable_cpu_count as usable_cpu_count
    from ._insights import MapStats as MapStats
    from ._insights import StallReport as StallReport
    from ._insights import WorkerStack as WorkerStack
    from ._insights import WorkerStats as WorkerStats
    from ._pipeline import Pipeline as Pipeline
    from ._pipeline import PipelineIterator as PipelineIterator
    from ._pipeline import PipelineStats as PipelineStats
    from ._pipeline import StageStats as StageStats
    from ._pool import ResultIterator as ResultIterator
    from ._pool import WorkerPool as WorkerPool
    from ._pool import imap_parallel as imap_parallel
    from ._pool import run_parallel as run_parallel
    from ._progress import Progress as Progress
    from ._progress import StageProgress as StageProgress
    from ._queue import Queue as Queue
    from ._shared import SharedAccumulator as SharedAccumulator
    from ._shared import SharedCounter as SharedCounter
    from ._shared_array import SharedArray as SharedArray

# Imported on first use (PEP 562), so that a spawn or forkserver worker, which imports only
# the modules it runs, does not pay for the whole API at start-up.
_LAZY = {
    "Pipeline": "._pipeline",
    "PipelineIterator": "._pipeline",
    "PipelineStats": "._pipeline",
    "StageStats": "._pipeline",
    "Queue": "._queue",
    "Channel": "._channel",
    "ChannelListener": "._channel_net",
    "ProcessChannel": "._channel_process",
    "channel_pair": "._channel",
    "start_process": "._channel_process",
    "ResultIterator": "._pool",
    "WorkerPool": "._pool",
    "imap_parallel": "._pool",
    "run_parallel": "._pool",
    "SharedAccumulator": "._shared",
    "SharedArray": "._shared_array",
    "SharedCounter": "._shared",
    "usable_cpu_count": "._context",
    "MapStats": "._insights",
    "StallReport": "._insights",
    "WorkerStack": "._insights",
    "WorkerStats": "._insights",
    "Progress": "._progress",
    "StageProgress": "._progress",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'parallelkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = (
    "Channel",
    "ChannelClosedError",
    "ChannelListener",
    "MapStats",
    "ParallelKitError",
    "Pipeline",
    "PipelineError",
    "PipelineIterator",
    "PipelineStats",
    "ProcessChannel",
    "Progress",
    "Queue",
    "QueueClosedError",
    "RemoteError",
    "ResultIterator",
    "SerializationError",
    "SharedAccumulator",
    "SharedArray",
    "SharedCounter",
    "StageProgress",
    "StageStats",
    "StallReport",
    "StartMethod",
    "StartMethodError",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerPool",
    "WorkerStack",
    "WorkerStats",
    "channel_pair",
    "errors",
    "imap_parallel",
    "run_parallel",
    "start_process",
    "usable_cpu_count",
)
