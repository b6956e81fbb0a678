"""A published port (`docker run -p`) on the sandbox backend, against the same port reached inside the guest.

A container serves a sink on port 9000, published as 18090. The same small client measures twice in one
run: from the host through the published port (the agent's listener → Guest API connect → docker-proxy →
the container), and from inside the guest's network namespace straight to docker-proxy's 127.0.0.1:18090
(the reference: what a process in the guest gets). Figures:
- throughput of 1 GiB; goal ≥ 0.5×;
- a new connection with a one-byte exchange (connect, send, half-close, answer, close); goal ≤ 0.5 ms added.
Both sides are measured alternately, ROUNDS times each after a warm-up of each; figures are medians.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from bench._report import figure, guest_init_pid, load_test_image, sandbox_machine, say

PORT = 18090
ROUNDS = 3
SERVER = """
import socket, threading
def serve(c):
    total = 0
    while n := len(c.recv(1 << 20)):
        total += n
    c.sendall(str(total).encode()); c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000)); s.listen(512)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
CLIENT = """
import json, socket, statistics, sys, time
port, size, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def exchange(payload):
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        chunk = memoryview(b"\\0" * min(payload, 1 << 20))
        left = payload
        while left:
            s.sendall(chunk[:min(left, len(chunk))]); left -= min(left, len(chunk))
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while data := s.recv(64):
            answer += data
        assert int(answer) == payload, answer
start = time.perf_counter(); exchange(size); seconds = time.perf_counter() - start
times = []
for _ in range(rounds):
    t = time.perf_counter_ns(); exchange(1); times.append(time.perf_counter_ns() - t)
print(json.dumps({"mb_s": size / seconds / 1e6, "connect_ms": statistics.median(times) / 1e6}))
"""
GUEST_PYTHON = ["-v", "/usr:/usr:ro", "-v", "/usr/lib:/lib:ro", "-v", "/usr/lib64:/lib64:ro"]


def measure(prefix: list[str], size: int, rounds: int) -> dict[str, float]:
    out = subprocess.run([*prefix, sys.executable, "-c", CLIENT, str(PORT), str(size), str(rounds)],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out)


def main() -> None:
    if os.geteuid() != 0 or not shutil.which("docker") or not shutil.which("nsenter"):
        print("published_port: needs root, the docker CLI and nsenter", file=sys.stderr)
        return
    with sandbox_machine() as machine:
        docker = ["docker", "-H", f"unix://{machine}/docker.sock"]
        image = load_test_image(docker, machine.parent)
        subprocess.run([*docker, "network", "create", "bench"], check=True, capture_output=True)
        subprocess.run([*docker, "run", "-d", "--network", "bench", "-p", f"{PORT}:9000", *GUEST_PYTHON,
                        image, "python3", "-c", SERVER], check=True, capture_output=True)
        inside = ["nsenter", "-t", str(guest_init_pid(machine)), "-n"]
        for _ in range(200):  # until the server answers through the published port
            try:
                measure([], 1, 1)
                break
            except subprocess.CalledProcessError:
                time.sleep(0.1)
        measure(inside, 1, 20), measure([], 1, 20)  # warm-up of both
        size, connections = 1024 ** 3, 100
        references: list[dict[str, float]] = []
        values: list[dict[str, float]] = []
        for _ in range(ROUNDS):
            references.append(measure(inside, size, connections))
            values.append(measure([], size, connections))
        rates = [", ".join(f"{v['mb_s']:.0f}" for v in side) for side in (values, references)]
        say(f"1 GiB through the published port: {rates[0]} MB/s; inside the guest: {rates[1]} MB/s")
        value = {key: statistics.median(v[key] for v in values) for key in ("mb_s", "connect_ms")}
        reference = {key: statistics.median(v[key] for v in references) for key in ("mb_s", "connect_ms")}
        figure("published_port_throughput_1gib", value["mb_s"], "MB/s", reference["mb_s"], ">= 0.5")
        added = value["connect_ms"] - reference["connect_ms"]
        figure("published_port_new_connection", value["connect_ms"], "ms", reference["connect_ms"],
               "added <= 0.5 ms")
        say(f"added per new connection: {added:.3f} ms")


if __name__ == "__main__":
    main()
