"""A Queue's consumers: items of the head message, taken under the read lock.

::

    get_many(n) ── read lock ──▶ Cursor.take_locked ──▶ the head datagram (peeked, or
                                   │  head id/cursor      received when taken whole)
                                   │  in the shared page
                  lock released ◀──┘ ──▶ Cursor.decode (unpickled outside the lock)

``put_many`` sends many items per message, but ``get`` takes one item and ``get_many(n)``
at most ``n``: the rest of a message stays *in the socket*, at its head, with the number
of its items already taken kept in the shared page (the *cursor*, words ``head id`` and
``head cursor``).  The next consumer, whichever process it is, takes the next items of
that message.  A handle keeps the items it decoded (:class:`Cache`), so a consumer that
takes one item at a time decodes each message once while nobody else takes from it; a
handle's copy is only ever a cache: an item counts as taken when the shared cursor says so.

A consumer killed between the two steps of a commit errs on the side of room (counters are
advanced before the socket operation they stand for) and never hands an item out twice
(the cursor says "all taken" before the datagram is removed).
"""

from __future__ import annotations

import pickle
import socket
from typing import Any, Final

from parallelkit._queue import datagrams
from parallelkit._queue.datagrams import (
    END,
    HAS_FD,
    NOWAIT,
    OUT_OF_BAND_MIN,
    PEEK,
    PICKLE_AT,
    QHEAD,
)
from parallelkit._queue.state import W_ENDED, W_HEAD_CURSOR, W_HEAD_ID, State
from parallelkit._util import fuzz as _fuzz
from parallelkit.errors import QueueClosedError

CLOSED: Final = "every producer closed the queue, and it is empty"


class Cache:
    """Items of the head message this handle decoded, from ``next`` on not yet handed out."""

    __slots__ = ("count", "id", "items", "next")

    def __init__(self, message_id: int, count: int, items: list[Any], next_index: int) -> None:
        self.id = message_id
        self.count = count
        self.items = items
        self.next = next_index


class Taken:
    """What a consumer took under the read lock, decoded after releasing it."""

    __slots__ = ("body", "count", "id", "nparts", "start", "stop")

    def __init__(
        self, body: Any, nparts: int, message_id: int, count: int, start: int, stop: int
    ) -> None:
        self.body = body
        self.nparts = nparts
        self.id = message_id
        self.count = count
        self.start = start
        self.stop = stop


class Cursor:
    """One handle's consumer side: takes from the head message, keeps its decoded items."""

    def __init__(self, sock: socket.socket, peer: socket.socket, state: State) -> None:
        self.sock = sock  # the consumers' end
        self.peer = peer  # the producers' end (to post the end again)
        self.state = state
        self.words = state.words
        self.maxsize = state.maxsize
        self.cache: Cache | None = None
        self.ended = False  # this handle saw the end

    def take_locked(self, limit: int | None) -> list[Any] | Taken | None:  # noqa: PLR0912 - a hot path kept in one frame (a helper call costs more than its branches)
        """Take up to ``limit`` items of the head message (the read lock held).

        Returns the items (from this handle's cache), what to decode, or ``None`` when
        the queue is empty.
        """
        words = self.words
        cache = self.cache
        head_id, cursor = words[W_HEAD_ID], words[W_HEAD_CURSOR]
        if cache is not None:
            if cache.id == head_id and cache.next == cursor:
                stop = cache.count if limit is None else min(cache.count, cursor + limit)
                if stop < cache.count:  # the usual case, inlined: not the last items
                    if self.maxsize:
                        self.state.account(stop - cursor, 0)
                    words[W_HEAD_CURSOR] = stop
                    cache.next = stop
                    return cache.items[cursor:stop]
                self.commit(head_id, cache.count, stop)
                items = cache.items[cursor:stop]
                cache.next = stop
                if stop == cache.count:
                    self.cache = None
                return items
            self.cache = None
        ended = words[W_ENDED]  # before looking: all items were sent before it was set
        sock = self.sock
        while True:
            try:
                head = sock.recv(QHEAD.size, PEEK)
            except BlockingIOError:
                if ended:
                    datagrams.post_end(self.peer)  # for consumers still waiting
                    self.ended = True
                    raise QueueClosedError(CLOSED) from None
                return None
            kind, flags, nparts, count, message_id, body = QHEAD.unpack(head)
            if kind == END:  # left in the socket for every other consumer
                self.ended = True
                raise QueueClosedError(CLOSED)
            start = cursor if message_id == head_id else 0
            if start >= count:  # taken whole by a consumer that died before removing it
                datagrams.remove(sock, flags)
                words[W_HEAD_ID] = 0
                head_id = 0
                continue
            stop = count if limit is None else min(count, start + limit)
            if start == 0 and stop == count:
                if not flags & HAS_FD and body < OUT_OF_BAND_MIN:  # receive, inlined
                    if self.maxsize:
                        self.state.account(count, 0)
                    data = memoryview(sock.recv(QHEAD.size + body, NOWAIT))
                    return Taken(data[QHEAD.size :], nparts, message_id, count, 0, count)
                self.state.account(count, body if flags & HAS_FD else 0)
                data = datagrams.receive(sock, flags, body)
                return Taken(data, nparts, message_id, count, 0, count)
            data = datagrams.receive(sock, flags, body, peek=True)
            if _fuzz.ENABLED:
                _fuzz.point("queue.get.before_commit")
            self.commit(message_id, count, stop, flags=flags, body=body)
            return Taken(data, nparts, message_id, count, start, stop)

    def commit(
        self,
        message_id: int,
        count: int,
        stop: int,
        *,
        flags: int | None = None,
        body: int = 0,
    ) -> None:
        """Mark items up to ``stop`` of the head message taken; remove it once all are."""
        words = self.words
        start = words[W_HEAD_CURSOR] if words[W_HEAD_ID] == message_id else 0
        if stop == count:
            if flags is None:  # from the cache: what the socket holds, look again
                head = self.sock.recv(QHEAD.size, PEEK)
                _, flags, _, _, _, body = QHEAD.unpack(head)
            self.state.account(stop - start, body if flags & HAS_FD else 0)
            words[W_HEAD_CURSOR] = count  # a consumer killed now leaves it taken, not lost
            words[W_HEAD_ID] = message_id
            datagrams.remove(self.sock, flags)
            words[W_HEAD_ID] = 0
        else:
            self.state.account(stop - start, 0)
            words[W_HEAD_CURSOR] = stop
            words[W_HEAD_ID] = message_id  # last: the cursor belongs to this message

    def decode(self, taken: Taken) -> list[Any]:
        """The items ``taken`` stands for; the rest of its message kept in the cache."""
        items: list[Any]
        if taken.nparts == 1:
            # a pickle alone (frames.decode's first case, inlined): the header says no
            # out-of-band buffer, and there is none to copy out of a reused buffer
            items = pickle.loads(taken.body[PICKLE_AT:])
        else:
            items = datagrams.decode(taken.body, taken.nparts)
        if taken.stop < taken.count:
            self.cache = Cache(taken.id, taken.count, items, taken.stop)
        if taken.start == 0 and taken.stop == len(items):
            return items
        return items[taken.start : taken.stop]
