"""Log records of launched processes: cutting output into lines, the bounded ring, and batching to a host.

`LineSplitter` turns the bytes of one stream into `LogRecord`s (one per line; an over-long line becomes
pieces flagged `partial`, all but its last). `LogRing` keeps the newest records of one process within a
record and a byte bound, dropping (and counting) the oldest, and numbers them from 1 across both streams.
`follow` sends a ring's records to one host connection in `LogBatch`es bounded by count, bytes and a short
linger, with `dropped` saying how many it missed when it fell behind the ring.

This is the hot path of a flooding service: bytes are split in bulk and records built with `map`, never
one Python statement per line unless a line is over the limit. Nothing here may block the producing
process: the ring never waits for a reader, it forgets the oldest records instead.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import operator
import os
from typing import Callable

from ..protocol import EndOfStream, Exit, LogBatch, LogRecord
from ..transport import Channel

LINE_LIMIT = 16 * 1024
"""A line longer than this is cut into pieces of this size (all but the last flagged `partial`)."""

BATCH_RECORDS = 1000
BATCH_BYTES = 64 * 1024
"""A `LogBatch` holds at most this many records and (past its first record) this many bytes of data."""

STREAM_BUFFER = 4 * 1024 * 1024
"""Encoded batches a stream lets wait in the socket, and as many in its write buffer, for a host that pauses
(a descheduled client, a busy host): without it a flooding service outruns the ring in a few tens of ms."""

LINGER = 0.02
"""How long a stream waits for a batch to fill before sending what it has (seconds)."""

_data = operator.attrgetter("data")
_repeat = itertools.repeat


class LineSplitter:
    """Cuts one output stream into records; `feed` returns the complete ones, `close` the rest at EOF."""

    __slots__ = ("stream", "limit", "_tail")

    def __init__(self, stream: int, limit: int = LINE_LIMIT) -> None:
        self.stream = stream
        self.limit = limit
        self._tail = b""

    def feed(self, data: bytes, seq: int, time_ns: int) -> tuple[list[LogRecord], int]:
        """The records completed by `data`, numbered from `seq`, and their bytes of data; an unterminated
        rest waits for more."""
        if self._tail:
            data = self._tail + data
        lines = data.split(b"\n")
        tail = lines.pop()
        limit = self.limit
        if lines and (len(data) <= limit or max(map(len, lines)) <= limit):
            records = list(map(LogRecord, range(seq, seq + len(lines)), _repeat(time_ns), _repeat(self.stream),
                               _repeat(False), lines))
        elif lines:
            records = []
            for line in lines:
                self._pieces(records, line, seq + len(records), time_ns, last=True)
        else:
            records = []
        if len(tail) > limit:  # an unterminated line over the limit: send its full pieces now
            keep = len(tail) - (len(tail) - 1) // limit * limit
            self._pieces(records, tail[:-keep], seq + len(records), time_ns, last=False)
            tail = tail[-keep:]
        self._tail = tail
        return records, len(data) - len(tail) - len(lines)

    def close(self, seq: int, time_ns: int) -> list[LogRecord]:
        """At EOF: the last unterminated line, if any, as a whole (non-partial) record."""
        tail, self._tail = self._tail, b""
        return [LogRecord(seq, time_ns, self.stream, False, tail)] if tail else []

    def _pieces(self, out: list[LogRecord], line: bytes, seq: int, time_ns: int, last: bool) -> None:
        limit = self.limit
        if len(line) <= limit:
            out.append(LogRecord(seq, time_ns, self.stream, not last, line))
            return
        starts = range(0, len(line), limit)
        final = starts[-1]
        for start in starts:
            out.append(LogRecord(seq, time_ns, self.stream, not (last and start == final),
                                 line[start:start + limit]))
            seq += 1


class LogRing:
    """The newest records of one process, within `max_records` and `max_bytes` (of data); at least one.

    Records are numbered from 1 (`next_seq` is the next number). Past either bound the oldest records are
    forgotten and counted in `dropped`. `exit` is set once the process has ended and all of its output is
    in; streams send it after the last record.
    """

    def __init__(self, max_records: int = 100_000, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_records = max(1, max_records)
        self.max_bytes = max(1, max_bytes)
        self._records: list[LogRecord] = []  # before _head: None, forgotten records awaiting compaction
        self._head = 0  # index in _records of the oldest record kept
        self.first_seq = 1  # the sequence number of that record (or next_seq when empty)
        self.next_seq = 1
        self.bytes = 0
        self.dropped = 0
        self.exit: Exit | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._records) - self._head

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def append(self, records: list[LogRecord], nbytes: int | None = None) -> None:
        """Add records numbered from `next_seq` on (as `LineSplitter.feed` made them)."""
        if not records:
            return
        self._records += records
        self.next_seq += len(records)
        self.bytes += sum(map(len, map(_data, records))) if nbytes is None else nbytes
        if len(self._records) - self._head > self.max_records or self.bytes > self.max_bytes:
            self._trim()
        self._wake()

    def finish(self, exit: Exit) -> None:
        self.exit = exit
        self._wake()

    def read(self, after: int, max_records: int = BATCH_RECORDS,
             max_bytes: int = BATCH_BYTES) -> tuple[int, list[LogRecord]]:
        """The records after sequence number `after` (up to the bounds; at least one if there is any), and
        how many records between `after` and the first of them were forgotten."""
        index = after + 1 - self.first_seq
        dropped = 0
        if index < 0:
            dropped, index = -index, 0
        start = self._head + index
        records = self._records[start:start + max_records]
        if len(records) > 1:
            sizes = list(itertools.accumulate(map(len, map(_data, records))))
            if sizes[-1] > max_bytes:
                del records[max(1, bisect.bisect_right(sizes, max_bytes)):]
        return (dropped if records else 0), records

    def waiter(self) -> asyncio.Future[None]:
        """A future that completes on the next append or finish."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _trim(self) -> None:
        records = self._records
        count = len(records) - self._head
        drop = max(0, count - self.max_records)
        if drop:
            self.bytes -= sum(map(len, map(_data, records[self._head:self._head + drop])))
        over = self.bytes - self.max_bytes
        if over > 0:  # find how many more of the oldest records hold `over` bytes, in bulk
            window = 64
            while True:
                start = self._head + drop
                room = count - drop - 1  # always keep the newest record
                chunk = records[start:start + min(window, room)]
                sizes = list(itertools.accumulate(map(len, map(_data, chunk))))
                if sizes and sizes[-1] >= over:
                    n = bisect.bisect_left(sizes, over) + 1
                    drop += n
                    self.bytes -= sizes[n - 1]
                    break
                drop += len(chunk)
                if sizes:
                    self.bytes -= sizes[-1]
                    over -= sizes[-1]
                if len(chunk) >= room:
                    break
                window *= 4
        # What is forgotten is freed now, not at the next compaction: the ring's memory stays within its
        # bounds (plus a pointer per forgotten slot) whatever the size of its records.
        records[self._head:self._head + drop] = _repeat(None, drop)  # type: ignore[list-item]
        self._head += drop
        self.first_seq += drop
        self.dropped += drop
        if self._head > 4096 and self._head * 2 > len(records):
            del records[:self._head]
            self._head = 0


