"""Run a real Guest API server for a test: in a thread with its own event loop, on a unix socket.

    with running_server(tmp_path) as srv:          # srv.address is "unix:…/api.sock"
        asyncio.run(some_coroutine(srv.address))   # talk to it with GuestClient or transport.dial

The server runs in this process (so a test can look at its state) but on its own loop and thread, the
way it runs in the guest: the test's own asyncio.run never shares a loop with it.

    with serve_process(tmp_path) as (address, process):   # `boxpark guest serve`, a process of its own

for what only a separate process shows: its memory, or a CLI client killed in the middle of a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Iterator

import pytest

from boxpark.guest.server import GuestServer
from boxpark.protocol import ErrorCode
from boxpark.transport import RemoteError, parse_address


@dataclass
class RunningServer:
    address: str
    server: GuestServer
    loop: asyncio.AbstractEventLoop
    extra: dict[str, Any] = field(default_factory=dict)

    def run(self, coroutine: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's own loop (to inspect or change server state)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


@contextlib.contextmanager
def running_server(directory: Path, *, secret: bytes | None = None, tcp_port: int | None = None,
                   **options: Any) -> Iterator[RunningServer]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}
    address = f"unix:{directory}/api.sock"

    async def start() -> None:
        server = GuestServer(**options)
        await server.listen(parse_address(address))
        if tcp_port is not None:
            await server.listen(parse_address(f"tcp:127.0.0.1:{tcp_port}"), secret=secret)
        holder["server"] = server

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # surfaced to the test below
            holder["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name="guest-server", daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("the Guest API server did not start within 60 s")
    if "error" in holder:
        raise holder["error"]
    running = RunningServer(address, holder["server"], loop)
    try:
        yield running
    finally:
        async def stop() -> None:
            await running.server.close()
            await running.server.processes.stop_all(grace=2.0)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextlib.contextmanager
def serve_process(directory: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`boxpark guest serve` on a unix socket in `directory`, once the socket is there; SIGTERMed at the end
    (which ends what it launched)."""
    path = directory / "serve.sock"
    process = subprocess.Popen([sys.executable, "-m", "boxpark", "guest", "serve", "--listen", f"unix:{path}"],
                               stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _accepts(path):  # bound is not yet listening
            assert process.poll() is None, f"boxpark guest serve exited with {process.returncode}"
            assert time.monotonic() < deadline, f"boxpark guest serve did not listen on {path} in 60 s"
            time.sleep(0.02)
        yield f"unix:{path}", process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def refused(awaitable: Awaitable[Any], code: ErrorCode, *fragments: str) -> str:
    """Await a call that the guest must refuse with `code` and a message holding every fragment; the message."""
    with pytest.raises(RemoteError) as info:
        await awaitable
    assert info.value.code == code, info.value.message
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value.message
