"""The agent's balloon task against a real Guest API server: figures in over `MemoryStats`, targets out.

The server runs here, so its /proc/meminfo is this host's; the backend is a recording stand-in (no VM: the
vm tier has the real one, tests/vm/test_memory.py), labelled as such.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from boxpark.host.backends.base import BackendError
from boxpark.host.balloon import MiB, Balloon, Figures, Policy
from boxpark.host.client import GuestClient
from tests.guestserver import running_server

pytestmark = pytest.mark.integration


class RecordingBackend:
    """Stands in for a backend's `set_balloon` only: records each target; refuses the first if told to."""

    balloon = "hold"

    def __init__(self, refuse_first: bool = False) -> None:
        self.targets: list[int] = []
        self.refuse = refuse_first

    async def set_balloon(self, size: int) -> None:
        if self.refuse:
            self.refuse = False
            raise BackendError("the machine was not started")
        self.targets.append(size)


class StatsBackend(RecordingBackend):
    """Also stands in for `balloon_stats`: this host's /proc/meminfo as a guest kernel's balloon driver reports
    it (QEMU's `guest-stats`), refreshed at each call; the first calls are unanswered (-1), as QEMU says before
    the guest's first report."""

    balloon = "reporting"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.refresh: list[int] = []

    async def balloon_stats(self, refresh: int) -> dict[str, object]:
        self.calls += 1
        self.refresh.append(refresh)
        if self.calls <= 2:
            return {"stats": {"stat-total-memory": -1, "stat-free-memory": -1, "stat-available-memory": -1},
                    "last-update": 0}
        host = host_memory()
        return {"stats": {"stat-total-memory": host.total, "stat-free-memory": host.free,
                          "stat-available-memory": host.available, "stat-disk-caches": 0, "stat-swap-out": 0},
                "last-update": self.calls}


def host_memory() -> Figures:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return Figures(values["MemTotal"], values["MemFree"], values["MemAvailable"])


async def run_until_it_moves(dial: Any, backend: Any, policy: Policy) -> None:
    """The balloon task until the backend was given a target (30 s at most), then cancelled."""
    task = asyncio.ensure_future(Balloon(dial, backend, policy).run())
    try:
        for _ in range(600):
            if backend.targets:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_quiet_guest_is_shrunk_to_use_plus_headroom(tmp_path: Path) -> None:
    host = host_memory()
    # a machine twice this host's size: whatever the host holds, it is far less than that
    policy = Policy(2 * host.total, "hold", headroom=128 * MiB, floor=128 * MiB, step=256 * MiB,
                    idle_interval=0.05, watch_interval=0.05)
    backend = RecordingBackend(refuse_first=True)

    async def main(address: str) -> None:
        dials = 0

        async def dial() -> GuestClient:
            nonlocal dials
            dials += 1
            return await GuestClient.open(address)

        await run_until_it_moves(dial, backend, policy)  # the second look shrinks, after the refused first try
        assert backend.targets, "the balloon never moved"
        assert dials == 1  # one connection for every look
        target, now = backend.targets[0], host_memory()
        assert policy.floor_bytes <= target < policy.size
        # use plus headroom in MemTotal, give or take: the target is a logical size, which is MemTotal plus
        # what the "guest's" kernel reserved, here the machine's size less the host's MemTotal
        reserved = policy.size - now.total
        assert abs(target - (now.used + policy.headroom_bytes + reserved)) < 512 * MiB

    with running_server(tmp_path) as srv:
        asyncio.run(main(srv.address))


def test_with_the_kernels_statistics_the_guests_init_is_never_asked() -> None:
    """A backend whose balloon reports the guest kernel's figures: the task reads those (the init sleeps) and
    squeezes a quiet guest holding more than use plus headroom."""
    host = host_memory()
    # a machine this host's size, with a headroom so small that what the host caches or has free is "more"
    policy = Policy(host.total, "reporting", headroom=16 * MiB, floor=16 * MiB, step=256 * MiB,
                    idle_interval=0.05, watch_interval=0.05, active_interval=0.05)
    if host.resident <= host.used + policy.headroom_bytes + 2 * policy.step:
        pytest.skip("this host holds too little beyond its use (cache) for a squeeze")
    backend = StatsBackend()
    dials = 0

    async def dial() -> GuestClient:
        nonlocal dials
        dials += 1
        raise AssertionError("the guest's init was asked for figures the kernel gives")

    asyncio.run(run_until_it_moves(dial, backend, policy))
    assert dials == 0
    assert backend.calls > 3 and set(backend.refresh) == {2}
    assert backend.targets and backend.targets[0] < policy.size
