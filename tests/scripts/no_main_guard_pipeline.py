"""A pipeline script that forgets ``if __name__ == "__main__":``: python
no_main_guard_pipeline.py START_METHOD.

As ``no_main_guard.py``, for a pipeline's stage processes: parallelkit must stop with one
clear error.  Needs ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import sys

import parallelkit as pk
import tasks.faults as wf

method = wf.start_method_arg(sys.argv[1])
print(pk.Pipeline(range(8), start_method=method).map(wf.square, max_workers=2).run())
