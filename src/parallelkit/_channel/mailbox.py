"""Request/reply correlation for a channel end: who gets which incoming message.

One thread at a time reads frames (the *reader*) and files each where it belongs: a
plain message in the inbox for ``recv``, a reply under its request's id for the thread
whose ``request`` waits for it; the others wait on a condition, or take over reading when
it is free.  A thread that receives a request owes the reply: its next ``send`` on that
end carries the request's id back (:meth:`Mailbox.unanswered`).  A reply nobody waits
for any more (its request timed out) is dropped.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from parallelkit._util import fuzz as _fuzz

__all__ = ("REPLY", "REQUEST", "Mailbox", "timeout_message")

REQUEST: Final = 0x40  # a frame sent by request(): the receiving thread's next send answers it
REPLY: Final = 0x80  # the answer to the request with that id

# Reads one frame as the reader: (deadline, the request waited for or 0) -> (message,
# tag, request id); the tag is 0, REQUEST or REPLY.
Read = Callable[[float | None, int], tuple[object, int, int]]


def timeout_message(request_id: int) -> str:
    """What :class:`TimeoutError` says when a request (or, with 0, ``recv``) times out."""
    if request_id:
        return "no reply arrived in time (a late reply to this request will be discarded)"
    return "no message arrived in time"


class Mailbox:
    """The incoming messages of one channel end, filed for the threads that wait for them."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()  # `with` on it directly: cheaper than the condition's
        self._cond = threading.Condition(self._mutex)
        self._inbox: deque[tuple[object, int]] = deque()  # (message, request id or 0)
        self._replies: dict[int, object] = {}
        self._waiting: set[int] = set()  # requests waiting for their reply
        self._reading = False
        self._sleepers = 0
        self._request_ids = itertools.count(1)
        self._local = threading.local()  # .pending: requests this thread received, unanswered

    def has_mail(self) -> bool:
        """Whether a message for ``recv`` is filed."""
        return bool(self._inbox)

    def unanswered(self) -> deque[int] | None:
        """The requests this thread received and did not answer yet, oldest first.

        The caller sends its next message as the reply to the first, then pops it.
        """
        pending: deque[int] | None = getattr(self._local, "pending", None)
        return pending

    def new_request(self) -> int:
        """A fresh request id, whose reply will be kept for :meth:`wait`."""
        request_id = next(self._request_ids)
        with self._mutex:
            self._waiting.add(request_id)
        return request_id

    def forget(self, request_id: int) -> None:
        """The request is over (timed out or failed): drop its late reply.  (One that
        :meth:`wait` answered is forgotten already.)"""
        with self._mutex:
            self._waiting.discard(request_id)
            self._replies.pop(request_id, None)

    def wait(self, request_id: int, deadline: float | None, read: Read) -> object:  # noqa: PLR0912,PLR0915 - one wait loop: every outcome of a read is handled under one lock
        """The reply to ``request_id`` (then forgotten), or (0) the next message that is
        not a reply.

        Raises:
            TimeoutError: nothing came by ``deadline`` (a ``time.monotonic()``).
            BaseException: what ``read`` raised.
        """
        cond, mutex = self._cond, self._mutex
        while True:
            with mutex:
                while True:
                    if request_id:
                        if request_id in self._replies:
                            self._waiting.discard(request_id)
                            return self._replies.pop(request_id)
                    elif self._inbox:
                        message, asked = self._inbox.popleft()
                        if asked:
                            self._received_request(asked)
                        return message
                    if not self._reading:
                        self._reading = True
                        break
                    if deadline is None:
                        self._sleepers += 1
                        cond.wait()
                        self._sleepers -= 1
                    else:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError(timeout_message(request_id))
                        self._sleepers += 1
                        cond.wait(left)
                        self._sleepers -= 1
            try:
                message, tag, tag_id = read(deadline, request_id)
            except BaseException:
                with mutex:
                    self._reading = False
                    if self._sleepers:
                        cond.notify_all()
                raise
            with mutex:
                self._reading = False
                mine = False
                if tag == REPLY:
                    if tag_id == request_id:
                        self._waiting.discard(request_id)
                        mine = True
                    elif tag_id in self._waiting:
                        self._replies[tag_id] = message
                    # else: the reply to a request that gave up: discarded
                    elif _fuzz.ENABLED:
                        _fuzz.point("channel.late_reply_dropped")
                elif not request_id and not self._inbox:
                    mine = True
                else:
                    self._inbox.append((message, tag_id if tag == REQUEST else 0))
                if self._sleepers:
                    cond.notify_all()
            if mine:
                if tag == REQUEST:
                    self._received_request(tag_id)
                return message

    def _received_request(self, request_id: int) -> None:
        """This thread got a request: its next ``send`` on this end is the reply."""
        pending: deque[int] | None = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = deque()
        pending.append(request_id)
