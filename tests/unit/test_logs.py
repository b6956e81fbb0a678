"""Log records: cutting output into lines, the bounded ring, and batching to a host over a real socket pair."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from boxpark import protocol
from boxpark.guest import logs
from boxpark.guest.logs import LineSplitter, LogRing
from boxpark.protocol import Exit, LogRecord
from boxpark.transport import Channel


def feed_all(splitter: LineSplitter, chunks: list[bytes]) -> list[LogRecord]:
    records: list[LogRecord] = []
    for chunk in chunks:
        got, nbytes = splitter.feed(chunk, len(records) + 1, 7)
        assert nbytes == sum(len(r.data) for r in got)
        records += got
    records += splitter.close(len(records) + 1, 8)
    return records


def rebuild(records: list[LogRecord]) -> bytes:
    """The bytes the records came from: a newline after each non-partial record, but the last if unterminated."""
    return b"".join(r.data + (b"" if r.partial else b"\n") for r in records)


# ------------------------------------------------------------------------------------- splitter


def test_lines_across_reads_and_the_unterminated_last_line() -> None:
    records = feed_all(LineSplitter(2), [b"one\ntw", b"o\n\nthr", b"ee"])
    assert [(r.seq, r.stream, r.partial, r.data) for r in records] == [
        (1, 2, False, b"one"), (2, 2, False, b"two"), (3, 2, False, b""), (4, 2, False, b"three")]
    assert records[-1].time_ns == 8  # the last line is stamped when EOF was read


def test_a_line_over_the_limit_comes_in_pieces_all_but_the_last_partial() -> None:
    splitter = LineSplitter(1, limit=4)
    records = feed_all(splitter, [b"abcdefghij\nxy\nabcd\nabcde\n"])
    assert [(r.partial, r.data) for r in records] == [
        (True, b"abcd"), (True, b"efgh"), (False, b"ij"), (False, b"xy"), (False, b"abcd"),
        (True, b"abcd"), (False, b"e")]


def test_an_unterminated_long_line_is_sent_in_pieces_before_its_end_arrives() -> None:
    splitter = LineSplitter(1, limit=4)
    first, _ = splitter.feed(b"abcdefghij", 1, 0)  # no newline yet: the full pieces go now
    assert [(r.partial, r.data) for r in first] == [(True, b"abcd"), (True, b"efgh")]
    rest, _ = splitter.feed(b"k\n", 3, 0)
    assert [(r.seq, r.partial, r.data) for r in rest] == [(3, False, b"ijk")]
    assert splitter.close(4, 0) == []


def test_output_is_bytes_safe() -> None:
    data = bytes(range(256)) * 3
    assert rebuild(feed_all(LineSplitter(1), [data, b"\n"])) == data + b"\n"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"x", b"\n")), max_size=12),
       st.integers(min_value=1, max_value=9))
def test_splitting_loses_nothing_and_keeps_pieces_within_the_limit(chunks: list[bytes], limit: int) -> None:
    records = feed_all(LineSplitter(1, limit=limit), chunks)
    data = b"".join(chunks)
    rebuilt = rebuild(records)
    if data and not data.endswith(b"\n"):
        rebuilt = rebuilt[:-1]  # the last line had no newline of its own
    assert rebuilt == data
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert all(len(r.data) <= limit for r in records)
    assert all(not r.partial or len(r.data) == limit for r in records)


# ----------------------------------------------------------------------------------------- ring


def make(n: int, start: int = 1, size: int = 1) -> list[LogRecord]:
    return [LogRecord(seq, 0, 1, False, b"x" * size) for seq in range(start, start + n)]


def test_ring_numbers_and_reads_after_a_sequence_number() -> None:
    ring = LogRing()
    ring.append(make(5))
    assert ring.last_seq == 5 and ring.next_seq == 6
    assert ring.read(0) == (0, make(5))
    assert ring.read(3) == (0, make(2, start=4))
    assert ring.read(5) == (0, [])
    assert ring.read(99) == (0, [])


def test_ring_drops_the_oldest_past_its_record_bound_and_counts_them() -> None:
    ring = LogRing(max_records=3)
    ring.append(make(2))
    ring.append(make(3, start=3))
    assert (len(ring), ring.first_seq, ring.dropped, ring.bytes) == (3, 3, 2, 3)
    dropped, records = ring.read(0)
    assert dropped == 2 and [r.seq for r in records] == [3, 4, 5]
    assert ring.read(3)[0] == 0


def test_ring_drops_the_oldest_past_its_byte_bound_but_keeps_the_newest() -> None:
    ring = LogRing(max_bytes=10)
    ring.append(make(4, size=3))  # 12 bytes: the first goes
    assert (ring.first_seq, ring.bytes) == (2, 9)
    ring.append(make(1, start=5, size=50))  # over the bound by itself: kept alone
    assert (ring.first_seq, len(ring), ring.bytes, ring.dropped) == (5, 1, 50, 4)


def test_forgotten_data_is_let_go_not_held_until_some_later_compaction() -> None:
    """A ring of large records holds at most about twice its byte bound, however much went through it."""
    ring = LogRing(max_bytes=100_000)
    for start in range(1, 5001, 10):
        ring.append(make(10, start=start, size=1000))
    assert (len(ring), ring.bytes, ring.first_seq) == (100, 100_000, 4901)
    assert ring.footprint() < 2 * 100_000 + 64 * 1024


def test_the_ring_holds_its_records_compactly() -> None:
    """100k short lines (what the soak's `seq` flood leaves) cost a few bytes each beside their data, not
    a Python object (~100 bytes) per record."""
    ring = LogRing(max_records=100_000)
    splitter = LineSplitter(1)
    data = b"".join(b"%d\n" % n for n in range(1, 300_001))
    for at in range(0, len(data), 65536):
        ring.append_lines(1, 5, *splitter.split(data[at:at + 65536]))
    assert (ring.first_seq, ring.last_seq, ring.dropped) == (200_001, 300_000, 200_000)
    assert ring.footprint() < 2 * (ring.bytes + 17 * 100_000) + 64 * 1024
    dropped, records = ring.read(200_000, max_records=10**9, max_bytes=10**9)
    assert dropped == 0
    assert records == [LogRecord(n, 5, 1, False, b"%d" % n) for n in range(200_001, 300_001)]
    assert all(type(r.data) is bytes and type(r.partial) is bool for r in records[:10])


def test_lines_appended_in_bulk_read_back_as_the_records_feed_makes() -> None:
    """`split` + `append_lines` (the service's path) and `feed` + `append` give the same ring."""
    chunks = [b"one\ntw", b"o\n" + b"z" * 10 + b"\nab", b"c" * 9, b"\n\nlast"]
    bulk, records = LogRing(), LogRing()
    for stream in (1, 2):
        cut, fed = LineSplitter(stream, limit=4), LineSplitter(stream, limit=4)
        for chunk in chunks:
            bulk.append_lines(stream, 3, *cut.split(chunk))
            records.append(fed.feed(chunk, records.next_seq, 3)[0])
        bulk.append_lines(stream, 4, [cut.close_line()])  # type: ignore[list-item]
        records.append(fed.close(records.next_seq, 4))
    assert bulk.read(0, 10**9, 10**9) == records.read(0, 10**9, 10**9)
    got = bulk.read(0, 10**9, 10**9)[1]
    assert [(r.stream, r.partial, r.data) for r in got[:7]] == [
        (1, False, b"one"), (1, False, b"two"), (1, True, b"zzzz"), (1, True, b"zzzz"), (1, False, b"zz"),
        (1, True, b"abcc"), (1, True, b"cccc")]
    assert (got[-1].stream, got[-1].time_ns, got[-1].data) == (2, 4, b"last")


def test_the_ring_stays_right_across_compactions() -> None:
    ring = LogRing(max_records=3000)
    for start in range(1, 20_001, 700):
        ring.append_lines(1, start, [b"%d" % n for n in range(start, start + 700)])
        dropped, records = ring.read(0, max_records=10**9, max_bytes=10**9)
        last = start + 699
        assert [int(r.data) for r in records] == [r.seq for r in records] == list(range(max(1, last - 2999), last + 1))
        assert dropped == ring.dropped == max(0, last - 3000)
        assert ring.bytes == sum(len(r.data) for r in records)
    assert len(ring._starts) < 2 * 3000 + 4096 + 700


def test_read_is_bounded_by_count_and_bytes_but_returns_at_least_one() -> None:
    ring = LogRing()
    ring.append(make(10, size=10))
    assert len(ring.read(0, max_records=4)[1]) == 4
    assert len(ring.read(0, max_bytes=35)[1]) == 3
    ring.append(make(1, start=11, size=100))
    assert [r.seq for r in ring.read(10, max_bytes=35)[1]] == [11]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=0, max_value=30), max_size=40), max_size=30),
       st.integers(min_value=1, max_value=50), st.integers(min_value=1, max_value=300))
