"""``python -m benchmarks``: the parallel-map comparison (``bench_map.py``); see README.md."""

from __future__ import annotations

import sys

from .bench_map import main

if __name__ == "__main__":
    sys.exit(main())
