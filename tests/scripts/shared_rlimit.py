"""Shared counters under a low RLIMIT_NOFILE: python shared_rlimit.py START_METHOD SPARE

Inside ``parallelkit.testing.check_no_leaks``, with the soft limit lowered so that only
SPARE (or no) more descriptors can be opened, it creates counters until one fails, makes
a first ``add`` (a slot claim), and has a child started by START_METHOD attach a counter.
Prints one JSON line per phase, then ``CLEAN``::

    {"phase": "create", "made": <counters made before the error>, "errno": ..., "message": ...}
    {"phase": "claim", "errno": ..., "message": ...}
    {"phase": "attach", "errno": ..., "message": ...}

Needs ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import pickle
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import parallelkit as pk
import tasks.shared as ws
from parallelkit._util.context import get_context
from parallelkit.testing import check_no_leaks


@contextmanager
def limited(spare: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (ws.limit_leaving(spare), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def report(phase: str, **fields: object) -> None:
    ws.say(json.dumps({"phase": phase, **fields}))


def create(spare: int) -> None:
    pk.SharedCounter().close()  # the resource tracker starts: its pipe is not the counters'
    counters: list[pk.SharedCounter] = []
    try:
        with limited(spare):
            while len(counters) < 10 * spare:
                counters.append(pk.SharedCounter())
    except OSError as exc:
        report("create", made=len(counters), errno=exc.errno, message=str(exc))
    else:
        report("create", made=len(counters), errno=0, message="no error")
    finally:
        for counter in counters:
            counter.close()


def claim() -> None:
    with pk.SharedCounter() as counter:
        try:
            with limited(0):
                counter.add()
        except OSError as exc:
            report("claim", errno=exc.errno, message=str(exc))
        else:
            report("claim", errno=0, message="no error")
        counter.add(2)  # with descriptors to spare again, the claim goes through
        assert counter.value == 2, counter.value


def attach(method: pk.StartMethod) -> None:
    context = get_context(method)
    with pk.SharedCounter() as counter:
        reader, writer = context.Pipe(duplex=False)
        child = context.Process(  # type: ignore[attr-defined]
            target=ws.attach_with_no_descriptor_left, args=(pickle.dumps(counter), writer)
        )
        child.start()
        writer.close()
        errno, message = reader.recv()
        child.join(30)
        reader.close()
        report("attach", errno=errno, message=message)


def main() -> None:
    method: pk.StartMethod = sys.argv[1]  # type: ignore[assignment]
    spare = int(sys.argv[2])
    with check_no_leaks(grace=5.0):
        create(spare)
        claim()
        attach(method)
    ws.say("CLEAN")


if __name__ == "__main__":
    main()