def test_ring_keeps_exactly_the_longest_suffix_within_both_bounds(appends: list[list[int]], max_records: int,
                                                                   max_bytes: int) -> None:
    ring = LogRing(max_records=max_records, max_bytes=max_bytes)
    everything: list[LogRecord] = []
    for sizes in appends:
        batch = [LogRecord(ring.next_seq + i, 0, 1, False, b"y" * size) for i, size in enumerate(sizes)]
        ring.append(batch)
        everything += batch
        keep = 0
        total = 0
        for record in reversed(everything):
            if keep and (keep + 1 > max_records or total + len(record.data) > max_bytes):
                break
            keep += 1
            total += len(record.data)
        expected = everything[len(everything) - keep:]
        dropped, got = ring.read(0, max_records=10**9, max_bytes=10**9)
        assert got == expected
        assert ring.bytes == total
        assert ring.dropped == dropped == len(everything) - keep


# ------------------------------------------------------------------------------------ batching


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return await Channel.from_socket(a), await Channel.from_socket(b)


async def collect(channel: Channel) -> list[protocol.Message]:
    frames: list[protocol.Message] = []
    while (message := await channel.recv()) is not None:
        frames.append(message)
        if isinstance(message, (Exit, protocol.EndOfStream)):
            break
    return frames


