"""Log records of launched processes: cutting output into lines, the bounded ring, and batching to a host.

`LineSplitter` cuts the bytes of one stream into lines (an over-long line becomes pieces flagged
`partial`, all but its last). `LogRing` keeps the newest records of one process within a record and a
byte bound, compactly (not an object per record), dropping (and counting) the oldest, and numbers them
from 1 across both streams; `LogRecord`s are built only for the batch being read.
`follow` sends a ring's records to one host connection in `LogBatch`es bounded by count, bytes and a short
linger, with `dropped` saying how many it missed when it fell behind the ring.

This is the hot path of a flooding service: bytes are split and stored in bulk, records built with `map`,
never one Python statement per line unless a line is over the limit. Nothing here may block the producing
process: the ring never waits for a reader, it forgets the oldest records instead.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import itertools
import operator
import os
import sys
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
    """Cuts one output stream into lines; `split` returns the complete ones, `close` the rest at EOF."""

    __slots__ = ("stream", "limit", "_tail")

    def __init__(self, stream: int, limit: int = LINE_LIMIT) -> None:
        self.stream = stream
        self.limit = limit
        self._tail = b""

    def split(self, data: bytes) -> tuple[list[bytes], list[bool] | None]:
        """The lines (without their newline) completed by `data`, and which are `partial` (None: none is);
        an unterminated rest waits for more."""
        if self._tail:
            data = self._tail + data
        lines = data.split(b"\n")
        tail = lines.pop()
        limit = self.limit
        partials: list[bool] | None = None
        if lines and not (len(data) <= limit or max(map(len, lines)) <= limit):
            pieces: list[bytes] = []
            partials = []
            for line in lines:
                self._pieces(pieces, partials, line, last=True)
            lines = pieces
        if len(tail) > limit:  # an unterminated line over the limit: send its full pieces now
            keep = len(tail) - (len(tail) - 1) // limit * limit
            if partials is None:
                partials = [False] * len(lines)
            self._pieces(lines, partials, tail[:-keep], last=False)
            tail = tail[-keep:]
        self._tail = tail
        return lines, partials

    def feed(self, data: bytes, seq: int, time_ns: int) -> tuple[list[LogRecord], int]:
        """`split` as records numbered from `seq`, and their bytes of data."""
        lines, partials = self.split(data)
        flags = _repeat(False) if partials is None else partials
        records = list(map(LogRecord, range(seq, seq + len(lines)), _repeat(time_ns), _repeat(self.stream),
                           flags, lines))
        return records, sum(map(len, lines))

    def close(self, seq: int, time_ns: int) -> list[LogRecord]:
        """At EOF: the last unterminated line, if any, as a whole (non-partial) record."""
        tail = self.close_line()
        return [LogRecord(seq, time_ns, self.stream, False, tail)] if tail is not None else []

    def close_line(self) -> bytes | None:
        """At EOF: the last unterminated line, if any (a whole line, not partial)."""
        tail, self._tail = self._tail, b""
        return tail or None

    def _pieces(self, out: list[bytes], partials: list[bool], line: bytes, last: bool) -> None:
        limit = self.limit
        if len(line) <= limit:
            out.append(line)
            partials.append(not last)
            return
        starts = range(0, len(line), limit)
        final = starts[-1]
        for start in starts:
            out.append(line[start:start + limit])
            partials.append(not (last and start == final))


_PARTIAL = 0x80  # in a record's flags byte, beside its stream number
_STREAM_OF = bytes(i & 0x7F for i in range(256))
_PARTIAL_OF = bytes(1 if i & _PARTIAL else 0 for i in range(256))


class LogRing:
    """The newest records of one process, within `max_records` and `max_bytes` (of data); at least one.

    Records are numbered from 1 (`next_seq` is the next number). Past either bound the oldest records are
    forgotten and counted in `dropped`. `exit` is set once the process has ended and all of its output is
    in; streams send it after the last record.

    Stored compactly, not as a Python object per record (100k short lines were ~14 MB of objects, and
    what pymalloc keeps of them after a flood is never given back): the data of all records in one
    bytearray, each followed by a newline (no record holds one: they are pieces of lines), and per record
    its data's offset (counted without the newlines, for the byte bound), time and flags (stream, partial)
    in arrays, 17 bytes beside its data. `read` builds `LogRecord`s for one batch at a time (a split of
    one slice). What is forgotten is let go at once: the bytearray's front is cut (CPython gives the
    memory back once less than half of it is live), the arrays' fronts at the next compaction (at most
    twice the records kept).
    """

    def __init__(self, max_records: int = 100_000, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_records = max(1, max_records)
        self.max_bytes = max(1, max_bytes)
        self._data = bytearray()  # the records from _head on, each's data and a newline
        self._base = 0  # the position of _data[0] in all that was ever appended (newlines included)
        self._end = 0  # the offset (newlines not counted) of the end of the newest record's data
        self._starts = array.array("q")  # per record: the offset of its data; before _head, forgotten ones
        self._times = array.array("q")  # per record: time_ns
        self._flags = array.array("B")  # per record: stream | _PARTIAL
        self._head = 0  # index in the arrays of the oldest record kept
        self.first_seq = 1  # the sequence number of that record (or next_seq when empty)
        self.next_seq = 1
        self.bytes = 0
        self.dropped = 0
        self.exit: Exit | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._starts) - self._head

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def footprint(self) -> int:
        """Bytes of memory the ring's storage holds (allocated, not only used)."""
        return sum(map(sys.getsizeof, (self._data, self._starts, self._times, self._flags)))

    def append_lines(self, stream: int, time_ns: int, lines: list[bytes], partials: list[bool] | None = None) -> None:
        """Add `lines` of `stream` (as `LineSplitter.split` cut them), numbered from `next_seq` on."""
        count = len(lines)
        if not count:
            return
        offsets = list(itertools.accumulate(map(len, lines), initial=self._end))
        end = offsets.pop()
        self._starts.extend(offsets)
        self._times.extend(array.array("q", (time_ns,)) * count)
        if partials is None:
            self._flags.extend(array.array("B", (stream,)) * count)
        else:
            self._flags.extend([stream | _PARTIAL if partial else stream for partial in partials])
        self._data += b"\n".join(lines)
        self._data += b"\n"
        self._stored(count, end)

    def append(self, records: list[LogRecord], nbytes: int | None = None) -> None:
        """Add records numbered from `next_seq` on (as `LineSplitter.feed` made them); `nbytes` is not needed."""
        if not records:
            return
        datas = list(map(_data, records))
        offsets = list(itertools.accumulate(map(len, datas), initial=self._end))
        end = offsets.pop()
        self._starts.extend(offsets)
        self._times.extend([record.time_ns for record in records])
        self._flags.extend([record.stream | _PARTIAL if record.partial else record.stream for record in records])
        self._data += b"\n".join(datas)
        self._data += b"\n"
        self._stored(len(records), end)

    def _stored(self, count: int, end: int) -> None:
        self.bytes += end - self._end
        self._end = end
        self.next_seq += count
        if len(self._starts) - self._head > self.max_records or self.bytes > self.max_bytes:
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
        starts = self._starts
        start = self._head + index
        stop = min(len(starts), start + max(1, max_records))
        if start >= stop:
            return 0, []
        first = starts[start]
        if self._end_of(stop - 1) - first > max_bytes:  # as many as fit, but at least one
            stop = max(start + 1, bisect.bisect_right(starts, first + max_bytes, start + 1, stop) - 1)
        seq = self.first_seq + index
        count = stop - start
        at = first + seq - 1 - self._base  # where in _data: each record before it added a newline
        datas = bytes(self._data[at:at + self._end_of(stop - 1) - first + count]).split(b"\n")
        flags = self._flags[start:stop].tobytes()
        records = list(map(LogRecord, range(seq, seq + count), self._times[start:stop],
                           flags.translate(_STREAM_OF), map(bool, flags.translate(_PARTIAL_OF)), datas))
        return dropped, records

    def _end_of(self, index: int) -> int:
        return self._starts[index + 1] if index + 1 < len(self._starts) else self._end

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
        starts = self._starts
        head = self._head
        keep_from = max(head, len(starts) - self.max_records)
        if self._end - starts[keep_from] > self.max_bytes:  # the first whose data to the end fits, or the newest
            keep_from = bisect.bisect_left(starts, self._end - self.max_bytes, keep_from, len(starts) - 1)
        drop = keep_from - head
        self._head = keep_from
        self.first_seq += drop
        self.dropped += drop
        self.bytes = self._end - starts[keep_from]
        cut = starts[keep_from] + self.first_seq - 1 - self._base
        if cut:
            del self._data[:cut]  # cheap (the bytearray's start moves); reallocated once mostly dead
            self._base += cut
        if self._head > 4096 and self._head * 2 > len(starts):
            del starts[:self._head]
            del self._times[:self._head]
            del self._flags[:self._head]
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


