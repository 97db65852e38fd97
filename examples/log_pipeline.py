"""A log-processing pipeline: parse, keep the errors, classify, count.

Three stages of worker processes joined by bounded queues; the source is a generator, so
the log is never held in memory at once.  Run it with
``python examples/log_pipeline.py [LOGFILE]`` (without a file, it generates a log).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

import parallelkit as pk

SERVICES = ("api", "auth", "billing", "search")


class Record(NamedTuple):
    level: str
    service: str
    message: str


def generated_log(lines: int) -> Iterator[str]:
    for i in range(lines):
        level = "ERROR" if i % 7 == 0 else "WARN" if i % 5 == 0 else "INFO"
        service = SERVICES[(i // 28) % len(SERVICES)]
        code = 500 + (i // 7) % 4 if level == "ERROR" else 200
        yield f"2026-01-01T00:00:{i % 60:02d} {level} {service} status={code} request={i}"


def read_log(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as log:
        for line in log:
            yield line.rstrip("\n")


def parse(line: str) -> Record:
    _, level, service, message = line.split(" ", 3)
    return Record(level, service, message)


def is_error(record: Record) -> bool:
    return record.level == "ERROR"


def classify(record: Record) -> tuple[str, str]:
    status = record.message.split()[0].removeprefix("status=")
    return record.service, status


def main(path: str | None) -> None:
    if path is None:
        source: Iterator[str] = generated_log(70_000)
    else:
        source = read_log(path)
    pipeline = (
        pk.Pipeline(source, maxsize=10_000).map(parse, max_workers=2).filter(is_error).map(classify)
    )
    counts = Counter(pipeline)  # streams: results are counted as they arrive
    print(f"{sum(counts.values()):_} errors")
    for (service, status), n in sorted(counts.items()):
        print(f"{service:>8} {status} {n:_}")
    print(pipeline.stats)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
