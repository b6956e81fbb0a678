"""The guest's memory figures on the Guest API: the `MemoryStats` call, read from /proc/meminfo.

The host's balloon policy (host/balloon.py) and `status` read these. /proc/meminfo is procfs: a read is
answered from the kernel's counters at once, never waits on a device, so the call runs on the init's event
loop. Nothing here changes the guest's memory; the balloon is the host's to move.
"""

from __future__ import annotations

from .. import protocol
from .errors import from_oserror

MEMINFO = "/proc/meminfo"
_FIELDS = {"MemTotal": "total", "MemFree": "free", "MemAvailable": "available", "Cached": "cached",
           "Shmem": "shmem", "SwapTotal": "swap_total", "SwapFree": "swap_free"}


def parse_meminfo(text: str) -> protocol.MemoryStatsReply:
    """/proc/meminfo's text (`Name:   123 kB` lines) -> the figures in bytes; a missing line counts 0."""
    values = dict.fromkeys(_FIELDS.values(), 0)
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        field = _FIELDS.get(name)
        if field is None:
            continue
        words = rest.split()
        if words and words[0].isdigit():
            values[field] = int(words[0]) * (1024 if words[1:2] == ["kB"] else 1)
    return protocol.MemoryStatsReply(**values)


def memory_stats(message: protocol.MemoryStats) -> protocol.MemoryStatsReply:
    """The `MemoryStats` call."""
    try:
        with open(MEMINFO, encoding="ascii") as f:
            return parse_meminfo(f.read())
    except OSError as exc:
        raise from_oserror(exc, f"read {MEMINFO}") from None
