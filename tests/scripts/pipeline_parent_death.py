"""A parent in the middle of a pipeline of large items: pipeline_parent_death.py METHOD

Needs ``tests/`` on ``PYTHONPATH``.  Prints ``SEGMENTS <stage worker pids>`` once the
router's and the stage workers' segments exist, then blocks in the pipeline until the test
SIGKILLs it.
"""

from __future__ import annotations

import sys
from typing import Any, cast

import numpy as np

import parallelkit as pk
import tasks.faults as wf
import tasks.pipeline as w


def main() -> None:
    method = wf.start_method_arg(sys.argv[1])
    # arrays: inside the stages' (pid, item) pairs they go out of band too (bytes would not)
    arrays = (np.full(w.MB // 8, i, dtype=np.int64) for i in range(8))
    pipeline = pk.Pipeline(arrays, start_method=method)
    results = iter(pipeline.map(w.pid_and_same).map(w.pid_and_same).map(w.slow_after_payload_3))
    pids: set[int] = set()
    for i in range(3):
        third, (second, (first, item)) = cast(
            "tuple[int, tuple[int, tuple[int, Any]]]", next(results)
        )
        assert int(item[0]) == i
        pids |= {first, second, third}  # every stage has a segment: the test waits for all
    print("SEGMENTS", *sorted(pids), flush=True)
    for _ in results:  # blocks: items 3.. sleep in the last stage
        pass


if __name__ == "__main__":
    main()
