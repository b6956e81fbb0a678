"""`boxpark guest serve` started with SIGHUP ignored (under nohup) gives its children SIGHUP at its default:
otherwise an interactive session's hang-up would reach nobody (a shell cannot trap an inherited ignore)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boxpark.host.client import GuestClient

pytestmark = pytest.mark.integration


def ignored_signals(status: str) -> int:
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)


def test_a_server_started_under_nohup_gives_its_children_sighup_at_its_default(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    server = subprocess.Popen([sys.executable, "-m", "boxpark", "guest", "serve", "--listen", f"unix:{path}"],
                              stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

        async def child_status() -> str:
            async with await GuestClient.open(f"unix:{path}") as client:
                result = await client.exec(["cat", "/proc/self/status"])
                return result.stdout.decode()

        hup = 1 << (signal.SIGHUP - 1)
        assert ignored_signals(Path(f"/proc/{server.pid}/status").read_text()) & hup == 0  # caught, not ignored
        assert ignored_signals(asyncio.run(child_status())) & hup == 0, "the child inherited an ignored SIGHUP"
        os.kill(server.pid, signal.SIGHUP)  # the server itself still lives through a hang-up: it answers after
        assert ignored_signals(asyncio.run(child_status())) & hup == 0
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(30)
