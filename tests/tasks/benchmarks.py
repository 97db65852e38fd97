"""Worker functions for tests/test_benchmarks.py (importable by spawn children)."""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection


def report_numpy(conn: Connection) -> None:
    """Send whether this process has numpy imported (by its ``__main__``, or not at all)."""
    conn.send("numpy" in sys.modules)
    conn.close()
