"""Count the words of many texts in parallel, then merge the counts.

Each task counts one file (or, without arguments, one generated document); the parent
merges the :class:`collections.Counter` objects.  Run it with
``python examples/word_count.py [FILE ...]``.
"""

from __future__ import annotations

import random
import re
import sys
from collections import Counter
from pathlib import Path

import parallelkit as pk

WORDS = [
    "the",
    "a",
    "parallel",
    "process",
    "worker",
    "pipe",
    "queue",
    "channel",
    "memory",
    "item",
    "result",
]


def generated_document(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(10_000))


def count_words(text: str) -> Counter[str]:
    return Counter(re.findall(r"[a-z']+", text.lower()))


def count_file(path: str) -> Counter[str]:
    return count_words(Path(path).read_text(errors="replace"))


def count_generated(seed: int) -> Counter[str]:
    return count_words(generated_document(seed))


def main(paths: list[str]) -> None:
    if paths:
        counts = pk.run_parallel(count_file, paths)
    else:
        counts = pk.run_parallel(count_generated, range(20))
    total: Counter[str] = Counter()
    for count in counts:
        total.update(count)
    print(f"{sum(total.values()):_} words, {len(total)} distinct")
    for word, n in total.most_common(3):
        print(f"{word:>10} {n:_}")
    if not paths:  # check against a serial count
        serial = sum((count_generated(seed) for seed in range(20)), Counter[str]())
        print(f"same as a serial count: {serial == total}")


if __name__ == "__main__":
    main(sys.argv[1:])
