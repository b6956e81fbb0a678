"""The Guest Proxy on the sandbox backend, against the guest's own sockets reached directly.

The sandbox's guest is a process tree on this host, so its sockets can be reached without Boxpark at
/proc/<init>/root/…: that is the reference. Figures:
- `docker version` (the CLI, a new connection each) through the proxy vs direct; goal ≤ 1.2×;
- a raw HTTP round trip on a new connection (GET /_ping) through the proxy vs direct;
- throughput of 1 GiB through both hops (proxy → Guest API connect → a sink in the guest) vs direct;
  goal ≥ 0.5×.
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

from bench._report import figure, guest_init_pid, sandbox_machine

SIZE = 1024 ** 3
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


def timed_runs(argv: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def ping(path: str, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n")
            data = b""
            while b"OK" not in data:
                data += sock.recv(4096)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6


def send_gib(path: str) -> float:
    chunk = b"\0" * (1 << 20)
    start = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
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
        d = timed_runs(["docker", "-H", f"unix://{direct}", "version"], 15)
        p = timed_runs(["docker", "-H", f"unix://{proxied}", "version"], 15)
        figure("docker_version_via_proxy", p, "ms", d, "ratio <= 1.2")
        d, p = ping(direct, 300), ping(proxied, 300)
        figure("docker_ping_new_connection", p, "ms", d, "added <= 0.3 ms")

        from boxpark.host.client import GuestClient
        from boxpark.host.guestproxy import GuestProxy
        from boxpark.protocol import Connect
        from boxpark.transport import open_raw_blocking

        async def throughput() -> tuple[float, float]:
            async with await GuestClient.open(f"unix:{machine}/api.sock") as client:
                await client.launch("bench-sink", ["python3", "-c", SINK], replace=True)
                for _ in range(100):
                    if os.path.exists(f"/proc/{init}/root/run/bench-sink.sock"):
                        break
                    await asyncio.sleep(0.05)

                def open_sink() -> socket.socket:
                    return open_raw_blocking(f"unix:{machine}/api.sock", Connect(path="/run/bench-sink.sock"))

                proxy = GuestProxy(str(machine.parent / "sink-proxy.sock"), open_sink)
                await proxy.start()
                try:
                    reference = await asyncio.to_thread(send_gib, f"/proc/{init}/root/run/bench-sink.sock")
                    value = await asyncio.to_thread(send_gib, str(machine.parent / "sink-proxy.sock"))
                finally:
                    proxy.close()
                    await client.signal("bench-sink", 9)
                return value, reference

        value, reference = asyncio.run(throughput())
        figure("proxy_throughput_1gib", value, "MB/s", reference, ">= 0.5")


if __name__ == "__main__":
    main()