async def follow(channel: Channel, ring: LogRing, service: str, since: int = 0, follow: bool = True, *,
                 linger: float = LINGER, batch_records: int = BATCH_RECORDS,
                 batch_bytes: int = BATCH_BYTES) -> None:
    """Send `ring`'s records after `since` as `LogBatch`es, then its `Exit` once it has one.

    With `follow=False`, stop at the records present now with `EndOfStream` (or `Exit` if the process
    has ended and all its records were sent). Returns early when the peer closes or sends anything.
    A batch that is not full waits up to `linger` for more records (never once the process has ended).
    """
    loop = asyncio.get_running_loop()
    channel.set_send_buffer(STREAM_BUFFER)
    peer = asyncio.ensure_future(channel.recv())
    waiting: list[asyncio.Future[None]] = []  # the wait in progress, woken when the peer goes
    peer.add_done_callback(lambda done: _peer_went(done, waiting))
    end = ring.last_seq  # without follow: the last record to send
    cursor = since
    lingered = False
    try:
        while not peer.done():
            limit = batch_records if follow else min(batch_records, end - cursor)
            dropped, records = ring.read(cursor, limit, batch_bytes) if limit > 0 else (0, [])
            if records:
                if (follow and not lingered and linger > 0 and ring.exit is None and len(records) < limit
                        and records[-1].seq == ring.last_seq):
                    lingered = True  # all there is makes a small batch: give it a moment to fill
                    await _linger(loop, ring, cursor + limit, loop.time() + linger, waiting, peer)
                    continue
                lingered = False
                channel.send(LogBatch(service=service, records=records, dropped=dropped))
                cursor = records[-1].seq
                await channel.drain()
                continue
            if ring.exit is not None and cursor >= ring.last_seq:
                channel.send(ring.exit)
                return
            if not follow:
                channel.send(EndOfStream())
                return
            waiter = ring.waiter()
            waiting[:] = [waiter]
            await waiter
    finally:
        peer.cancel()


