"""``backend="auto"``: measure the first items in the caller, then run the rest wherever
the call is predicted to end first (serially, on threads, or on worker processes).

::

    items ──▶ probe: items in the calling thread, in batches of 1, 1, 2, 4, ... until they
              have run PROBE_SECONDS (or the input ends, or an item fails); once the work
              left is worth it, a watcher thread sleeps in short ticks and notes how late
              it wakes up (one more item, watched, if the first was too long for it and
              the choice depends on the GIL)
         ──▶ model: seconds per item t, its CPU share, the share of time the GIL was free,
              the pickled size of the first item and of its result
         ──▶ choose: serial = m t; threads = max(m t (1 - gil_free), m t cpu / cpus, m t / W)
              processes = start-up + m t / W + m (per-item cost + bytes / bandwidth)
         ──▶ the probe's results are the job's first results; the rest runs on the choice

Why a sleeping watcher tells whether the function holds the GIL: a thread waking up needs
the GIL; while the caller runs Python code, it gets it only when the caller is made to
drop it (after ``sys.getswitchinterval()``, 5 ms by default); while the caller runs code
that releases it (numpy, I/O, ``time.sleep``), at once.  The watcher costs one GIL
hand-over per switch interval (a scheduler's latency or two on a loaded machine), and runs
no item.  The serial choice of ``run_parallel`` runs the rest here, into the probe's result
list (see ``_map/api.py``), so that it costs no more than the serial backend.  An item
that raises during the probe fails the call as on the serial backend (its own exception, a
note naming the item); an item that cannot be pickled, or whose result cannot, rules
processes out.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, cast

from parallelkit import _platform
from parallelkit._map.calls import ItemCall, each
from parallelkit._observe.stats import AutoChoice
from parallelkit._util import fuzz as _fuzz
from parallelkit._wire.codec import PROTOCOL

__all__ = (
    "PROBE_WHERE",
    "Measured",
    "Probe",
    "choose",
    "process_only",
    "run_probe",
)

Choice = Literal["serial", "thread", "process"]

PROBE_WHERE: Final = "in the calling thread (backend='auto' measuring)"
PROBE_SECONDS: Final = 0.02  # the probe stops once its items have run this long (s)
TICK_SECONDS: Final = 0.00025  # the GIL watcher sleeps this long between looks (s)
HELD_SAMPLES: Final = 3  # ... and stops after this many wake-ups found it held
WORTH_SECONDS: Final = 0.05  # serial work left for which knowing the GIL matters (s)
TRUSTED_BATCH_SECONDS: Final = 0.001  # a batch this long says how long its items take (s)
GIL_ITEM_SECONDS: Final = 1e-5  # ... in items at least this long: shorter ones gain nothing
# from threads that the hand-overs of the GIL would not take back (s)
# Start-up and shutdown of the worker processes of one call (s): estimates on the side of
# caution for a loaded machine; spawn imports the main module in every worker.
PROCESS_START_SECONDS: Final = {"fork": 0.03, "forkserver": 0.06, "spawn": 0.25}
THREAD_START_SECONDS: Final = 0.001  # start and join a thread pool (s)
PROCESS_ITEM_SECONDS: Final = 2e-6  # the parent's share of one item's trip, chunked (s)
COPY_BYTES_PER_SECOND: Final = 1e9  # small buffers: copied in and out of shared memory
COPY_SAMPLE_BYTES: Final = 1 << 20  # a buffer this large: its copy is timed instead
WAITING_CPU_SHARE: Final = 0.5  # items wanting a CPU less than this share of the time wait (I/O)
# ... and below this share they surely do (a VM's stolen time also lowers the share: a
# spinning item read 37% on a loaded VM), so the GIL is free then, watched or not
IDLE_CPU_SHARE: Final = 0.2
WATCH_FROM_START_ITEMS: Final = 16  # inputs this long (or without a length): watch at once,
WATCH_DELAY_SECONDS: Final = 0.004  # ... after this long, unless the items are found tiny (s)
# ... or at once when the first item took this long: then the delay only makes the probe
# (serial work while a pool could run) longer (s)
WATCH_NOW_SECONDS: Final = 0.0001
ENOUGH_SAMPLES: Final = 4  # the probe may end early once the watcher has looked this often
ENOUGH_SECONDS: Final = 0.002  # ... and its items have run this long (s)
UNKNOWN_ITEMS_PER_WORKER: Final = 64  # an input without a length: at least this many left
GAIN: Final = 0.9  # a parallel backend must be predicted to take at most this x serial
log = logging.getLogger("parallelkit")


@dataclass(frozen=True, slots=True)
class Measured:
    """What the probe measured (the model's input).

    ``item`` and ``result`` are (bytes, seconds of a one-way trip) of the first item and
    its result (see ``_bytes_of``), ``None`` when it cannot be pickled (processes are out).
    """

    items: int
    seconds_per_item: float
    cpu_share: float  # share of the items' time they computed, 0 to 1 (see cpu_share)
    gil_free: float  # share of the watcher's wake-ups that found the GIL free, 0 to 1
    item: tuple[int, float] | None = (0, 0.0)
    result: tuple[int, float] | None = (0, 0.0)

    @property
    def picklable(self) -> bool:
        return self.item is not None and self.result is not None


def _trip_seconds(size: tuple[int, float]) -> float:
    """Pickle and copy in, map and unpickle: one object's trip to another process."""
    return 2 * size[1]


def predict(
    m: Measured,
    remaining: int,
    *,
    workers: int,
    threads: int,
    cpus: int,
    start_method: str,
    items_inherited: bool,
) -> dict[str, float]:
    """Predicted seconds for ``remaining`` items on each backend (see the module doc)."""
    t = m.seconds_per_item
    work = remaining * t
    out = {"serial": work}
    p_threads = max(1, min(threads, remaining))
    out["thread"] = THREAD_START_SECONDS + max(
        work * (1.0 - m.gil_free), work * m.cpu_share / max(1, cpus), work / p_threads
    )
    if m.item is not None and m.result is not None:
        p = max(1, min(workers, remaining))
        per_item = PROCESS_ITEM_SECONDS + _trip_seconds(m.result)
        # fork workers read the input they inherited: its pages are mapped, not copied
        per_item += m.item[1] if items_inherited else _trip_seconds(m.item)
        start = PROCESS_START_SECONDS.get(start_method, PROCESS_START_SECONDS["spawn"])
        out["process"] = start + work / p + remaining * per_item
    return out


def choose(predicted: dict[str, float], allowed: Sequence[Choice]) -> Choice:
    """The allowed backend predicted to finish first; serial unless another saves enough."""
    serial = predicted["serial"]
    best: Choice = "serial"
    best_seconds = serial
    names: tuple[Choice, ...] = ("thread", "process")
    for name in names:
        seconds = predicted.get(name)
        if name in allowed and seconds is not None and seconds < best_seconds:
            best, best_seconds = name, seconds
    if best != "serial" and best_seconds > GAIN * serial:
        return "serial"  # too close to call: serial costs nothing to start
    if "serial" not in allowed and best == "serial":
        return allowed[0]
    return best


# ------------------------------------------------------------------ options


def process_only(
    *,
    timeout: float | None,
    initializer: object,
    finalizer: object,
    max_tasks_per_worker: int | None,
    stall_timeout: float | None,
    on_stall: object,
    forward_logs: bool,
) -> str | None:
    """The first option that only worker processes honour (why auto must pick them), or
    ``None``.  The table is in ``docs/backends.md``."""
    for name, value in (
        ("timeout", timeout),
        ("initializer", initializer),
        ("finalizer", finalizer),
        ("max_tasks_per_worker", max_tasks_per_worker),
        ("stall_timeout", stall_timeout),
        ("on_stall", on_stall),
    ):
        if value is not None:
            return f"{name}= needs worker processes"
    if not forward_logs:
        return "forward_logs=False is about worker processes"
    return None


# ------------------------------------------------------------------ the probe


class _GilWatch:
    """A thread that sleeps in ticks and records how late each wake-up was.

    Each wake-up while the caller holds the GIL makes the caller hand it over, which costs
    little on an idle machine and a scheduler's latency or two on a loaded one: it is
    started only when the answer matters (see :func:`run_probe`), and it stops after
    HELD_SAMPLES late wake-ups.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay  # sleep this long before the first look
        self.late: list[float] = []
        self.held = 0  # wake-ups that found the GIL held
        self.running = False  # set by the caller while an item runs: only then it looks
        self.limit = sys.getswitchinterval() / 5
        self._caller = threading.get_native_id()
        try:  # the caller's CPU time, read from the watcher's thread
            clock_id = time.pthread_getcpuclockid(threading.get_ident())
            time.clock_gettime(clock_id)
            self._caller_cpu: Callable[[], float] = lambda: time.clock_gettime(clock_id)
        except (AttributeError, OSError):  # not offered here: assume the caller ran
            self._caller_cpu = time.perf_counter
        self.stop = threading.Event()
        self.go = threading.Event()  # set: the delay ends now
        self.thread = threading.Thread(
            target=self._run, name="parallelkit-auto-gil-watch", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        clock = time.perf_counter
        wait = self.stop.wait
        caller_cpu = self._caller_cpu
        back_at = 0.0  # the caller's CPU time by which it surely has the GIL back
        if self.delay:
            self.go.wait(self.delay)
            if self.stop.is_set():
                return  # the caller found its items too short to matter, and stopped us
        while self.held < HELD_SAMPLES:
            t, c = clock(), caller_cpu()
            was_running = self.running and c >= back_at
            if wait(TICK_SECONDS):
                return
            if _fuzz.ENABLED:
                _fuzz.point("auto.watch_woke")
            late = clock() - t - TICK_SECONDS
            counts = was_running and self.running
            if late < self.limit:
                if counts and (caller_cpu() > c or not _platform.runnable(self._caller)):
                    self.late.append(late)
                # else the caller, neither blocked nor run, waits for a CPU to take the GIL
                # back (a loaded machine): that says nothing of the item
                continue
            now = caller_cpu()
            if now - c <= 0:
                continue  # the caller did not run: the OS kept us waiting, not the GIL
            # Made to wait for a switch interval while the caller ran: it held the GIL (a
            # fifth of the interval leaves room for the OS scheduler's own delays).  Having
            # taken the GIL from the caller, look again only once the caller has run again:
            # on a loaded machine it may wait for a CPU first, and the GIL would look free.
            back_at = now + TICK_SECONDS
            if counts:
                self.late.append(late)
                self.held += 1
        wait()

    def look_now(self) -> None:
        """End the delay before the first look (the items are long enough)."""
        self.go.set()

    def can_tell(self) -> bool:
        """Whether it has looked often enough to say (see :meth:`close`)."""
        return self.held >= HELD_SAMPLES or len(self.late) > HELD_SAMPLES

    def close(self) -> float:
        """Stop; the share of wake-ups that found the GIL free (0 with too few to tell)."""
        self.stop.set()
        self.go.set()
        self.thread.join()
        late = self.late[1:]  # the first one may overlap the thread's own start
        if len(late) < HELD_SAMPLES:
            return 0.0
        return sum(1 for x in late if x < self.limit) / len(late)


def _clocks() -> tuple[float, float]:
    """Seconds this thread has run, and waited in the run queue for a CPU where the
    platform says (``_platform.run_queue_seconds``; 0 elsewhere)."""
    return time.thread_time(), _platform.run_queue_seconds()


def cpu_share(ran: float, queued: float, wall: float) -> float:
    """The share of ``wall`` seconds a thread computed (``ran``), counted over the time it
    did not wait for a CPU (``queued``).  On a loaded machine a busy thread waits for a
    CPU: that is not an item waiting for I/O; nor is a sleeper's wait for a CPU once its
    sleep ends an item computing."""
    own = wall - queued
    return min(1.0, ran / own) if own > 0 else 1.0


def _bytes_of(obj: object) -> tuple[int, float] | None:
    """(bytes, seconds) of ``obj``'s trip one way to another process: pickling it, with its
    large buffers counted (not copied into the pickle), and copying those buffers once
    into fresh memory, timed here on the first one (fresh memory costs page faults, which
    on a VM can cost more than the copy); ``None`` if it cannot be pickled.  Timed in this
    thread's CPU time: on a loaded machine a preemption in the middle (10 ms and more)
    read as a trip of that long, and a 5-byte item looked too costly to send."""
    buffers: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        buffers.append(buffer.raw())
        return False

    t0 = time.thread_time()
    try:
        data = pickle.dumps(obj, PROTOCOL, buffer_callback=out_of_band)
    except Exception:
        try:
            from parallelkit._wire.codec import dumps  # noqa: PLC0415

            data = dumps(obj)  # cloudpickle, when installed, sends what pickle cannot
        except Exception:
            return None
    seconds = time.thread_time() - t0
    large = sum(b.nbytes for b in buffers)
    if buffers and buffers[0].nbytes >= COPY_SAMPLE_BYTES:
        sample = buffers[0]
        t0 = time.thread_time()
        copy = bytearray(sample)
        copied = time.thread_time() - t0
        del copy
        seconds += copied * large / sample.nbytes
    else:
        seconds += large / COPY_BYTES_PER_SECOND
    return len(data) + large, seconds


def run_into(
    results: list[Any], fn: Callable[[Any], object], items: Iterable[Any], stop_on_error: bool
) -> list[tuple[int, BaseException]]:
    """Append ``fn(item)`` for each item to ``results`` (``None`` where it raised); the
    ``(position, exception)`` pairs of the items that raised.  ``run_chunk``'s loop, into
    one list: the probe's batches and a serial rest make no lists of their own."""
    start = len(results)
    errors: list[tuple[int, BaseException]] = []
    it = iter(items)
    while True:
        try:
            results.extend(each(fn, it))
            return errors
        except KeyboardInterrupt:
            raise  # Ctrl-C in the caller: stop, do not record it as the item's
        except BaseException as exc:  # SystemExit too: it is this item's exception
            errors.append((len(results) - start, exc))
            results.append(None)
            if stop_on_error:
                return errors


@dataclass(slots=True)
class Probe:
    """The probe's outcome: the first ``count`` items' results, and what was measured."""

    results: list[Any] = field(default_factory=list)
    errors: list[tuple[int, BaseException]] = field(default_factory=list)
    count: int = 0
    seconds: float = 0.0  # wall time of the probe's items
    exhausted: bool = False  # the input ended during the probe
    failed: BaseException | None = None  # fail fast: the error to raise
    measured: Measured | None = None
    rest: Iterator[Any] | None = None  # an iterator input: its items after the probe's
    seq_rest: Iterator[Any] | None = None  # a sequence's items after the probe's, if known


@dataclass(frozen=True, slots=True)
class Model:
    """What the model knows of the call besides the measurements."""

    workers: int  # processes (and CPU-bound threads)
    cpus: int
    start_method: str
    items_inherited: bool  # fork workers inherit the input: only results move
    threads_fixed: bool = False  # the caller set max_workers, which bounds threads too
    allowed: tuple[Choice, ...] = ("serial", "thread", "process")


def _rest(remaining: int | None, count: int, model: Model) -> tuple[int, bool]:
    """Items left after ``count`` (``remaining``: of an input with a length), and whether
    that is known.  An input without a length is assumed long: wrongly starting a pool
    costs its start-up once, wrongly staying serial costs the speed-up on every item."""
    if remaining is None:
        return max(count, UNKNOWN_ITEMS_PER_WORKER * model.workers), False
    return remaining, True


def _predicted(m: Measured, remaining: int, model: Model) -> tuple[dict[str, float], int]:
    """Predictions for the allowed backends, and the thread count they assume."""
    threads = model.workers
    if m.cpu_share < IDLE_CPU_SHARE:
        # a thread that uses no CPU runs no bytecode: the GIL is free then
        m = replace(m, gil_free=max(m.gil_free, 1.0 - m.cpu_share))
    if m.cpu_share < WAITING_CPU_SHARE and not model.threads_fixed:
        # items that wait (I/O, sleep): more threads than CPUs help, unless the caller
        # said how many
        threads = max(threads, min(32, model.cpus + 4))  # ThreadPoolExecutor's default
    predicted = predict(
        m,
        remaining,
        workers=model.workers,
        threads=threads,
        cpus=model.cpus,
        start_method=model.start_method,
        items_inherited=model.items_inherited,
    )
    allowed = [a for a in model.allowed if a != "process" or m.picklable]
    return {k: v for k, v in predicted.items() if k in allowed or k == "serial"}, threads


def gil_matters(m: Measured, remaining: int, model: Model) -> bool:
    """Whether the choice would change if the GIL were free (it has not been watched): then
    one more item, watched, is worth its time."""
    if "thread" not in model.allowed:
        return False
    held, _ = _predicted(replace(m, gil_free=0.0), remaining, model)
    free, _ = _predicted(replace(m, gil_free=1.0), remaining, model)
    allowed = [a for a in model.allowed if a in held]
    if_held, if_free = choose(held, allowed), choose(free, allowed)
    return if_held != if_free and free[if_free] < GAIN * held[if_held]


def run_probe(
    fn: Callable[[Any], object],
    source: Sequence[Any] | Iterator[Any],
    length: int | None,
    *,
    fail_fast: bool,
    measure_items: bool,
    model: Model | None = None,
) -> Probe:
    """Run the first items of ``source`` in the calling thread, measuring them.

    ``measure_items``: also pickle the first item (processes would have to send it).  The
    GIL watcher starts once the work left is worth it; if the probe's items were too long
    for it to look (the first item alone used the probe's time) and the choice depends on
    the GIL (``model``), one more item runs, watched.  An item :func:`~parallelkit.star`
    and its kin cannot take ends the probe before it (the chosen backend reports it).
    """
    return _Prober(fn, source, length, fail_fast, measure_items, model).run()


class _Prober:
    """One probe's state; :meth:`run` is its loop: batches of 1, 1, 2, 4, ... items."""

    def __init__(
        self,
        fn: Callable[[Any], object],
        source: Sequence[Any] | Iterator[Any],
        length: int | None,
        fail_fast: bool,
        measure_items: bool,
        model: Model | None,
    ) -> None:
        self.fn = fn
        self.source = source
        self.length = length
        self.fail_fast = fail_fast
        self.measure_items = measure_items
        self.model = model  # None: no watched item (none is worth it, or no model)
        self.probe = Probe()
        self.it = iter(source) if length is None else None
        if self.it is not None:
            self.probe.rest = self.it
        self.check = fn if isinstance(fn, ItemCall) and fn.expects is not object else None
        # Long inputs are watched from the first item (which may be the only one the probe
        # runs); short ones once a batch says the work left is worth it, not to pay a
        # thread for a handful of trivial items.
        self.watch = (
            _GilWatch(WATCH_DELAY_SECONDS)
            if length is None or length >= WATCH_FROM_START_ITEMS
            else None
        )
        self.batch = 1
        self.last = (0, 0.0)  # (items, seconds) of the last unwatched batch
        self.item_size: tuple[int, float] | None = (0, 0.0)
        self.result_size: tuple[int, float] | None = (0, 0.0)
        self.one_more = False  # the extra, watched item is running
        self.first: object = None
        self.clocks0 = _clocks()  # read once around the probe: a reading costs microseconds

    def run(self) -> Probe:
        probe = self.probe
        try:
            while not self._seen_enough():
                pos = probe.count
                items = self._next_items(pos)
                if items is None:
                    break
                items, last_batch = self._checked(items)
                if items is None:
                    break
                seconds = self._run_batch(pos, items)
                if self._done(pos, last_batch):
                    break
                self._rewatch(pos, seconds)
                self.batch = self.batch * 2 if pos else 1  # the first item runs alone
        finally:
            if _fuzz.ENABLED:
                _fuzz.point("auto.probe_done")
            gil_free = self.watch.close() if self.watch is not None else 0.0
        if probe.count:
            probe.measured = self._measured(gil_free)
        return probe

    def _measured(self, gil_free: float) -> Measured:
        probe = self.probe
        ran, queued = (now - then for now, then in zip(_clocks(), self.clocks0, strict=True))
        last = self.last
        n, seconds = last if probe.count > 1 and last[1] > 0 else (probe.count, probe.seconds)
        return Measured(
            items=probe.count,
            seconds_per_item=seconds / max(1, n),
            cpu_share=cpu_share(ran, queued, probe.seconds) if probe.seconds > 0 else 1.0,
            gil_free=gil_free,
            item=self.item_size,
            result=self.result_size,
        )

    def _seen_enough(self) -> bool:
        """Whether the probe has measured enough; runs one more item, watched, if the
        choice depends on the GIL and the watcher has not looked (or not often enough to
        tell: a loaded machine leaves it few wake-ups)."""
        probe, watch, model = self.probe, self.watch, self.model
        if (
            watch is not None
            and len(watch.late) >= ENOUGH_SAMPLES
            and probe.count > 1
            and self.last[1] >= TRUSTED_BATCH_SECONDS
            and probe.seconds >= ENOUGH_SECONDS
        ):
            return True  # the GIL seen often enough, and a batch that says what items cost
        if probe.seconds < PROBE_SECONDS:
            return False
        left = None if self.length is None else self.length - probe.count
        if (
            (watch is not None and watch.can_tell())
            or self.one_more
            or model is None
            or not probe.count
            or left == 0
            or not gil_matters(self._measured(0.0), _rest(left, probe.count, model)[0], model)
        ):
            return True
        self.one_more = True
        self.batch = 1
        if watch is None:
            self.watch = _GilWatch()
        return False

    def _next_items(self, pos: int) -> Iterable[Any] | None:
        """The next batch, or ``None`` when the input ended or failed (the probe ends)."""
        probe, batch = self.probe, self.batch
        items: Iterable[Any]
        if self.it is None:
            assert self.length is not None
            seq = cast("Sequence[Any]", self.source)
            if pos == 0 or self.check is not None:
                items = seq[pos : pos + batch]
                probe.seq_rest = None
            else:  # no copy of the input: one iterator, read on from where it stopped
                if probe.seq_rest is None:
                    probe.seq_rest = itertools.islice(seq, pos, None)
                items = itertools.islice(probe.seq_rest, min(batch, self.length - pos))
        else:
            items = []
            try:  # extend keeps the items read before the input raised
                items.extend(itertools.islice(self.it, batch))
            except Exception as exc:  # fails the call after the results before it
                last = pos + len(items) - 1
                exc.add_note(f"parallelkit: raised by the input iterable after item {last}")
                probe.failed = exc
                if not items:
                    return None  # else the items read run, and the probe ends (failed)
        if isinstance(items, list | tuple | range) and not items:
            probe.exhausted = True
            return None
        if pos == 0:
            assert isinstance(items, list | tuple | range | Sequence)
            self.first = items[0]
        return items

    def _checked(self, items: Iterable[Any]) -> tuple[Iterable[Any] | None, bool]:
        """The batch cut before an item the call cannot take (left to the chosen backend,
        which reports it), and whether it is the last batch; ``None``: nothing to run."""
        last_batch = self.one_more
        if self.check is not None:
            assert isinstance(items, Sequence)
            bad = self.check.bad_item(items)
            if bad is not None:
                if self.it is not None:
                    self.probe.rest = itertools.chain(items[bad:], self.it)
                items = items[:bad]
                last_batch = True
                if not items:
                    return None, True
        return items, last_batch

    def _run_batch(self, pos: int, items: Iterable[Any]) -> float:
        """Run one batch into the probe's results; its wall time."""
        probe, watch = self.probe, self.watch
        if watch is not None:
            watch.running = True
        t0 = time.perf_counter()
        errors = run_into(probe.results, self.fn, items, self.fail_fast)
        seconds = time.perf_counter() - t0
        if watch is not None:
            watch.running = False
        ran = len(probe.results) - pos
        probe.seconds += seconds
        probe.count += ran
        if not self.one_more:  # the watched item runs with the watcher's hand-overs
            self.last = (ran, seconds)
        if pos == 0 and self.measure_items:
            self.item_size = _bytes_of(self.first)
        if pos == 0 and not errors:
            self.result_size = _bytes_of(probe.results[0])
        for p, error in errors:
            error.add_note(f"parallelkit: raised {PROBE_WHERE} on item {pos + p}")
            probe.errors.append((pos + p, error))
        if errors and self.fail_fast:
            probe.failed = probe.errors[0][1]
        return seconds

    def _done(self, pos: int, last_batch: bool) -> bool:
        """Whether the batch just run ends the probe: it failed fast, the input ended, or
        it was the last batch (the watched one, or one cut before an item)."""
        probe = self.probe
        if probe.failed is not None:
            return True
        if self.length is not None and probe.count >= self.length:
            probe.exhausted = True
            return True
        if last_batch:
            return True
        if self.it is not None and probe.count - pos < self.batch:
            probe.exhausted = True
            return True
        return False

    def _rewatch(self, pos: int, seconds: float) -> None:
        """Stop the watcher if the items are too short for the GIL to matter; start it
        once the work left is worth it."""
        ran = self.probe.count - pos
        per_item = seconds / max(1, ran)
        if pos == 0 and self.watch is not None and per_item >= WATCH_NOW_SECONDS:
            self.watch.look_now()
        if (
            self.watch is not None
            and not self.watch.late
            and seconds >= TRUSTED_BATCH_SECONDS
            and per_item < GIL_ITEM_SECONDS
        ):
            # items too short for the GIL to matter: stop the watcher before it looks
            # (each look while the GIL is held costs the caller a hand-over)
            self.watch.close()
            self.watch = None
            self.model = None  # and no watched item later
        if self.watch is None and self.model is not None:
            left = None if self.length is None else self.length - self.probe.count
            rest = _rest(left, self.probe.count, self.model)[0]
            if (
                seconds >= TRUSTED_BATCH_SECONDS  # not the call's overhead alone
                and per_item >= GIL_ITEM_SECONDS
                and rest * per_item >= WORTH_SECONDS
            ):
                self.watch = _GilWatch()  # enough work left for the GIL to matter


def decide(probe: Probe, remaining: int | None, model: Model) -> AutoChoice:
    """The choice for the items after the probe (``remaining``: ``None`` if unknown)."""
    m = probe.measured
    if probe.exhausted or m is None or remaining == 0:
        seconds = m.seconds_per_item if m else None
        return AutoChoice("serial", 1, probe.count, seconds, {}, "the probe ran every item")
    rest, known = _rest(remaining, probe.count, model)
    predicted, threads = _predicted(m, rest, model)
    chosen = choose(predicted, [a for a in model.allowed if a in predicted])
    n = {
        "serial": 1,
        "thread": max(1, min(threads, rest)),
        "process": max(1, min(model.workers, rest)),
    }[chosen]
    reason = (
        f"{m.items} items measured: {m.seconds_per_item * 1e6:.3g} us each, "
        f"{100 * m.cpu_share:.0f}% CPU, GIL free {100 * m.gil_free:.0f}% of the time, "
        + (
            f"{m.item[0]} + {m.result[0]} bytes to pickle per item and result"
            if m.item is not None and m.result is not None
            else "cannot be pickled"
        )
        + f"; {rest}{'' if known else '+'} items left, predicted "
        + ", ".join(f"{k} {v:.3g} s" for k, v in predicted.items())
    )
    return AutoChoice(chosen, n, probe.count, m.seconds_per_item, predicted, reason)


def announce(choice: AutoChoice) -> None:
    """The one debug line on the ``parallelkit`` logger."""
    log.debug(
        "backend='auto' chose %s (%d %s): %s",
        choice.backend,
        choice.workers,
        "worker" if choice.workers == 1 else "workers",
        choice.reason,
    )
