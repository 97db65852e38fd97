"""A script that forgets ``if __name__ == "__main__":``: python no_main_guard.py START_METHOD.

Under spawn and forkserver every worker imports this module again, which would start
parallel work again.  parallelkit must stop with one clear error.  Needs ``tests/`` on
``PYTHONPATH``.
"""

from __future__ import annotations

import sys

import parallelkit as pk
import tasks.faults as wf

print(pk.run_parallel(wf.square, range(8), start_method=wf.start_method_arg(sys.argv[1])))
