"""parallelkit: typed, safe and fast multiprocessing.

The one public import path::

    import parallelkit as pk

    squares = pk.run_parallel(abs, [-1, -2, -3])

See the README for a tour and ``python -m parallelkit demo`` for a demonstration.
"""

from __future__ import annotations

import importlib
import typing

# first: what the platform offers (and PARALLELKIT_PORTABLE) is decided, Windows refused
from parallelkit import _platform  # noqa: F401
from parallelkit import errors as errors
from parallelkit._util.types import StartMethod as StartMethod
from parallelkit.errors import ChannelClosedError as ChannelClosedError
from parallelkit.errors import ParallelKitError as ParallelKitError
from parallelkit.errors import PipelineError as PipelineError
from parallelkit.errors import QueueClosedError as QueueClosedError
from parallelkit.errors import RemoteError as RemoteError
from parallelkit.errors import SerializationError as SerializationError
from parallelkit.errors import StartMethodError as StartMethodError
from parallelkit.errors import TaskTimeoutError as TaskTimeoutError
from parallelkit.errors import WorkerCrashedError as WorkerCrashedError

__version__ = "0.1.0.dev0"

if typing.TYPE_CHECKING:
    from parallelkit._channel.channel import Channel as Channel
    from parallelkit._channel.channel import channel_pair as channel_pair
    from parallelkit._channel.net import ChannelListener as ChannelListener
    from parallelkit._channel.process import ProcessChannel as ProcessChannel
    from parallelkit._channel.process import start_process as start_process
    from parallelkit._map.api import imap_parallel as imap_parallel
    from parallelkit._map.api import run_parallel as run_parallel
    from parallelkit._map.calls import star as star
    from parallelkit._map.calls import star_kwargs as star_kwargs
    from parallelkit._map.calls import with_args as with_args
    from parallelkit._map.futures import TaskFuture as TaskFuture
    from parallelkit._map.pool import WorkerPool as WorkerPool
    from parallelkit._map.results import ResultIterator as ResultIterator
    from parallelkit._observe.progress import Progress as Progress
    from parallelkit._observe.progress import StageProgress as StageProgress
    from parallelkit._observe.stalls import StallReport as StallReport
    from parallelkit._observe.stalls import WorkerStack as WorkerStack
    from parallelkit._observe.stats import AutoChoice as AutoChoice
    from parallelkit._observe.stats import MapStats as MapStats
    from parallelkit._observe.stats import WorkerStats as WorkerStats
    from parallelkit._pipeline.builder import Pipeline as Pipeline
    from parallelkit._pipeline.builder import PipelineIterator as PipelineIterator
    from parallelkit._pipeline.builder import PipelineStats as PipelineStats
    from parallelkit._pipeline.builder import StageStats as StageStats
    from parallelkit._proc.identity import worker_info as worker_info
    from parallelkit._proc.info import WorkerInfo as WorkerInfo
    from parallelkit._proc.local import WorkerLocal as WorkerLocal
    from parallelkit._queue.queue import Queue as Queue
    from parallelkit._shared.array import SharedArray as SharedArray
    from parallelkit._shared.counters import SharedAccumulator as SharedAccumulator
    from parallelkit._shared.counters import SharedCounter as SharedCounter
    from parallelkit._util.context import usable_cpu_count as usable_cpu_count

# Imported on first use (PEP 562), so that a spawn or forkserver worker, which imports only
# the modules it runs, does not pay for the whole API at start-up.
_LAZY = {
    "Pipeline": "._pipeline.builder",
    "PipelineIterator": "._pipeline.builder",
    "PipelineStats": "._pipeline.builder",
    "StageStats": "._pipeline.builder",
    "Queue": "._queue.queue",
    "Channel": "._channel.channel",
    "ChannelListener": "._channel.net",
    "ProcessChannel": "._channel.process",
    "channel_pair": "._channel.channel",
    "start_process": "._channel.process",
    "ResultIterator": "._map.results",
    "WorkerPool": "._map.pool",
    "TaskFuture": "._map.futures",
    "imap_parallel": "._map.api",
    "run_parallel": "._map.api",
    "star": "._map.calls",
    "star_kwargs": "._map.calls",
    "with_args": "._map.calls",
    "SharedAccumulator": "._shared.counters",
    "SharedArray": "._shared.array",
    "SharedCounter": "._shared.counters",
    "usable_cpu_count": "._util.context",
    "WorkerInfo": "._proc.info",
    "worker_info": "._proc.identity",
    "WorkerLocal": "._proc.local",
    "MapStats": "._observe.stats",
    "AutoChoice": "._observe.stats",
    "StallReport": "._observe.stalls",
    "WorkerStack": "._observe.stalls",
    "WorkerStats": "._observe.stats",
    "Progress": "._observe.progress",
    "StageProgress": "._observe.progress",
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
    "AutoChoice",
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
    "TaskFuture",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerInfo",
    "WorkerLocal",
    "WorkerPool",
    "WorkerStack",
    "WorkerStats",
    "channel_pair",
    "errors",
    "imap_parallel",
    "run_parallel",
    "star",
    "star_kwargs",
    "start_process",
    "usable_cpu_count",
    "with_args",
    "worker_info",
)
