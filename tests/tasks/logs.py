"""Task functions that log, for the tests of log records from workers (test_logs.py)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading

from parallelkit import Channel
from parallelkit._util import fuzz

logger = logging.getLogger("tests.tasks.logs")


def log_info(x: int) -> int:
    logger.info("item %d", x)
    return x


def log_levels(x: int) -> int:
    logger.debug("debug %d", x)
    logger.info("info %d", x)
    logger.warning("warning %d", x)
    return x


def log_rarely(x: int) -> int:
    if x % 1000 == 999:
        logger.warning("rare %d", x)
    return x * x


def log_exception(x: int) -> int:
    try:
        raise ValueError(f"bad {x}")
    except ValueError:
        logger.exception("failed on %d", x)
    return x


def log_from_thread(x: int) -> int:
    def work() -> None:
        for i in range(50):
            logger.warning("thread %d line %d %s", x, i, "y" * 3000)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(50):
        logger.warning("task %d line %d %s", x, i, "z" * 3000)
    for t in threads:
        t.join()
    return x


def log_then_exit(x: int) -> int:
    logger.warning("last words %d", x)
    os._exit(3)


def log_then_sigkill(x: int) -> int:
    logger.warning("last words %d", x)
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def log_then_segfault(x: int) -> int:
    logger.warning("last words %d", x)
    ctypes.string_at(0)  # SIGSEGV
    return x


def log_unpicklable_extra(x: int) -> int:
    logger.warning("extra %d", x, extra={"lock": threading.Lock()})
    return x


def log_in_initializer() -> None:
    logger.warning("initializer ran")


def square(x: int) -> int:
    return x * x


def log_server(channel: Channel[str, str]) -> None:
    for text in channel:
        logger.warning("server got %s", text)
        channel.send(text.upper())


def debug_enabled(x: int) -> bool:
    return logger.isEnabledFor(logging.DEBUG)


def keep_even_logged(x: int) -> bool:
    logger.info("filter %d", x)
    return x % 2 == 0


def twice_logged(x: int) -> list[int]:
    logger.info("flat %d", x)
    return [x, x]


def log_server_when_asked(channel: Channel[str | bytes, str]) -> None:
    """Logs only the requests that start with "log"; answers "big ..." with 100 KB of
    bytes (a frame with a buffer), the others with the text in capitals."""
    for text in channel:
        if text.startswith("log"):
            logger.warning("server got %s", text)
        channel.send(text.encode() * 20_000 if text.endswith("big") else text.upper())


def log_then_send_overtaken(channel: Channel[str, str]) -> None:
    """A thread logs, then sends "first", held right after it counted the records sent; the
    main thread sends "second" meanwhile, which leaves before "first"."""
    counted = threading.Event()
    overtaken = threading.Event()

    def point(name: str) -> None:
        if name == "channel.send.records_counted" and threading.current_thread() is thread:
            counted.set()
            overtaken.wait(30)

    def log_and_send() -> None:
        logger.warning("logged before first")
        channel.send("first")

    fuzz.point = point  # (this child's own schedule: the fuzzer's points, held here)
    setattr(fuzz, "ENABLED", True)  # noqa: B010 - a Final constant, switched on for this child
    thread = threading.Thread(target=log_and_send)
    thread.start()
    counted.wait(30)
    channel.send("second")
    overtaken.set()
    thread.join(30)
    channel.recv()  # until the parent is done


def log_server_then_crash(channel: Channel[str, str]) -> None:
    logger.warning("server last words")
    os.kill(os.getpid(), signal.SIGKILL)


def log_server_quietly(channel: Channel[str, str]) -> None:
    logger.warning("logged while nobody reads")
    for _ in channel:
        pass


def big_text(x: int, size: int) -> str:
    """``size`` characters that name their place: a piece lost, doubled or out of order
    shows."""
    text = "".join(f"<{x}:{i}>" for i in range(size // 4))
    return text[:size]


def log_big(x: int) -> int:
    logger.warning("big %d %s", x, big_text(x, 60_000))
    return x


def log_big_then_sigkill(x: int) -> int:
    logger.warning("big %d %s", x, big_text(x, 60_000))
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def log_big_from_threads(x: int) -> int:
    """Records of several pieces each, from four threads at once."""

    def work(t: int) -> None:
        for i in range(10):
            logger.warning("thread %d %d %d %s", x, t, i, big_text(x * 100 + t, 9_000))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return x


def log_big_server(channel: Channel[str, str]) -> None:
    for text in channel:
        logger.warning("server got %s %s", text, big_text(7, 60_000))
        channel.send(text.upper())


def log_then_quit(channel: Channel[str, str]) -> None:
    logger.warning("bye")


def log_big_from_a_plain_fork(x: int) -> int:
    """The worker forks (os.fork: the child shares its log socket) and both log records
    of several pieces at once."""
    pid = os.fork()
    who = "child" if pid == 0 else "parent"
    for i in range(3):
        logger.warning("%s %d %d %s", who, x, i, big_text(i, 20_000))
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return x
