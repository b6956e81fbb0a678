"""The Guest Proxy on the sandbox backend, against the guest's own sockets reached directly.

The sandbox's guest is a process tree on this host, so its sockets can be reached without Boxpark at
/proc/<init>/root/…: that is the reference. Figures:
- `docker version` (the CLI, a new connection each) through the proxy vs direct; goal ≤ 1.2×;
- a raw HTTP round trip on a new connection (GET /_ping) through the proxy vs direct;
- throughput of 1 GiB through both hops — the agent's own Guest Proxy (the machine's api.sock, served by
  the agent process) → Guest API connect → a sink in the guest — vs the sink reached directly; the median
  of ROUNDS samples per side; goal ≥ 0.5×.
Every pair is measured alternately (one direct, one proxied, …) after warm-up runs of both.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

from bench._report import figure, guest_init_pid, machine_api, sandbox_machine, say

SIZE = 1024 ** 3
ROUNDS = 3
SINK = """
import os, socket
path = "/run/bench-sink.sock"
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(16)
while True:
    c, _ = s.accept()
    total = 0
    while n := len(c.recv(1 << 20)):
        total += n
    c.sendall(str(total).encode()); c.close()
"""


def timed_pairs(direct: list[str], proxied: list[str], n: int) -> tuple[float, float]:
    """Median ms of `direct` and of `proxied` (commands), run alternately `n` times each."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(n):
        for argv, into in ((direct, times[0]), (proxied, times[1])):
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            into.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1000, statistics.median(times[1]) * 1000


def ping_once(path: str) -> int:
    """ns for GET /_ping on a new connection to `path`, until the answer's body ("OK")."""
    start = time.perf_counter_ns()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n")
        data = b""
        while b"OK" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"{path} closed the connection without answering OK: {data[:200]!r}")
            data += chunk
    return time.perf_counter_ns() - start


def ping_pairs(direct: str, proxied: str, n: int) -> tuple[float, float]:
    """Median ms of a new-connection /_ping, direct and proxied, alternately, after 20 warm-up pairs."""
    times: tuple[list[int], list[int]] = ([], [])
    for i in range(20 + n):
        d, p = ping_once(direct), ping_once(proxied)
        if i >= 20:
            times[0].append(d)
            times[1].append(p)
    return statistics.median(times[0]) / 1e6, statistics.median(times[1]) / 1e6


def send_gib(sock: socket.socket) -> float:
    """MB/s of 1 GiB written to the sink on the connected `sock` (closed after), until the sink's count."""
    chunk = b"\0" * (1 << 20)
    start = time.perf_counter()
    with sock:
        for _ in range(SIZE // len(chunk)):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        assert int(sock.recv(64)) == SIZE
    return SIZE / (time.perf_counter() - start) / 1e6


def main() -> None:
    if os.geteuid() != 0 or not shutil.which("docker"):
        print("docker_proxy: needs root and the docker CLI", file=sys.stderr)
        return
    with sandbox_machine() as machine:
        init = guest_init_pid(machine)
        direct = f"/proc/{init}/root/run/docker.sock"
        proxied = str(machine / "docker.sock")
        for host in (direct, proxied):  # warm both
            subprocess.run(["docker", "-H", f"unix://{host}", "version"], check=True, capture_output=True)
        d, p = timed_pairs(["docker", "-H", f"unix://{direct}", "version"],
                           ["docker", "-H", f"unix://{proxied}", "version"], 15)
        figure("docker_version_via_proxy", p, "ms", d, "ratio <= 1.2")
        d, p = ping_pairs(direct, proxied, 300)
        figure("docker_ping_new_connection", p, "ms", d, "added <= 0.3 ms")

        from boxpark.host.client import GuestClient
        from boxpark.protocol import Connect
        from boxpark.transport import open_raw_blocking

        # the agent's own api.sock: its Guest Proxy, in the agent's process, as every API client reaches it
        address, secret = machine_api(machine)
        sink = f"/proc/{init}/root/run/bench-sink.sock"

        async def launch_sink() -> None:
            async with await GuestClient.open(address, secret=secret) as client:
                await client.launch("bench-sink", ["python3", "-c", SINK], replace=True)
                for _ in range(200):
                    if os.path.exists(sink):
                        return
                    await asyncio.sleep(0.05)
                raise RuntimeError("the sink did not start in the guest")

        async def stop_sink() -> None:
            async with await GuestClient.open(address, secret=secret) as client:
                await client.signal("bench-sink", 9)

        def via_agent() -> float:
            return send_gib(open_raw_blocking(address, Connect(path="/run/bench-sink.sock"), secret=secret))

        def direct_sink() -> float:
            plain = socket.socket(socket.AF_UNIX)
            plain.connect(sink)
            return send_gib(plain)

        asyncio.run(launch_sink())
        values: list[float] = []
        references: list[float] = []
        try:
            direct_sink(), via_agent()  # warm-up of both
            for _ in range(ROUNDS):
                references.append(direct_sink())
                values.append(via_agent())
        finally:
            asyncio.run(stop_sink())
        say(f"1 GiB through the agent: {', '.join(f'{v:.0f}' for v in values)} MB/s; direct: "
            f"{', '.join(f'{v:.0f}' for v in references)} MB/s")
        figure("proxy_throughput_1gib", statistics.median(values), "MB/s", statistics.median(references), ">= 0.5")


if __name__ == "__main__":
    main()
