"""Unary exec latency: `exec(["true"])` through the Guest API against a local `subprocess.run(["true"])`.

The guest server runs in its own process (`boxpark guest serve` on a unix socket). Two callers, as in
`api_latency`: a blocking client with pre-encoded frames (the guest's own share: what the server adds to a
spawn) and the host's asyncio `GuestClient`, as the agent uses it (adding asyncio's round trip on this
machine). Each is measured alternately with the local run, so both see the same machine; figures are
medians. Goal: ratio <= 1.5.
Run: `python -m bench exec_true` (or `python bench/exec_true.py [--calls N]`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._report import figure, guest_server  # noqa: E402




async def measure(address: str, calls: int) -> tuple[list[float], list[float]]:
    from boxpark.host.client import GuestClient

    via: list[float] = []
    local: list[float] = []
    async with await GuestClient.open(address) as client:
        for _ in range(20):  # warm both paths up
            await client.exec(["true"])
            subprocess.run(["true"])
        for _ in range(calls):
            start = time.perf_counter()
            result = await client.exec(["true"])
            via.append(time.perf_counter() - start)
            if result.code != 0:
                raise RuntimeError(f"true exited with {result.code} through the API")
            start = time.perf_counter()
            subprocess.run(["true"])
            local.append(time.perf_counter() - start)
    return via, local


def measure_blocking(path: str, calls: int) -> tuple[list[float], list[float]]:
    from boxpark import protocol

    via: list[float] = []
    local: list[float] = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    decoder = protocol.FrameDecoder()

    def call(frame: bytes) -> protocol.Message:
        sock.sendall(frame)
        while (message := decoder.next_message()) is None:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the guest server closed the connection")
            decoder.feed(data)
        return message

    try:
        if not isinstance(call(protocol.encode(protocol.Hello(client="bench"))), protocol.Welcome):
            raise RuntimeError("no Welcome from the guest server")
        request = protocol.encode(protocol.Exec(argv=["true"]))
        for _ in range(20):  # warm up both paths, as in `measure`
            call(request)
            subprocess.run(["true"])
        for _ in range(calls):
            start = time.perf_counter()
            reply = call(request)
            via.append(time.perf_counter() - start)
            if not isinstance(reply, protocol.ExecResult) or reply.code != 0:
                raise RuntimeError(f"exec of true through the API answered {reply!r}")
            start = time.perf_counter()
            subprocess.run(["true"])
            local.append(time.perf_counter() - start)
    finally:
        sock.close()
    return via, local


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args(argv or [])
    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/api.sock"
        with guest_server(path):
            blocking_via, blocking_local = measure_blocking(path, args.calls)
            via, local = asyncio.run(measure(f"unix:{path}", args.calls))
    for label, api, ref in (("blocking", blocking_via, blocking_local), ("asyncio", via, local)):
        p90 = statistics.quantiles(api, n=10)[-1] * 1e6
        print(f"   {label} client, {args.calls} calls each: p90 through the API {p90:.0f} us, "
              f"local {statistics.quantiles(ref, n=10)[-1] * 1e6:.0f} us", file=sys.stderr)
    figure("exec_true_p50_blocking_client", statistics.median(blocking_via) * 1e6, "us",
           statistics.median(blocking_local) * 1e6, "ratio <= 1.5 (vs local subprocess.run)")
    figure("exec_true_p50_asyncio_client", statistics.median(via) * 1e6, "us", statistics.median(local) * 1e6,
           "ratio <= 1.5 (vs local subprocess.run)")


if __name__ == "__main__":
    main(sys.argv[1:])
