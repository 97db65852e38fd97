"""Log records from workers reach the parent's handlers (issue 20, part 3).

Every role (pool workers, pipeline stages, processes serving channels), under every start
method: the parent's handlers as configured when a record arrives (pytest's ``caplog``,
a handler added after the workers started), with the worker's name and the item's index;
records logged right before a real crash (``os._exit``, SIGKILL, a segfault) arrive;
levels the parent would drop are not even sent; records from several threads of a worker
arrive whole.  Where it matters, under both kinds of log socket: ``SOCK_SEQPACKET`` and
the ``SOCK_DGRAM`` fallback of platforms without it (macOS), forced here; with the
fallback's buffers as small as macOS's are by default, a record goes in pieces.  (CI also
runs this whole file in portable mode, on the fallback.)
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

import parallelkit as pk
import tasks.logs as L
from parallelkit import StartMethod, _platform
from parallelkit._channel import process as _process
from parallelkit._proc import logs as _logs

NAME = "tests.tasks.logs"
# the kinds of log socket this platform can make (portable mode: only the fallback)
KINDS = ["seqpacket", "dgram"] if _platform.OFFERS.seqpacket else ["dgram"]
SMALL = 2048  # bytes: macOS's largest datagram by default (net.local.dgram.maxdgram)


@pytest.fixture(params=KINDS)
def socket_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each kind of log socket; ``dgram``: the fallback forced (only the parent decides:
    the child reads its end's type)."""
    kind: str = request.param
    if kind == "dgram":
        monkeypatch.setattr(_platform, "OFFERS", _platform.OFFERS._replace(seqpacket=False))
    return kind


