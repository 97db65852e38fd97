"""The same map and pipeline on a Dask cluster, by changing one argument.

Starts a small local cluster unless a scheduler address is given (in-process, two worker
threads, so that it starts in a moment; a real cluster's workers are processes on other
machines); ``backend=client`` sends the work there.  Run it with
``python examples/dask_run.py [tcp://scheduler:8786]`` (``pip install 'parallelkit[dask]'``).
"""

from __future__ import annotations

import logging
import sys

from distributed import Client, LocalCluster

import parallelkit as pk

# Without a dashboard the scheduler still serves a few HTTP routes, on port 8787 unless told
# otherwise: any free port instead, so that another program on 8787 does not matter.
_ANY_PORT = "127.0.0.1:0"


def collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


def is_long(steps: int) -> bool:
    return steps > 150


NUMBERS = range(1, 20_001)


def run(client: Client, here: list[int]) -> None:
    workers = len(client.scheduler_info()["workers"])
    numbers = NUMBERS
    there = pk.run_parallel(collatz_steps, numbers, backend=client)  # the cluster
    print(f"{workers} Dask workers; same results as local processes: {there == here}")
    print(f"longest: {max(there)} steps, for {numbers[there.index(max(there))]}")
    pipeline = pk.Pipeline(numbers).map(collatz_steps).filter(is_long)
    print(f"numbers over 150 steps (pipeline on the cluster): {len(pipeline.run(backend=client))}")


def main(address: str | None) -> None:
    # At shutdown Dask's background sender may log (at INFO, with a traceback) that its
    # connection closed under it: expected there, and not worth a user's attention.
    logging.getLogger("distributed.batched").setLevel(logging.WARNING)
    # processes on this machine first: forking while the in-process cluster's threads run
    # is best avoided
    here = pk.run_parallel(collatz_steps, NUMBERS)
    if address is not None:
        with Client(address) as client:  # type: ignore[no-untyped-call]  # untyped library
            run(client, here)
        return
    with (
        LocalCluster(  # type: ignore[no-untyped-call]  # distributed is not typed
            processes=False, n_workers=2, threads_per_worker=1, dashboard_address=_ANY_PORT
        ) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        run(client, here)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
