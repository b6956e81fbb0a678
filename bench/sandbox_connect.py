"""A new connection into the sandbox's guest: through the Guest API's `Connect` vs opened by the host itself.

One sandbox machine; a small server in the guest answers on a unix socket and on 127.0.0.1:9100 (each
connection: read to the end, answer the byte count, close). Each round times, interleaved, one exchange
(connect, one byte, half-close, the answer, close) by every path:
- `inside`: the reference, a connection as a guest process makes it (the guest's root for the unix socket,
  a socket made in the guest's network namespace for TCP);
- `api`: a `GuestProxy` in this process whose every connection is a Guest API `Connect` (the handshake,
  the call, the guest's relay) — the path before `Backend.connect_direct`;
- `direct`: the same `GuestProxy` opening the guest's socket itself (`sandboxdial.GuestDialer`);
and, for docker.sock, the agent's own proxy (whatever this tree's agent does) against dockerd's socket.
Figures: the added time per new connection of each path over `inside`; goal <= 0.5 ms.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import sys
import time
from typing import Callable

from bench._report import figure, guest_init_pid, sandbox_machine

ROUNDS = 400
SERVER = """
import os, socket, threading
def serve(c):
    total = 0
    while n := len(c.recv(65536)):
        total += n
    c.sendall(str(total).encode()); c.close()
def loop(s):
    while True:
        threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
u = socket.socket(socket.AF_UNIX); u.bind("/run/bench-cs.sock"); u.listen(512)
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", 9100)); t.listen(512)
threading.Thread(target=loop, args=(t,), daemon=True).start()
loop(u)
"""


def exchange(connect: Callable[[], socket.socket]) -> int:
    start = time.perf_counter_ns()
    with connect() as sock:
        sock.sendall(b"x")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while data := sock.recv(64):
            answer += data
    if answer != b"1":
        raise RuntimeError(f"the guest's server answered {answer!r}")
    return time.perf_counter_ns() - start


def unix_to(path: str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        return sock
    return connect


def tcp_to(port: int) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    return connect


def ping(path: str) -> int:
    start = time.perf_counter_ns()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    if b" 200 " not in data.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"dockerd answered {data[:80]!r}")
    return time.perf_counter_ns() - start


def main() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        print("sandbox_connect: needs root (a sandbox machine)", file=sys.stderr)
        return
    from boxpark.host.backends.sandboxdial import GuestDialer
    from boxpark.host.client import GuestClient
    from boxpark.host.guestproxy import GuestProxy
    from boxpark.protocol import Connect
    from boxpark.transport import open_raw_blocking

    with sandbox_machine() as machine:
        init = guest_init_pid(machine)
        api = f"unix:{machine}/api.sock"
        dialer = GuestDialer.of(init)
        unix_request, tcp_request = Connect(path="/run/bench-cs.sock"), Connect(port=9100)

        async def run() -> dict[str, list[int]]:
            async with await GuestClient.open(api) as client:
                await client.launch("bench-cs", ["python3", "-c", SERVER], replace=True)
                for _ in range(200):
                    if os.path.exists(f"/proc/{init}/root/run/bench-cs.sock"):
                        break
                    await asyncio.sleep(0.05)
                proxies = []
                ports: dict[str, int] = {}
                for name, open_target in (
                        ("api_unix", lambda: open_raw_blocking(api, unix_request)),
                        ("direct_unix", lambda: dialer.connect(unix_request)),
                        ("api_tcp", lambda: open_raw_blocking(api, tcp_request)),
                        ("direct_tcp", lambda: dialer.connect(tcp_request))):
                    if name.endswith("unix"):
                        proxy = GuestProxy(str(machine.parent / f"{name}.sock"), open_target)
                    else:
                        listener = socket.create_server(("127.0.0.1", 0), backlog=512)
                        ports[name] = listener.getsockname()[1]
                        proxy = GuestProxy(name, open_target, listener=listener)
                    await proxy.start()
                    proxies.append(proxy)
                paths = {
                    "inside_unix": lambda: exchange(unix_to(f"/proc/{init}/root/run/bench-cs.sock")),
                    "api_unix": lambda: exchange(unix_to(str(machine.parent / "api_unix.sock"))),
                    "direct_unix": lambda: exchange(unix_to(str(machine.parent / "direct_unix.sock"))),
                    "inside_tcp": lambda: exchange(lambda: dialer.connect(tcp_request)),
                    "api_tcp": lambda: exchange(tcp_to(ports["api_tcp"])),
                    "direct_tcp": lambda: exchange(tcp_to(ports["direct_tcp"])),
                    "inside_docker": lambda: ping(f"/proc/{init}/root/run/docker.sock"),
                    "agent_docker": lambda: ping(str(machine / "docker.sock")),
                }

                def rounds() -> dict[str, list[int]]:
                    times: dict[str, list[int]] = {name: [] for name in paths}
                    for i in range(ROUNDS + 20):  # the first 20: warm-up
                        for name, measure in paths.items():
                            elapsed = measure()
                            if i >= 20:
                                times[name].append(elapsed)
                    return times

                try:
                    return await asyncio.to_thread(rounds)
                finally:
                    for proxy in proxies:
                        proxy.close()
                    await client.signal("bench-cs", 9)

        times = asyncio.run(run())
        dialer.close()
    ms = {name: statistics.median(values) / 1e6 for name, values in times.items()}
    for kind in ("unix", "tcp"):
        for path in ("api", "direct"):
            value, reference = ms[f"{path}_{kind}"], ms[f"inside_{kind}"]
            figure(f"sandbox_new_connection_{kind}_{path}_added", value - reference, "ms", reference,
                   "added <= 0.5 ms", ratio=value / reference)
    figure("sandbox_docker_ping_agent_added", ms["agent_docker"] - ms["inside_docker"], "ms", ms["inside_docker"],
           "added <= 0.5 ms", ratio=ms["agent_docker"] / ms["inside_docker"])


if __name__ == "__main__":
    main()
