"""A channel script that forgets ``if __name__ == "__main__":``: python
no_main_guard_channel.py START_METHOD.

As ``no_main_guard.py``, for a ``start_process`` child: parallelkit must stop with one
clear error.  Needs ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import sys

import parallelkit as pk
import tasks.channel as wc
import tasks.faults as wf

with pk.start_process(wc.echo, start_method=wf.start_method_arg(sys.argv[1])) as child:
    print(child.request("echo", timeout=30))
