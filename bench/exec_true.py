"""Unary exec latency: `exec(["true"])` through the Guest API against a local `subprocess.run(["true"])`.

The guest server runs in its own process (`boxpark guest serve` on a unix socket). Two callers, as in
`api_latency`: a blocking client with pre-encoded frames (the guest's own share: what the server adds to a
spawn) and the host's asyncio `GuestClient`, as the agent uses it (adding asyncio's round trip on this
machine). Each is measured alternately with the local run, so both see the same machine; figures are
medians. Goal: ratio <= 1.5. The server's own CPU time per exec (from /proc, see `cpu_seconds`) and the asyncio
client's (process time around each call) are reported too: on a loaded machine wall time mostly measures
waiting for a CPU.

With BOXPARK_BENCH_BASELINE=CHECKOUT (another checkout of the repository, e.g. a worktree of main), a second
server runs that checkout's code and every sample is taken from both servers and the local run in turn,
so a change is measured against its baseline in the same run.
Run: `python -m bench exec_true` (or `python bench/exec_true.py [--calls N]`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import TypeVar

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._report import figure, guest_server, server_process  # noqa: E402

T = TypeVar("T")


def cpu_seconds(pid: int) -> float:
    """CPU time of process `pid` so far (its own, not its children's): the scheduler's exact run time from
    /proc/PID/schedstat, as `time.process_time()` measures the reference; else user plus system time from
    /proc/PID/stat, which the kernel samples at each clock tick (coarse, and biased for a process that runs
    in short bursts)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(addresses: list[str], calls: int,
                  client_cpu: list[list[float]]) -> tuple[list[list[float]], list[float], list[float]]:
    """Samples through each server's asyncio client, in turn with the local run; each call's CPU time in this
    process (the client's, asyncio's loop included) goes to `client_cpu`."""
    from boxpark.host.client import GuestClient

    via: list[list[float]] = [[] for _ in addresses]
    local: list[float] = []
    local_cpu: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(await GuestClient.open(address)) for address in addresses]
        for _ in range(20):  # warm every path up
            for client in clients:
                await client.exec(["true"])
            subprocess.run(["true"])
        for n in range(calls):
            for client, samples, cpu_samples in _turn(list(zip(clients, via, client_cpu)), n):
                start, cpu = time.perf_counter(), time.process_time()
                result = await client.exec(["true"])
                samples.append(time.perf_counter() - start)
                cpu_samples.append(time.process_time() - cpu)
                if result.code != 0:
                    raise RuntimeError(f"true exited with {result.code} through the API")
            start, cpu = time.perf_counter(), time.process_time()
            subprocess.run(["true"])
            local.append(time.perf_counter() - start)
            local_cpu.append(time.process_time() - cpu)
    return via, local, local_cpu


def _turn(items: list[T], n: int) -> list[T]:
    """`items` rotated by `n`: each server goes first in turn (no one always follows the local run)."""
    n %= len(items)
    return items[n:] + items[:n]


def measure_blocking(paths: list[str], calls: int) -> tuple[list[list[float]], list[float], list[float]]:
    """Samples through each server with a blocking client, in turn with the local run."""
    from boxpark import protocol

    via: list[list[float]] = [[] for _ in paths]
    local: list[float] = []
    local_cpu: list[float] = []
    socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in paths]
    decoders = [protocol.FrameDecoder() for _ in paths]

    def call(i: int, frame: bytes) -> protocol.Message:
        socks[i].sendall(frame)
        while (message := decoders[i].next_message()) is None:
            data = socks[i].recv(65536)
            if not data:
                raise ConnectionError("the guest server closed the connection")
            decoders[i].feed(data)
        return message

    try:
        for i, path in enumerate(paths):
            socks[i].connect(path)
            if not isinstance(call(i, protocol.encode(protocol.Hello(client="bench"))), protocol.Welcome):
                raise RuntimeError("no Welcome from the guest server")
        request = protocol.encode(protocol.Exec(argv=["true"]))
        for _ in range(20):  # warm up every path, as in `measure`
            for i in range(len(paths)):
                call(i, request)
            subprocess.run(["true"])
        for n in range(calls):
            for i, samples in _turn(list(enumerate(via)), n):
                start = time.perf_counter()
                reply = call(i, request)
                samples.append(time.perf_counter() - start)
                if not isinstance(reply, protocol.ExecResult) or reply.code != 0:
                    raise RuntimeError(f"exec of true through the API answered {reply!r}")
            start, cpu = time.perf_counter(), time.process_time()
            subprocess.run(["true"])
            local.append(time.perf_counter() - start)
            local_cpu.append(time.process_time() - cpu)
    finally:
        for sock in socks:
            sock.close()
    return via, local, local_cpu