def test_batches_are_bounded_by_count_and_bytes_and_end_with_exit() -> None:
    async def main() -> list[protocol.Message]:
        guest, host = await pair()
        ring = LogRing()
        ring.append(make(2500, size=10))
        ring.append(make(10, start=2501, size=10_000))
        ring.finish(Exit(code=0))
        task = asyncio.ensure_future(logs.follow(guest, ring, "svc", 0, True, batch_records=1000,
                                                 batch_bytes=30_000))
        frames = await collect(host)
        await task
        guest.close()
        host.close()
        return frames

    frames = run(main())
    assert frames[-1] == Exit(code=0)
    batches = frames[:-1]
    assert all(isinstance(b, protocol.LogBatch) and b.service == "svc" for b in batches)
    sizes = [len(b.records) for b in batches]  # type: ignore[union-attr]
    assert sizes == [1000, 1000, 502, 3, 3, 2]
    assert all(sum(len(r.data) for r in b.records) <= 30_000 for b in batches)  # type: ignore[union-attr]
    seqs = [r.seq for b in batches for r in b.records]  # type: ignore[union-attr]
    assert seqs == list(range(1, 2511))


def test_a_stream_that_fell_behind_the_ring_is_told_how_many_it_missed() -> None:
    async def main() -> list[protocol.Message]:
        guest, host = await pair()
        ring = LogRing(max_records=100)
        ring.append(make(250))
        task = asyncio.ensure_future(logs.follow(guest, ring, "svc", 20, False))
        frames = await collect(host)
        await task
        return frames

    frames = run(main())
    first = frames[0]
    assert isinstance(first, protocol.LogBatch)
    assert first.dropped == 130 and first.records[0].seq == 151  # 21..150 were lost
    assert isinstance(frames[-1], protocol.EndOfStream)


def test_a_small_batch_lingers_briefly_then_goes_and_new_records_follow() -> None:
    async def main() -> tuple[float, list[protocol.Message]]:
        guest, host = await pair()
        ring = LogRing()
        task = asyncio.ensure_future(logs.follow(guest, ring, "svc", 0, True, linger=0.05))
        await asyncio.sleep(0.01)
        start = time.monotonic()
        ring.append(make(3))
        first = await host.recv()
        waited = time.monotonic() - start
        ring.append(make(2, start=4))
        second = await host.recv()
        ring.finish(Exit(code=None, signal=9))
        last = await host.recv()
        await task
        return waited, [first, second, last]  # type: ignore[list-item]

    waited, (first, second, last) = run(main())
    assert 0.03 <= waited < 1.0
    assert [r.seq for r in first.records] == [1, 2, 3]  # type: ignore[union-attr]
    assert [r.seq for r in second.records] == [4, 5]  # type: ignore[union-attr]
    assert last == Exit(code=None, signal=9)


def test_a_full_batch_does_not_linger() -> None:
    async def main() -> float:
        guest, host = await pair()
        ring = LogRing()
        task = asyncio.ensure_future(logs.follow(guest, ring, "svc", 0, True, linger=5.0, batch_records=10))
        await asyncio.sleep(0.01)
        start = time.monotonic()
        ring.append(make(10))
        await host.recv()
        waited = time.monotonic() - start
        host.close()  # the stream ends when the host goes away
        await task
        return waited

    assert run(main()) < 1.0


def test_the_stream_ends_when_the_host_goes_away() -> None:
    async def main() -> None:
        guest, host = await pair()
        ring = LogRing()
        task = asyncio.ensure_future(logs.follow(guest, ring, "svc", 0, True))
        await asyncio.sleep(0.01)
        host.close()
        await asyncio.wait_for(task, 5)

    run(main())
