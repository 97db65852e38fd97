"""Where a pipeline run's batches are between stages, and the order they are handed out in.

A batch is numbered when the router takes it from the source and keeps its number through
every stage; ``Batches`` records the source items behind each number, holds the batches
waiting for a worker of the next stage, and hands finished batches to the consumer
through a reorder buffer on batch numbers (``ordered=False`` only changes when results
are handed out).  It owns no thread or descriptor: the router (the consumer's thread)
and the consumer use it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from parallelkit._pipeline.budget import Budget
from parallelkit._pipeline.messages import Message

__all__ = ("Batches",)


class Batches:
    """The numbered batches of a run, from the source to the consumer."""

    def __init__(self, stages: int, ordered: bool, budget: Budget) -> None:
        self.ordered = ordered
        self.budget = budget
        self.streaming = False  # True: the consumer releases the budget (Budget.release)
        self.next_batch = 0
        self.span: dict[int, tuple[int, int]] = {}  # batch -> (first source item, count)
        # per stage: batches (and their messages) waiting for a worker of that stage
        self.pending: list[deque[tuple[int, Message]]] = [deque() for _ in range(stages)]
        self.ready: dict[int, list[Any]] = {}  # finished batches, for the reorder buffer
        self.next_out = 0  # the batch to hand out next (ordered)
        self.outputs: deque[list[Any]] = deque()  # results the consumer has not taken
        self.held_counts: deque[int] = deque()  # source items behind each list in outputs
        self.handed = 0  # source items whose outputs were handed out

    def add(self, start: int, count: int) -> int:
        """A new batch of ``count`` source items from item ``start`` on; its number."""
        number = self.next_batch
        self.next_batch += 1
        self.span[number] = (start, count)
        return number

    def first_item(self, batch: int) -> tuple[int, int]:
        """``(first source item, count)`` behind ``batch``."""
        return self.span.get(batch, (0, 0))

    def describe(self, batch: int, stage: int) -> str:
        start, count = self.first_item(batch)
        which = (
            f"source item {start}" if count == 1 else f"source items {start}..{start + count - 1}"
        )
        return which if stage == 0 else f"the outputs of {which}"

    def deliver(self, batch: int, results: list[Any]) -> None:
        """``batch`` came out of the last stage (or out of a stage with nothing left)."""
        if not self.ordered:
            self._hand_out(batch, results)
            return
        self.ready[batch] = results
        while self.next_out in self.ready:
            number = self.next_out
            self.next_out += 1
            self._hand_out(number, self.ready.pop(number))

    def _hand_out(self, batch: int, results: list[Any]) -> None:
        _, count = self.span.pop(batch)
        self.handed += count
        if results:
            self.outputs.append(results)
            self.held_counts.append(count)
        self.budget.handed_out(batch, count, held=self.streaming and bool(results))
