"""The `MemoryStats` call's parse of /proc/meminfo, and the call against this host's own."""

from __future__ import annotations

from boxpark import protocol
from boxpark.guest.memory import memory_stats, parse_meminfo

MEMINFO = """\
MemTotal:        2014504 kB
MemFree:         1500000 kB
MemAvailable:    1800000 kB
Buffers:           10000 kB
Cached:           300000 kB
SwapCached:            0 kB
Shmem:              2000 kB
SwapTotal:       1048572 kB
SwapFree:        1048000 kB
HugePages_Total:       0
"""


def test_meminfo_in_bytes() -> None:
    reply = parse_meminfo(MEMINFO)
    assert reply == protocol.MemoryStatsReply(
        total=2014504 * 1024, free=1500000 * 1024, available=1800000 * 1024, cached=300000 * 1024,
        shmem=2000 * 1024, swap_total=1048572 * 1024, swap_free=1048000 * 1024)


def test_missing_lines_count_zero() -> None:
    reply = parse_meminfo("MemTotal: 1024 kB\nSwapTotal: junk\n")
    assert (reply.total, reply.available, reply.swap_total) == (1024 * 1024, 0, 0)


def test_the_call_reads_this_kernel() -> None:
    reply = memory_stats(protocol.MemoryStats())
    assert reply.total > 0 and 0 < reply.available <= reply.total and reply.free <= reply.total
    assert protocol.call_spec(protocol.MemoryStats()).replies == (protocol.MemoryStatsReply,)
