"""What a running machine costs, for `boxpark status`: the guest's memory, the VM process's RSS on the host,
the data disk's size and the bytes it really takes.

Read on demand, once per `status` request, never polled: the guest's memory over the Guest API's
`MemoryStats` (the guest parses its /proc/meminfo, guest/memory.py; bounded by a short timeout, so a busy guest makes `status` say "unknown", never hang), the VM
process's VmRSS from the host's /proc, the data disk's st_size and st_blocks. Nothing here changes anything.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

from .. import protocol
from ..transport import RemoteError, TransportError
from .client import GuestClient

GUEST_TIMEOUT = 2.0  # s: `status` stays quick even when the guest is slow to answer
KIB = 1024


def guest_memory_of(stats: protocol.MemoryStatsReply) -> dict[str, int | None] | None:
    """Total, used (total - available: what the guest could not give up now), available and cached bytes."""
    if not stats.total:
        return None
    # "balloon": what the balloon holds back from the guest (set by `resources` from the agent's balloon)
    return {"total": stats.total, "used": stats.total - stats.available, "available": stats.available,
            "cached": stats.cached, "balloon": None}


async def guest_memory(dial: Callable[[], Awaitable[GuestClient]],
                       timeout: float = GUEST_TIMEOUT) -> dict[str, int | None] | None:
    """The guest's memory figures, or None when the guest does not answer within `timeout`."""
    async def read() -> protocol.MemoryStatsReply:
        client = await dial()
        try:
            return await client.memory_stats()
        finally:
            await client.close()
    try:
        stats = await asyncio.wait_for(read(), timeout)
    except (asyncio.TimeoutError, TransportError, RemoteError, ConnectionError, OSError):
        return None
    return guest_memory_of(stats)


def process_rss(pid: int | None) -> int | None:
    """A host process's resident bytes (VmRSS), or None (no such process, or not Linux)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def disk_usage(path: Path) -> dict[str, int] | None:
    """A disk image's size (what the guest sees) and allocated bytes (what the host gives it), if it exists."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "allocated": st.st_blocks * 512}


async def resources(dial: Callable[[], Awaitable[GuestClient]] | None, vm_pid: int | None,
                    data_disk: Path | None, balloon: int | None = None) -> dict[str, Any]:
    """The `resources` block of `status`: every figure None where it cannot be had. `balloon`: the bytes the
    balloon holds back from the guest now (None: no balloon)."""
    memory = None if dial is None else await guest_memory(dial)
    if memory is not None:
        memory["balloon"] = balloon
    return {"guest_memory": memory,
            "vm_rss": process_rss(vm_pid),
            "data_disk": None if data_disk is None else disk_usage(data_disk)}