async def _linger(loop: asyncio.AbstractEventLoop, ring: LogRing, full: int, deadline: float,
                  waiting: list[asyncio.Future[None]], peer: asyncio.Future[object]) -> None:
    """Wait until the ring holds records up to `full`, it ends, `deadline` passes or the peer goes away."""
    while ring.last_seq < full and ring.exit is None and not peer.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        waiter = ring.waiter()
        waiting[:] = [waiter]
        timer = loop.call_later(remaining, _set, waiter)
        try:
            await waiter
        finally:
            timer.cancel()


def _peer_went(peer: asyncio.Future[object], waiting: list[asyncio.Future[None]]) -> None:
    if not peer.cancelled():
        peer.exception()  # a bad frame from the host ends the stream like a close does; nothing to log
    for future in waiting:
        _set(future)


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class OutputReader:
    """Reads one non-blocking fd on the loop as data arrives, handing each chunk to `on_data`.

    At EOF (or EIO, which a pty master reports once every slave is closed) it stops, closes the fd and
    calls `on_eof`. `close()` stops it early, `discard_rest()` stops delivering. It never pauses: the
    producer is never blocked by us.
    """

    __slots__ = ("fd", "_loop", "_on_data", "_on_eof", "_size")

    def __init__(self, fd: int, on_data: Callable[[bytes], None], on_eof: Callable[[], None],
                 size: int = 64 * 1024) -> None:
        self.fd = fd
        self._loop = asyncio.get_running_loop()
        self._on_data = on_data
        self._on_eof = on_eof
        self._size = size
        self._loop.add_reader(fd, self._ready)

    @property
    def open(self) -> bool:
        return self.fd >= 0

    def _ready(self) -> None:
        try:
            data = os.read(self.fd, self._size)
        except BlockingIOError:
            return
        except OSError:  # EIO from a pty master whose slave is closed: the end of its output
            data = b""
        if data:
            self._on_data(data)
        else:
            self.close()
            self._on_eof()

    def drain(self, limit: int = 16) -> None:
        """Read what is buffered now (at most `limit` reads, without waiting), e.g. before giving up on it."""
        for _ in range(limit):
            if self.fd < 0:
                return
            try:
                data = os.read(self.fd, self._size)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                self._on_eof()
                return
            self._on_data(data)

    def discard_rest(self) -> None:
        """Deliver nothing more, but go on reading (and dropping) to EOF, then close: a writer left behind
        (a daemon that kept the pipe) never gets EPIPE from us."""
        self._on_data = _ignore
        self._on_eof = _nothing

    def close(self) -> None:
        if self.fd >= 0:
            self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


def _ignore(data: bytes) -> None:
    pass


def _nothing() -> None:
    pass