def baseline_python(checkout: str) -> list[str]:
    """A command line for this Python that imports `boxpark` from `checkout`: run from there (`-m` puts the
    working directory first on the path, ahead of PYTHONPATH), checked before it is used."""
    command = ["env", f"--chdir={checkout}", f"PYTHONPATH={checkout}", sys.executable]
    found = subprocess.run(command + ["-c", "import boxpark; print(boxpark.__file__)"], capture_output=True,
                           text=True).stdout.strip()
    if not found.startswith(os.path.join(checkout, "")):
        raise SystemExit(f"BOXPARK_BENCH_BASELINE={checkout}: boxpark is imported from {found or 'nowhere'} there, "
                         f"not from that checkout")
    return command


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args(argv or [])
    baseline = os.environ.get("BOXPARK_BENCH_BASELINE")
    labels = ["", "_baseline"] if baseline else [""]
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        paths = [f"{directory}/api{label}.sock" for label in labels]
        servers = [stack.enter_context(guest_server(paths[0]))]
        if baseline:
            servers.append(stack.enter_context(server_process(
                baseline_python(os.path.abspath(baseline)) + ["-m", "boxpark", "guest", "serve", "--listen",
                                                              f"unix:{paths[1]}"], paths[1], connect=True)))
        cpu = [cpu_seconds(server.pid) for server in servers]
        blocking_via, blocking_local, local_cpu = measure_blocking(paths, args.calls)
        client_cpu: list[list[float]] = [[] for _ in paths]
        via, local, more = asyncio.run(measure([f"unix:{path}" for path in paths], args.calls, client_cpu))
        cpu = [cpu_seconds(server.pid) - before for server, before in zip(servers, cpu)]
    load = os.getloadavg()[0]
    for label, api, ref in (("blocking", blocking_via[0], blocking_local), ("asyncio", via[0], local)):
        p90 = statistics.quantiles(api, n=10)[-1] * 1e6
        print(f"   {label} client, {args.calls} calls each: p90 through the API {p90:.0f} us, "
              f"local {statistics.quantiles(ref, n=10)[-1] * 1e6:.0f} us (load average {load:.1f})", file=sys.stderr)
    for i, label in enumerate(labels):
        figure(f"exec_true_p50_blocking_client{label}", statistics.median(blocking_via[i]) * 1e6, "us",
               statistics.median(blocking_local) * 1e6, "ratio <= 1.5 (vs local subprocess.run)")
        figure(f"exec_true_p50_asyncio_client{label}", statistics.median(via[i]) * 1e6, "us",
               statistics.median(local) * 1e6, "ratio <= 1.5 (vs local subprocess.run)")
        figure(f"exec_true_asyncio_client_cpu_per_exec{label}", statistics.mean(client_cpu[i]) * 1e6, "us",
               statistics.mean(more) * 1e6,
               "none: the asyncio client's CPU time per exec (its loop included) vs the local subprocess.run's")
        figure(f"exec_true_server_cpu_per_exec{label}", cpu[i] / (2 * args.calls + 40) * 1e6, "us",
               statistics.mean(local_cpu + more) * 1e6,
               "none: the server's user + system time per exec vs the local subprocess.run's (the spawner's own)")


if __name__ == "__main__":
    main(sys.argv[1:])