@pytest.fixture
def small_datagrams(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The fallback forced, and every log socket made meanwhile with buffers as small as
    macOS's by default (Linux keeps a little more: the largest datagram its ends send is
    then a few KB).  Yields those largest sizes; counts the kinds of datagram taken."""
    monkeypatch.setattr(_platform, "OFFERS", _platform.OFFERS._replace(seqpacket=False))
    sizes: list[int] = []
    real = _platform.record_socketpair

    def small() -> tuple[socket.socket, socket.socket]:
        pair = real()
        for end in pair:
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL)
            sizes.append(_platform.max_datagram(end))
        return pair

    monkeypatch.setattr(_platform, "record_socketpair", small)
    yield sizes
    assert sizes
    assert max(sizes) < 10_000  # every record of these tests needs several datagrams


@pytest.fixture
def kinds_taken(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """How many datagrams of each kind (whole, first, middle, last piece) the parent took."""
    seen: dict[int, int] = {}
    real = _logs.Records.take

    def take(self: _logs.Records, datagram: bytes) -> bytes | memoryview | None:
        if self.framed and datagram:
            seen[datagram[0]] = seen.get(datagram[0], 0) + 1
        return real(self, datagram)

    monkeypatch.setattr(_logs.Records, "take", take)
    return seen


@pytest.fixture
def info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=NAME)
    return caplog


def _from_workers(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == NAME and r.process != os.getpid()]


@pytest.mark.timeout(60)
def test_records_reach_the_parents_handlers(
    start_method: StartMethod, socket_kind: str, info: pytest.LogCaptureFixture
) -> None:
    assert pk.run_parallel(
        L.log_levels, range(10), max_workers=2, start_method=start_method
    ) == list(range(10))
    records = _from_workers(info)
    got = sorted((r.levelname, r.getMessage()) for r in records)
    want = sorted(
        [("INFO", f"info {i}") for i in range(10)]
        + [("WARNING", f"warning {i}") for i in range(10)]
    )
    assert got == want  # DEBUG: below the parent's level
    for r in records:
        assert (r.processName or "").startswith("parallelkit-worker-")
        assert r.item_index == int(r.getMessage().split()[1])  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_a_record_comes_before_the_result_logged_after_it(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    seen = []
    for x in pk.imap_parallel(
        L.log_info, range(30), max_workers=2, start_method=start_method, chunksize=1
    ):
        seen.append(x)
        assert f"item {x}" in [r.getMessage() for r in _from_workers(info)]
    assert sorted(seen) == list(range(30))


@pytest.mark.timeout(60)
def test_a_handler_added_after_the_pool_started_sees_records(start_method: StartMethod) -> None:
    logger = logging.getLogger(NAME)
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    handler = Keep()
    logger.setLevel(logging.INFO)
    try:
        with pk.WorkerPool(2, start_method=start_method) as pool:
            assert list(pool.map(L.square, range(4))) == [0, 1, 4, 9]  # workers started
            logger.addHandler(handler)
            assert list(pool.map(L.log_info, range(4))) == [0, 1, 2, 3]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert sorted(r.getMessage() for r in got) == [f"item {i}" for i in range(4)]


@pytest.mark.timeout(60)
def test_levels_lowered_after_the_pool_started_reach_its_workers(
    start_method: StartMethod, socket_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    with pk.WorkerPool(2, start_method=start_method) as pool:
        assert list(pool.map(L.debug_enabled, range(4))) == [False] * 4  # not even formatted
        caplog.set_level(logging.DEBUG, logger=NAME)
        assert list(pool.map(L.debug_enabled, range(4))) == [True] * 4
        assert list(pool.map(L.log_levels, range(2))) == [0, 1]
        caplog.set_level(logging.WARNING, logger=NAME)
        assert pool.submit(L.debug_enabled, 0).result(timeout=30) is False
    debug = [r.getMessage() for r in _from_workers(caplog) if r.levelno == logging.DEBUG]
    assert sorted(debug) == ["debug 0", "debug 1"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("task", [L.log_then_exit, L.log_then_sigkill, L.log_then_segfault])
def test_records_logged_right_before_a_crash_arrive(
    start_method: StartMethod,
    socket_kind: str,
    info: pytest.LogCaptureFixture,
    task: Callable[[int], int],
) -> None:
    with pytest.raises(pk.WorkerCrashedError):
        pk.run_parallel(task, [7], start_method=start_method)
    assert [r.getMessage() for r in _from_workers(info)] == ["last words 7"]


@pytest.mark.timeout(60)
def test_an_exception_arrives_as_text(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    pk.run_parallel(L.log_exception, [3], start_method=start_method)
    (record,) = _from_workers(info)
    assert record.getMessage() == "failed on 3"
    assert record.exc_info is None
    assert record.exc_text is not None
    assert "Traceback" in record.exc_text
    assert "ValueError: bad 3" in record.exc_text
    assert "ValueError: bad 3" in info.text


@pytest.mark.timeout(60)
def test_records_from_several_threads_of_a_worker_arrive_whole(
    start_method: StartMethod, socket_kind: str, info: pytest.LogCaptureFixture
) -> None:
    pk.run_parallel(L.log_from_thread, range(2), max_workers=2, start_method=start_method)
    records = _from_workers(info)
    assert len(records) == 2 * 250
    for r in records:
        kind, x, _, _, pad = r.getMessage().split()
        assert pad == ("y" if kind == "thread" else "z") * 3000
        # the task's own thread names its item; the other threads, none
        assert r.item_index == (int(x) if kind == "task" else None)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_tiny_items_that_log_rarely_name_their_item(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    pk.run_parallel(L.log_rarely, range(6000), max_workers=2, start_method=start_method)
    records = _from_workers(info)
    assert sorted(r.item_index for r in records) == [999, 1999, 2999, 3999, 4999, 5999]  # type: ignore[attr-defined]
    assert all(r.getMessage() == f"rare {r.item_index}" for r in records)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_the_initializers_records_and_unpicklable_extras_arrive(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    pk.run_parallel(
        L.log_unpicklable_extra, [1], start_method=start_method, initializer=L.log_in_initializer
    )
    records = _from_workers(info)
    assert [r.getMessage() for r in records] == ["initializer ran", "extra 1"]
    assert records[0].item_index is None  # type: ignore[attr-defined]
    assert "lock" in repr(records[1].lock)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_forwarding_can_be_turned_off(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    pk.run_parallel(L.log_info, range(3), start_method=start_method, forward_logs=False)
    with pk.WorkerPool(1, start_method=start_method, forward_logs=False) as pool:
        assert list(pool.map(L.log_info, range(3))) == [0, 1, 2]
    assert _from_workers(info) == []


# ------------------------------------------------------------------ pipelines


@pytest.mark.timeout(60)
def test_pipeline_stages_records_reach_the_parent(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    for first in ("map", "filter", "flat_map"):
        info.clear()
        source = pk.Pipeline(range(12), start_method=start_method)
        if first == "map":
            pipeline = source.map(L.log_info, max_workers=2)
        elif first == "filter":
            pipeline = source.filter(L.keep_even_logged, max_workers=2)
        else:
            pipeline = source.flat_map(L.twice_logged, max_workers=2)
        pipeline.map(L.log_info).run()
        records = _from_workers(info)
        firsts = [r for r in records if r.processName.startswith("parallelkit-stage0-")]  # type: ignore[union-attr]
        seconds = [r for r in records if r.processName.startswith("parallelkit-stage1-")]  # type: ignore[union-attr]
        assert len(firsts) == 12
        assert len(firsts) + len(seconds) == len(records)
        for r in firsts:  # the first stage's records name their source item
            assert r.item_index == int(r.getMessage().split()[1])  # type: ignore[attr-defined]
        assert {r.item_index for r in seconds} == {None}  # type: ignore[attr-defined]
        assert seconds


@pytest.mark.timeout(60)
def test_pipeline_records_logged_right_before_a_crash_arrive(
    start_method: StartMethod, socket_kind: str, info: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(pk.PipelineError):
        pk.Pipeline([5], start_method=start_method).map(L.log_then_sigkill).run()
    assert [r.getMessage() for r in _from_workers(info)] == ["last words 5"]


@pytest.mark.timeout(60)
def test_pipeline_forwarding_can_be_turned_off(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    pipeline = pk.Pipeline(range(3), start_method=start_method, forward_logs=False)
    assert pipeline.map(L.log_info).run() == [0, 1, 2]
    assert _from_workers(info) == []


# ------------------------------------------------------------------ channels


@pytest.mark.timeout(60)
def test_a_channel_servers_records_reach_the_parent(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    with pk.start_process(L.log_server, start_method=start_method) as child:
        for text in ("a", "b", "c"):
            assert child.request(text, timeout=30) == text.upper()
            # handled before the reply it logged before was received
            assert _from_workers(info)[-1].getMessage() == f"server got {text}"
    records = _from_workers(info)
    assert [r.getMessage() for r in records] == ["server got a", "server got b", "server got c"]
    assert all(r.processName == "parallelkit-channel-log_server" for r in records)
    assert all(r.item_index is None for r in records)  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_a_channel_servers_records_arrive_while_nobody_receives(
    start_method: StartMethod, socket_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    arrived = threading.Event()

    class Signal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            arrived.set()

    handler = Signal()
    logging.getLogger(NAME).addHandler(handler)
    try:
        with pk.start_process(L.log_server_quietly, start_method=start_method):
            assert arrived.wait(30)  # the hub thread handled it: we never called recv
            assert [t.name for t in threading.enumerate()].count("parallelkit-logs") == 1
    finally:
        logging.getLogger(NAME).removeHandler(handler)
    assert "parallelkit-logs" not in [t.name for t in threading.enumerate()]


@pytest.mark.timeout(60)
def test_a_channel_servers_last_records_before_a_crash_arrive(
    start_method: StartMethod, socket_kind: str, info: pytest.LogCaptureFixture
) -> None:
    with pk.start_process(L.log_server_then_crash, start_method=start_method) as child:
        with pytest.raises(pk.ChannelClosedError):
            child.recv(timeout=30)
        child.join(30)
    assert [r.getMessage() for r in _from_workers(info)] == ["server last words"]


@pytest.mark.timeout(60)
def test_a_channels_parent_reads_the_log_socket_only_at_messages_the_child_logged_before(
    start_method: StartMethod,
    socket_kind: str,
    info: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The child flags a message it sent records before; at the others, recv does not look
    # at the log socket (a system call per message, most of the round trip's extra time).
    here = threading.get_ident()
    reads: list[int] = []
    real = _logs.LogPipe.read

    def read(self: _logs.LogPipe) -> list[dict[str, Any]]:
        if threading.get_ident() == here:  # (not the hub thread's)
            reads.append(len(_from_workers(info)))
        return real(self)

    monkeypatch.setattr(_logs.LogPipe, "read", read)
    with pk.start_process(L.log_server_when_asked, start_method=start_method) as child:
        for text in ("a", "b", "c"):
            assert child.request(text, timeout=30) == text.upper()
        assert reads == []
        assert child.request("log d", timeout=30) == "LOG D"
        assert [r.getMessage() for r in _from_workers(info)] == ["server got log d"]
        assert child.request("e", timeout=30) == "E"
        assert child.request("log big", timeout=30) == b"log big" * 20_000
        assert _from_workers(info)[-1].getMessage() == "server got log big"
        assert child.request("big", timeout=30) == b"big" * 20_000
        assert len(reads) == 2
    assert [r.getMessage() for r in _from_workers(info)] == [
        "server got log d",
        "server got log big",
    ]


@pytest.mark.timeout(60)
def test_a_channel_servers_record_comes_before_a_message_that_overtook_the_one_after_it(
    start_method: StartMethod,
    socket_kind: str,
    info: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The child's thread logs, counts its records for "first", and is held; its main thread
    # sends "second", which leaves before "first": it must say "records first" too.  No hub
    # thread here: only recv reads the child's records.
    monkeypatch.setattr(_process, "watch", lambda pipe: None)
    with pk.start_process(L.log_then_send_overtaken, start_method=start_method) as child:
        assert child.recv(timeout=30) == "second"
        assert [r.getMessage() for r in _from_workers(info)] == ["logged before first"]
        assert child.recv(timeout=30) == "first"
        child.send("done")
    assert [r.getMessage() for r in _from_workers(info)] == ["logged before first"]


@pytest.mark.timeout(60)
def test_channel_forwarding_can_be_turned_off(
    start_method: StartMethod, info: pytest.LogCaptureFixture
) -> None:
    with pk.start_process(L.log_server, start_method=start_method, forward_logs=False) as child:
        assert child.request("x", timeout=30) == "X"
    assert _from_workers(info) == []


# ------------------------------------------------------------------ records in pieces


def _big(x: int) -> str:
    return f"big {x} {L.big_text(x, 60_000)}"


def _pieces_ran(kinds: dict[int, int]) -> None:
    assert kinds.get(1, 0) > 0  # first pieces ...
    assert kinds.get(2, 0) > 0  # ... middle ones ...
    assert kinds.get(1) == kinds.get(3)  # ... and as many last ones


@pytest.mark.timeout(90)
def test_a_record_larger_than_a_datagram_arrives_whole(
    start_method: StartMethod,
    small_datagrams: list[int],
    kinds_taken: dict[int, int],
    info: pytest.LogCaptureFixture,
) -> None:
    assert pk.run_parallel(L.log_big, range(6), max_workers=2, start_method=start_method) == list(
        range(6)
    )
    records = _from_workers(info)
    assert sorted(r.getMessage() for r in records) == sorted(_big(x) for x in range(6))
    assert all(r.item_index == int(r.getMessage().split()[1]) for r in records)  # type: ignore[attr-defined]
    _pieces_ran(kinds_taken)


@pytest.mark.timeout(90)
def test_a_record_in_pieces_logged_right_before_sigkill_arrives_whole(
    start_method: StartMethod,
    small_datagrams: list[int],
    kinds_taken: dict[int, int],
    info: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(pk.WorkerCrashedError):
        pk.run_parallel(L.log_big_then_sigkill, [7], start_method=start_method)
    assert [r.getMessage() for r in _from_workers(info)] == [_big(7)]
    _pieces_ran(kinds_taken)


@pytest.mark.timeout(90)
def test_records_in_pieces_from_several_threads_arrive_whole(
    start_method: StartMethod,
    small_datagrams: list[int],
    kinds_taken: dict[int, int],
    info: pytest.LogCaptureFixture,
) -> None:
    pk.run_parallel(L.log_big_from_threads, range(2), max_workers=2, start_method=start_method)
    got = sorted(r.getMessage() for r in _from_workers(info))
    want = sorted(
        f"thread {x} {t} {i} {L.big_text(x * 100 + t, 9_000)}"
        for x in range(2)
        for t in range(4)
        for i in range(10)
    )
    assert got == want
    _pieces_ran(kinds_taken)


@pytest.mark.timeout(90)
def test_pipeline_records_in_pieces_arrive_whole_also_right_before_sigkill(
    start_method: StartMethod,
    small_datagrams: list[int],
    kinds_taken: dict[int, int],
    info: pytest.LogCaptureFixture,
) -> None:
    assert pk.Pipeline(range(4), start_method=start_method).map(L.log_big, max_workers=2).run() == [
        0,
        1,
        2,
        3,
    ]
    assert sorted(r.getMessage() for r in _from_workers(info)) == [_big(x) for x in range(4)]
    info.clear()
    with pytest.raises(pk.PipelineError):
        pk.Pipeline([5], start_method=start_method).map(L.log_big_then_sigkill).run()
    assert [r.getMessage() for r in _from_workers(info)] == [_big(5)]
    _pieces_ran(kinds_taken)


@pytest.mark.timeout(90)
def test_a_channel_servers_records_in_pieces_come_before_its_reply(
    start_method: StartMethod,
    small_datagrams: list[int],
    kinds_taken: dict[int, int],
    info: pytest.LogCaptureFixture,
) -> None:
    with pk.start_process(L.log_big_server, start_method=start_method) as child:
        for text in ("a", "b"):
            assert child.request(text, timeout=30) == text.upper()
            last = _from_workers(info)[-1].getMessage()
            assert last == f"server got {text} {L.big_text(7, 60_000)}"
    assert len(_from_workers(info)) == 2
    _pieces_ran(kinds_taken)


@pytest.mark.timeout(90)
def test_levels_larger_than_a_datagram_reach_the_workers(
    start_method: StartMethod, small_datagrams: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    # the parent's levels, sent down in pieces: several hundred named loggers with levels
    many = [logging.getLogger(f"{NAME}.many.{i:04d}.{'x' * 30}") for i in range(400)]
    caplog.set_level(logging.INFO, logger=NAME)
    try:
        with pk.WorkerPool(1, start_method=start_method) as pool:
            assert pool.submit(L.debug_enabled, 0).result(timeout=30) is False
            for logger in many:
                logger.setLevel(logging.ERROR)
            caplog.set_level(logging.DEBUG, logger=NAME)
            assert len(pickle.dumps(_logs.current_levels())) > 3 * max(small_datagrams)
            # the parent's end never blocks: a piece goes whenever the worker has taken
            # the one before (before each of its tasks), so it may take a few tasks
            seen = [pool.submit(L.debug_enabled, 0).result(timeout=30) for _ in range(30)]
            assert True in seen
            assert all(seen[seen.index(True) :])  # and they stay
    finally:
        for logger in many:
            logger.setLevel(logging.NOTSET)


# ------------------------------------------------------------------ the fallback's sends


class _Full:
    """A socket whose receiver is full for the first ``full`` sends, as a BSD (macOS)
    datagram socket says with ENOBUFS instead of blocking (Linux blocks: it cannot say it)."""

    def __init__(self, sock: socket.socket, full: int) -> None:
        self.sock = sock
        self.type = sock.type
        self.full = full
        self.sizes: list[int] = []

    def getsockopt(self, level: int, option: int) -> int:
        return self.sock.getsockopt(level, option)

    def send(self, data: bytes) -> int:
        if self.full:
            self.full -= 1
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        self.sizes.append(len(data))
        return self.sock.send(data)


def _dgram_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)


def _take_all(reader: _logs.Records) -> list[bytes]:
    out = []
    while select.select([reader.sock], [], [], 0)[0]:
        record = reader.take(reader.sock.recv(1 << 20))
        if record is not None:
            out.append(bytes(record))
    return out


def test_a_full_receiver_makes_the_sender_wait_not_drop() -> None:
    a, b = _dgram_pair()
    with a, b:
        full = _Full(a, 3)
        sender = _logs.Records(cast(socket.socket, full))
        sender.send(b"x" * 100)
        assert full.full == 0  # it tried again until there was room
        assert _take_all(_logs.Records(b)) == [b"x" * 100]


def test_a_receiver_full_for_long_gets_smaller_pieces_still_whole() -> None:
    a, b = _dgram_pair()
    with a, b:
        full = _Full(a, 2 * 8)  # (8 in a row: the piece halves)
        sender = _logs.Records(cast(socket.socket, full))
        sender.piece = 4096
        data = bytes(range(256)) * 40  # 10,240 bytes
        sender.send(data)
        assert max(full.sizes) <= 1024 + _logs._HEADER.size
        assert _take_all(_logs.Records(b)) == [data]


def test_the_parents_end_does_not_wait_and_finishes_a_half_sent_record_first() -> None:
    a, b = _dgram_pair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL)
        a.setblocking(False)
        sender, reader = _logs.Records(a), _logs.Records(b)
        first = bytes(range(256)) * 60  # several pieces; one fits in flight at a time
        second = b"newer"
        with pytest.raises(BlockingIOError):
            sender.send(first, wait=False)
        got: list[bytes] = []
        for _ in range(100):  # the reader takes what is there; the sender tries again
            got += _take_all(reader)
            try:
                sender.send(second, wait=False)
            except BlockingIOError:
                continue
            break
        got += _take_all(reader)
        assert got == [first, second]


def test_a_datagram_the_system_refuses_as_too_large_is_cut_smaller() -> None:
    a, b = _dgram_pair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL)
        sender = _logs.Records(a)
        sender.piece = 64 * 1024  # more than the system takes: EMSGSIZE, for real
        data = os.urandom(20_000)
        reader = _logs.Records(b)
        got: list[bytes] = []
        thread = threading.Thread(target=lambda: sender.send(data))
        thread.start()  # (it blocks while its pieces are in flight)
        while thread.is_alive() or select.select([b], [], [], 0)[0]:
            if select.select([b], [], [], 0.05)[0]:
                record = reader.take(b.recv(1 << 20))
                if record is not None:
                    got.append(bytes(record))
        thread.join()
        assert got == [data]
        assert sender.piece < _platform.max_datagram(a)


def test_seqpacket_is_offered_only_where_a_pair_can_be_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = socket.socketpair

    def macos(family: int = socket.AF_UNIX, kind: int = socket.SOCK_STREAM) -> Any:
        if kind == socket.SOCK_SEQPACKET:  # what macOS answers
            raise OSError(errno.EPROTONOSUPPORT, os.strerror(errno.EPROTONOSUPPORT))
        return real(family, kind)

    if _platform.LINUX:
        assert _platform.decide().seqpacket
    monkeypatch.setattr(socket, "socketpair", macos)
    offers = _platform.decide()
    assert not offers.seqpacket
    monkeypatch.setattr(_platform, "OFFERS", offers)
    a, b = _platform.record_socketpair()
    with a, b:
        assert a.type == b.type == socket.SOCK_DGRAM
        for end in (a, b):  # raised (macOS: from 2 KB / 4 KB)
            assert end.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= _platform.DGRAM_BUFFER
            assert end.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= _platform.DGRAM_BUFFER


# ------------------------------------------------------------------ the hub thread


@pytest.mark.timeout(60)
def test_the_log_thread_sleeps_once_a_channels_child_has_exited(
    start_method: StartMethod,
    socket_kind: str,
    monkeypatch: pytest.MonkeyPatch,
    info: pytest.LogCaptureFixture,
) -> None:
    # a SOCK_SEQPACKET end reads "end of file" for ever once its child is gone: the
    # thread that reads channel processes' records must not poll it again and again
    polls = [0]
    real_poll = select.poll

    class Counting:
        def __init__(self) -> None:
            self.poller = real_poll()

        def register(self, fd: int, events: int) -> None:
            self.poller.register(fd, events)

        def poll(self, *timeout: Any) -> list[tuple[int, int]]:
            got = self.poller.poll(*timeout)
            if threading.current_thread().name == "parallelkit-logs":
                polls[0] += 1
            return got

    arrived = threading.Event()

    class Signal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            arrived.set()

    handler = Signal()
    monkeypatch.setattr(select, "poll", Counting)
    logging.getLogger(NAME).addHandler(handler)
    try:
        with pk.start_process(L.log_then_quit, start_method=start_method) as child:
            assert arrived.wait(30)  # its record, handled by the thread
            child.join(30)
            assert child.exitcode == 0
            before = polls[0]
            time.sleep(0.3)  # (what the thread does meanwhile: nothing, or spin)
            assert polls[0] - before <= 2
    finally:
        logging.getLogger(NAME).removeHandler(handler)
    assert [r.getMessage() for r in _from_workers(info)] == ["bye"]


@pytest.mark.timeout(90)
def test_records_in_pieces_from_a_worker_and_its_plain_fork_arrive_whole(
    start_method: StartMethod,
    small_datagrams: list[int],
    kinds_taken: dict[int, int],
    info: pytest.LogCaptureFixture,
) -> None:
    # (os.fork in a worker: two processes send through one socket; pieces are told apart
    # by their sender's pid, which the child learns at the fork)
    pk.run_parallel(L.log_big_from_a_plain_fork, [4], start_method=start_method)
    got = sorted(r.getMessage() for r in _from_workers(info))
    want = sorted(
        f"{who} 4 {i} {L.big_text(i, 20_000)}" for who in ("child", "parent") for i in range(3)
    )
    assert got == want
    assert len({r.process for r in _from_workers(info)}) == 2
    _pieces_ran(kinds_taken)
