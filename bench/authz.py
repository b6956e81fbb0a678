"""What the mount guard (the guest's dockerd authorization plugin) costs every Docker API call, on the sandbox.

dockerd asks the plugin twice a call (request and response), so every call pays two round trips to it. One
sandbox machine; the plugin is switched off and on by rewriting daemon.json and sending dockerd SIGHUP
(`authorization-plugins` is reloadable), each switch confirmed by a probe (a create of an unshared bind: 403
from the plugin, or 404 for its missing image without it). Rounds alternate on/off, warmed after each
switch; medians over all rounds. Figures:
- `docker version` (the CLI, both API calls of it) through the proxy with the plugin vs the guest's socket
  reached directly without it; goal ≤ 1.2× (the issue's);
- the same through the proxy with vs without the plugin (the plugin's own share);
- one GET /_ping on a kept-alive connection to the guest's socket, with vs without: the time added a call.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

from bench._report import figure, guest_init_pid, sandbox_machine

ROUNDS = 6
RUNS = 5  # `docker version` runs per setting a round
PINGS = 300
PLUGIN = "boxpark-mounts"
PROBE = json.dumps({"Image": "boxpark-bench/none:0", "HostConfig": {"Binds": ["/bench-not-shared:/d"]}}).encode()


def http(sock: socket.socket, request: bytes) -> int:
    """One request on a kept-alive connection; the response's status (its body is read and dropped)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ")[1])


def probe(path: str) -> int:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        return http(sock, b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(PROBE), PROBE))


def pings(path: str, n: int) -> list[float]:
    times = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        for _ in range(n):
            start = time.perf_counter_ns()
            http(sock, b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")
            times.append((time.perf_counter_ns() - start) / 1e6)
    return times


def versions(host: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run(["docker", "-H", f"unix://{host}", "version"], check=True, capture_output=True)
        times.append((time.perf_counter() - start) * 1000)
    return times


async def switch(api: str, on: bool, direct: str) -> None:
    """The plugin on or off in dockerd, by daemon.json and SIGHUP; returns once a probe shows it took."""
    from boxpark.host.client import GuestClient

    async with await GuestClient.open(f"unix:{api}") as client:
        config = json.loads((await client.read_file("/etc/docker/daemon.json")).data)
        config["authorization-plugins"] = [PLUGIN] if on else []
        await client.write_file("/etc/docker/daemon.json", json.dumps(config).encode())
        await client.signal("dockerd", signal.SIGHUP)
    want = 403 if on else 404
    deadline = time.monotonic() + 60
    while (status := await asyncio.to_thread(probe, direct)) != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"dockerd did not switch the plugin {'on' if on else 'off'} (probe: {status})")
        await asyncio.sleep(0.1)


def main() -> None:
    if os.geteuid() != 0 or not shutil.which("docker"):
        print("authz: needs root and the docker CLI", file=sys.stderr)
        return
    with sandbox_machine() as machine:
        init = guest_init_pid(machine)
        direct = f"/proc/{init}/root/run/docker.sock"
        proxied = str(machine / "docker.sock")
        api = str(machine / "api.sock")
        samples: dict[str, list[float]] = {k: [] for k in ("on", "off", "direct", "ping_on", "ping_off")}
        for _ in range(ROUNDS):
            for on in (True, False):
                asyncio.run(switch(api, on, direct))
                versions(proxied, 2)  # warm the CLI's files and dockerd's plugin connections
                versions(direct, 1)
                samples["on" if on else "off"] += versions(proxied, RUNS)
                if not on:
                    samples["direct"] += versions(direct, RUNS)
                samples["ping_on" if on else "ping_off"] += pings(direct, PINGS)[20:]
        asyncio.run(switch(api, True, direct))  # as the machine runs
        m = {k: statistics.median(v) for k, v in samples.items()}
        print(f"   {len(samples['on'])} docker version runs a setting over {ROUNDS} rounds", file=sys.stderr)
        figure("authz_docker_version_via_proxy_vs_direct", m["on"], "ms", m["direct"], "ratio <= 1.2")
        figure("authz_docker_version_plugin_on_vs_off", m["on"], "ms", m["off"], "ratio <= 1.1")
        figure("authz_ping_keepalive_added", m["ping_on"] - m["ping_off"], "ms", m["ping_off"], "added <= 1 ms",
               ratio=m["ping_on"] / m["ping_off"])


if __name__ == "__main__":
    main()
