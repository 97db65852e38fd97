"""Stall reports: what each busy worker was doing, with every thread's stack.

A worker armed its stack dump at start-up (``parallelkit._proc.child.arm_stack_dump``):
faulthandler writes every thread's stack into an anonymous in-memory file on SIGUSR1.
:func:`dump_stack` sends the signal and reads the file through ``/proc/<pid>/fd/<fd>``.
faulthandler dumps from its C signal handler without waiting for the interpreter, so the
stack is there for a worker blocked in a C call (``time.sleep``, a lock, I/O) and for one
spinning in Python or in C code that holds the GIL.  Not covered: a stopped process
(SIGSTOP) or one in uninterruptible sleep, which cannot run a signal handler (the report
then says that the stack did not arrive), and platforms without ``/proc`` (macOS: no
stacks; the items are still named).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import BinaryIO, Final

from parallelkit._proc import child

__all__ = ("StallClock", "StallReport", "WorkerStack", "dump_stack", "to_stderr")

DUMP_WAIT: Final = 1.0  # seconds a worker gets to write its stacks
DUMP_SETTLE: Final = 0.05  # ... the dump is complete once the file stops growing this long


class StallClock:
    """When a run counts as stalled (``stall_timeout=``), for the map and pipelines alike.

    Stalled: no sign of progress for ``timeout`` seconds while workers are busy; then one
    report a period.  The watcher says what progress is (:meth:`moved`), asks
    :meth:`due`, and calls :meth:`reported` once it has sent a report.
    """

    __slots__ = ("next_report", "since", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.since = time.monotonic()  # the last sign of progress
        self.next_report = self.since + timeout

    def moved(self, now: float) -> None:
        """Progress (or nothing that could stall) at ``now``: the period starts again."""
        self.since = now
        self.next_report = now + self.timeout

    def due(self, now: float) -> bool:
        """Whether a report is due at ``now`` (nothing moved since :meth:`moved`)."""
        return now >= self.next_report

    def reported(self) -> None:
        """A report went out: the next one, if still stalled, a period from now."""
        self.next_report = time.monotonic() + self.timeout


@dataclass(frozen=True, slots=True)
class WorkerStack:
    """One busy worker, as a stall report shows it.

    Attributes:
        pid: the worker's process id.
        item_index: the index (in the input) of the item it is running, or ``None`` if
            it is between items (receiving a chunk or sending its results).
        doing: what it is doing, in words (``"running item 17"``).
        stack: every thread's Python stack, as :mod:`faulthandler` prints it (most recent
            call first); empty when it could not be had (see :attr:`note`).
        note: why ``stack`` is empty, else ``""``.
    """

    pid: int | None
    item_index: int | None
    doing: str
    stack: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class StallReport:
    """What the workers were doing when a map stalled (``on_stall=`` receives it).

    Attributes:
        seconds: how long no item had finished and no worker had moved to another item.
        items_done: items finished so far.
        workers: one :class:`WorkerStack` per worker busy with this map.
    """

    seconds: float
    items_done: int
    workers: tuple[WorkerStack, ...]

    def __str__(self) -> str:
        lines = [
            f"parallelkit: no item has finished for {self.seconds:.1f} s "
            f"({self.items_done} done); what each busy worker is doing:"
        ]
        for w in self.workers:
            lines.append(f"--- worker pid {w.pid}: {w.doing}")
            if w.stack:
                lines.append(w.stack.rstrip("\n"))
            else:
                lines.append(f"(no stack: {w.note})")
        return "\n".join(lines) + "\n"


def _find_stack_fd(pid: int) -> int:
    """The fd of ``pid``'s stack-dump file (``child.arm_stack_dump``), or -1."""
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if child.STACK_FILE_NAME in os.readlink(f"/proc/{pid}/fd/{name}"):
                    return int(name)
    except OSError:
        pass
    return -1


def dump_stack(pid: int | None, fd: int | None = None) -> tuple[str, str]:  # noqa: PLR0911 - one case per branch, read top to bottom (split, it would be read across functions)
    """Have worker ``pid`` dump every thread's stack; ``(stack, "")`` or ``("", why not)``.

    ``fd``: its stack-dump file descriptor if known, else it is looked up.
    """
    if pid is None:
        return "", "the worker has no process id"
    if fd is None:
        fd = _find_stack_fd(pid)
    if fd < 0:
        if not os.path.isdir(f"/proc/{pid}/fd"):
            return "", "stack dumps need /proc (Linux)"
        return "", "the worker has not armed its stack dump yet"
    path = f"/proc/{pid}/fd/{fd}"
    try:
        if child.STACK_FILE_NAME not in os.readlink(path):
            return "", "the worker has not armed its stack dump yet"
        with open(path, "rb") as f:
            offset = f.seek(0, os.SEEK_END)
            os.kill(pid, signal.SIGUSR1)
            text = _read_dump(f, offset)
    except OSError as exc:
        return "", f"could not read it ({type(exc).__name__}: {exc})"
    if not text:
        return "", f"the worker did not write it within {DUMP_WAIT:g} s (stopped?)"
    return text, ""


def _read_dump(f: BinaryIO, offset: int) -> str:
    """Read what the worker appends after ``offset`` until it stops growing."""
    deadline = time.monotonic() + DUMP_WAIT
    size = offset
    stable_since: float | None = None
    while True:
        now = time.monotonic()
        new = os.fstat(f.fileno()).st_size
        if new > size:
            size = new
            stable_since = now
        elif stable_since is not None and now - stable_since >= DUMP_SETTLE:
            break
        if now >= deadline:
            break
        time.sleep(0.005)
    if size == offset:
        return ""
    f.seek(offset)
    return f.read(size - offset).decode("utf-8", "replace")


def to_stderr(report: StallReport) -> None:
    """Where a stall report goes without ``on_stall``."""
    stream = sys.stderr
    if stream is not None:
        stream.write(str(report))
        stream.flush()
