"""The agent's balloon task against a real Guest API server: figures in over `MemoryStats`, targets out.

The server runs here, so its /proc/meminfo is this host's; the backend is a recording stand-in (no VM: the
vm tier has the real one, tests/vm/test_memory.py), labelled as such.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

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


def host_memory() -> Figures:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return Figures(values["MemTotal"], values["MemFree"], values["MemAvailable"])


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

        task = asyncio.ensure_future(Balloon(dial, backend, policy).run())  # type: ignore[arg-type]
        try:
            for _ in range(600):  # 30 s: the second look shrinks, after the refused first try
                if backend.targets:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert backend.targets, "the balloon never moved"
        assert dials == 1  # one connection for every look
        target, now = backend.targets[0], host_memory()
        assert policy.floor_bytes <= target < policy.size
        assert abs(target - (now.used + policy.headroom_bytes)) < 512 * MiB  # use plus headroom, give or take

    with running_server(tmp_path) as srv:
        asyncio.run(main(srv.address))
