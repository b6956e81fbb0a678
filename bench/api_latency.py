"""Unary call latency: `info` p50 over a unix socket, the server in its own process, against a bare
socket echo round trip measured in the same run. Goal: p50 ≤ 150 µs.

All servers run at once; the four measurements (two clients, each against its echo) alternate in ROUNDS
blocks, each block a new connection with WARM_UP untimed calls first, so every figure and its reference
are warmed alike and see the same moments of the machine.

Two clients: a blocking one (the server's own latency: what a caller on its own thread sees) and the
asyncio `GuestClient` (what the agent sees), whose reference is a minimal asyncio echo round trip — the
floor asyncio itself sets on this machine.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import sys
import tempfile
import time
from typing import Callable

from bench._report import figure, guest_server, server_process

N = 5000  # timed calls per figure, over all rounds
ROUNDS = 5
WARM_UP = 200

ECHO = """
import socket, sys, os
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)
while True:  # one connection at a time, as the bench makes them
    c, _ = s.accept()
    while d := c.recv(65536):
        c.sendall(d)
    c.close()
"""


ASYNC_ECHO = """
import asyncio, sys
class Echo(asyncio.BufferedProtocol):
    buffer = bytearray(65536)
    def connection_made(self, transport): self.transport = transport
    def get_buffer(self, hint): return self.buffer
    def buffer_updated(self, n): self.transport.write(self.buffer[:n])
async def main():
    await asyncio.get_running_loop().create_unix_server(Echo, sys.argv[1])
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def blocking_times(path: str, payload: bytes, opening: bytes = b"") -> list[int]:
    """`payload` round trips (ns) on one new blocking connection (after `opening`, e.g. the API's Hello),
    after WARM_UP untimed ones."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    if opening:
        sock.sendall(opening)
        sock.recv(65536)
    times = []
    for i in range(WARM_UP + N // ROUNDS):
        start = time.perf_counter_ns()
        sock.sendall(payload)
        sock.recv(65536)
        if i >= WARM_UP:
            times.append(time.perf_counter_ns() - start)
    sock.close()
    return times


def asyncio_echo_times(path: str, payload: bytes) -> list[int]:
    """As `blocking_times`, with a minimal asyncio protocol as the client.

    Both ends of the asyncio echo read into one buffer kept across reads, as the Guest API's channel does: a
    plain `Protocol` gets a new 256 KiB bytes per read, whose cost depends on glibc's dynamic mmap threshold
    (what the process happened to free before), which is not the floor asyncio sets."""
    class Client(asyncio.BufferedProtocol):
        waiter: asyncio.Future[None] | None = None
        buffer = bytearray(65536)

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buffer

        def buffer_updated(self, nbytes: int) -> None:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

    async def measure() -> list[int]:
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_unix_connection(Client, path)
        times = []
        for i in range(WARM_UP + N // ROUNDS):
            start = time.perf_counter_ns()
            client.waiter = loop.create_future()
            transport.write(payload)
            await client.waiter
            if i >= WARM_UP:
                times.append(time.perf_counter_ns() - start)
        transport.close()
        return times

    return asyncio.run(measure())


def asyncio_info_times(path: str) -> list[int]:
    """As `blocking_times`, `info` through the host's asyncio `GuestClient`."""
    from boxpark.host.client import GuestClient

    async def measure() -> list[int]:
        async with await GuestClient.open(f"unix:{path}") as client:
            times = []
            for i in range(WARM_UP + N // ROUNDS):
                start = time.perf_counter_ns()
                await client.info()
                if i >= WARM_UP:
                    times.append(time.perf_counter_ns() - start)
            return times

    return asyncio.run(measure())


def main() -> None:
    from boxpark import protocol

    info = protocol.encode(protocol.Info())
    echo_payload = b"\x00\x00\x00\x06\x81\xa1t\xa4info"  # an Info frame's size, to a server that only echoes
    measures: dict[str, Callable[[], list[int]]] = {}
    times: dict[str, list[int]] = {"echo": [], "info": [], "async_echo": [], "async_info": []}
    with tempfile.TemporaryDirectory() as d, \
            server_process([sys.executable, "-c", ECHO, f"{d}/echo.sock"], f"{d}/echo.sock"), \
            server_process([sys.executable, "-c", ASYNC_ECHO, f"{d}/aecho.sock"], f"{d}/aecho.sock"), \
            guest_server(f"{d}/api.sock"):
        measures = {
            "echo": lambda: blocking_times(f"{d}/echo.sock", echo_payload),
            "info": lambda: blocking_times(f"{d}/api.sock", info, protocol.encode(protocol.Hello())),
            "async_echo": lambda: asyncio_echo_times(f"{d}/aecho.sock", echo_payload),
            "async_info": lambda: asyncio_info_times(f"{d}/api.sock"),
        }
        for _ in range(ROUNDS):  # interleaved: a busy moment of the machine hurts all alike
            for key, measure in measures.items():
                times[key] += measure()
    p50 = {key: statistics.median(values) / 1000 for key, values in times.items()}
    figure("unary_info_p50_blocking_client", p50["info"], "us", p50["echo"], "<= 150 us")
    figure("unary_info_p50_asyncio_client", p50["async_info"], "us", p50["async_echo"],
           "ratio near 1 (asyncio floor)")


if __name__ == "__main__":
    main()
