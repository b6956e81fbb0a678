"""What `status` reads of a machine's cost: the guest's memory figures, a process's RSS, a sparse image's blocks."""

from __future__ import annotations

import os
from pathlib import Path

from boxpark.guest.memory import parse_meminfo
from boxpark.host.resources import disk_usage, guest_memory_of, process_rss

MEMINFO = """\
MemTotal:        2014876 kB
MemFree:         1500000 kB
MemAvailable:    1800000 kB
Cached:           250000 kB
HugePages_Total:       0
"""


def test_meminfo_is_read_in_bytes_and_used_is_what_is_not_available() -> None:
    memory = guest_memory_of(parse_meminfo(MEMINFO))
    assert memory == {"total": 2014876 * 1024, "used": (2014876 - 1800000) * 1024,
                      "available": 1800000 * 1024, "cached": 250000 * 1024, "balloon": None}


def test_a_meminfo_without_a_total_gives_no_figures() -> None:
    assert guest_memory_of(parse_meminfo("MemAvailable: 100 kB\ngarbage\n")) is None


def test_rss_is_this_process_and_none_for_no_process() -> None:
    rss = process_rss(os.getpid())
    assert rss is not None and 1 << 20 < rss < 1 << 34
    assert process_rss(None) is None and process_rss(2**22 + 12345) is None


def test_a_sparse_image_is_its_size_but_only_the_blocks_written(tmp_path: Path) -> None:
    image = tmp_path / "data.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    sparse = disk_usage(image)
    assert sparse is not None and sparse["size"] == 1 << 30 and sparse["allocated"] < 1 << 20
    with open(image, "r+b") as f:
        f.write(os.urandom(4 << 20))
        os.fsync(f.fileno())
    written = disk_usage(image)
    assert written is not None and written["allocated"] >= 4 << 20
    assert disk_usage(tmp_path / "missing.img") is None
