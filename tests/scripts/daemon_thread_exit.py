"""A daemon thread runs parallel work when the main thread returns (issue 17 §4 f).

Usage: ``python daemon_thread_exit.py START_METHOD map|pipeline FIFO``.  The main thread
waits until a worker has started the first item (it writes to the FIFO), prints
``RETURNING`` and returns while the thread is still busy (each chunk of the map, each item
of the pipeline's stage, runs for seconds): interpreter exit must print nothing more.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import cast

import parallelkit as pk

FIFO_ENV = "DAEMON_THREAD_EXIT_FIFO"


def slow(x: int) -> int:
    if x == 0:
        with open(os.environ[FIFO_ENV], "wb") as fifo:
            fifo.write(b"x")
    time.sleep(0.05)
    return x


def main() -> None:
    method = cast("pk.StartMethod", sys.argv[1])
    what, fifo = sys.argv[2], sys.argv[3]
    os.environ[FIFO_ENV] = fifo  # before any worker starts: they inherit it

    def work() -> None:
        if what == "map":
            pk.run_parallel(slow, range(1000), max_workers=2, start_method=method)
        else:
            pk.Pipeline(range(1000), start_method=method).map(slow, max_workers=2).run()

    threading.Thread(target=work, daemon=True).start()
    with open(fifo, "rb") as f:  # blocks until a worker opens it to write
        f.read(1)
    print("RETURNING", flush=True)


if __name__ == "__main__":
    main()
