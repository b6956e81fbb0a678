"""Unary call latency: `info` p50 over a unix socket, the server in its own process, against a bare
socket echo round trip measured in the same run. Goal: p50 ≤ 150 µs.

Two clients: a blocking one (the server's own latency: what a caller on its own thread sees) and the
asyncio `GuestClient` (what the agent sees), whose reference is a minimal asyncio echo round trip — the
floor asyncio itself sets on this machine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time

from bench._report import figure, guest_server, server_process

N = 5000

ECHO = """
import socket, sys, os
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)
c, _ = s.accept()
while d := c.recv(65536):
    c.sendall(d)
"""




ASYNC_ECHO = """
import asyncio, sys
class Echo(asyncio.Protocol):
    def connection_made(self, transport): self.transport = transport
    def data_received(self, data): self.transport.write(data)
async def main():
    await asyncio.get_running_loop().create_unix_server(Echo, sys.argv[1])
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def blocking_p50(path: str, payload: bytes, opening: bytes = b"") -> float:
    """p50 of `payload` round trips on one blocking connection (after `opening`, e.g. the API's Hello)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    if opening:
        sock.sendall(opening)
        sock.recv(65536)
    times = []
    for _ in range(N):
        start = time.perf_counter_ns()
        sock.sendall(payload)
        sock.recv(65536)
        times.append(time.perf_counter_ns() - start)
    sock.close()
    return statistics.median(times) / 1000


def asyncio_p50(path: str, payload: bytes) -> float:
    class Client(asyncio.Protocol):
        waiter: asyncio.Future[None] | None = None

        def data_received(self, data: bytes) -> None:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

    async def measure() -> float:
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_unix_connection(Client, path)
        times = []
        for _ in range(N):
            start = time.perf_counter_ns()
            client.waiter = loop.create_future()
            transport.write(payload)
            await client.waiter
            times.append(time.perf_counter_ns() - start)
        transport.close()
        return statistics.median(times) / 1000

    return asyncio.run(measure())


def echo_p50(directory: str, script: str, measure) -> float:
    path = f"{directory}/echo.sock"
    try:
        with server_process([sys.executable, "-c", script, path], path):
            return measure(path, b"\x00\x00\x00\x06\x81\xa1t\xa4info")
    finally:
        os.unlink(path)


def info_p50(directory: str) -> tuple[float, float]:
    from boxpark import protocol
    from boxpark.host.client import GuestClient

    path = f"{directory}/api.sock"
    with guest_server(path):
        blocking = blocking_p50(path, protocol.encode(protocol.Info()), protocol.encode(protocol.Hello()))

        async def measure() -> float:
            async with await GuestClient.open(f"unix:{path}") as client:
                for _ in range(200):
                    await client.info()
                times = []
                for _ in range(N):
                    start = time.perf_counter_ns()
                    await client.info()
                    times.append(time.perf_counter_ns() - start)
                return statistics.median(times) / 1000

        return blocking, asyncio.run(measure())


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        echo = echo_p50(directory, ECHO, blocking_p50)
        async_echo = echo_p50(directory, ASYNC_ECHO, asyncio_p50)
        blocking, async_client = info_p50(directory)
    figure("unary_info_p50_blocking_client", blocking, "us", echo, "<= 150 us")
    figure("unary_info_p50_asyncio_client", async_client, "us", async_echo, "ratio near 1 (asyncio floor)")


if __name__ == "__main__":
    main()
