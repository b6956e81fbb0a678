"""Log throughput: lines per second delivered to a host client from a flooding service, and lines lost.

A service runs `seq 1 N` (default 2,000,000) under `launch` with connect and the default ring; the host's
asyncio `GuestClient` follows the `LogBatch`es, checks that every batch continues the last one (sequence
numbers and line contents at both ends) and counts `dropped`. The guest server runs in its own process.
With at least two CPUs the guest server (and so the service, which inherits it) is pinned to one CPU and
the client to another: guest and host do not share CPUs in a real machine, and on a two-CPU box an
unpinned client competes with the very service it is reading.

Reference, in the same run, alternating with the measured rounds after one warm-up round of each: the
same `seq` read through a local pipe and split into lines by the bench process itself (the floor of
"reading lines" on this machine), with `seq` on the guest server's CPU and the reader on the client's, as
in the measured path (so both get the same two CPUs). Goals: >= 500,000 lines/s, 0 lost.
Run: `python -m bench log_flood` (or `python bench/log_flood.py [--lines N] [--rounds N]`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._report import figure, guest_server  # noqa: E402




def local_lines_per_second(lines: int, producer_cpus: set[int] | None = None) -> float:
    """Read `seq 1 lines` through a pipe and split it into lines, here; `seq` on `producer_cpus` (else on
    this process's own CPUs)."""
    start = time.perf_counter()
    pin_child = None if producer_cpus is None else (lambda: os.sched_setaffinity(0, producer_cpus))
    process = subprocess.Popen(["seq", "1", str(lines)], stdout=subprocess.PIPE, preexec_fn=pin_child)
    assert process.stdout is not None
    count = 0
    tail = b""
    while chunk := os.read(process.stdout.fileno(), 65536):
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        count += len(parts)
    process.wait()
    elapsed = time.perf_counter() - start
    if count != lines:
        raise RuntimeError(f"read {count} lines locally, not {lines}")
    return lines / elapsed


async def flood(address: str, name: str, lines: int) -> tuple[float, int, int]:
    """Lines/s delivered, lines received, lines dropped for one flooding service."""
    from boxpark import protocol
    from boxpark.host.client import GuestClient

    async with await GuestClient.open(address) as client:
        start = time.perf_counter()
        stream = await client.launch_connect(name, ["seq", "1", str(lines)])
        received = dropped = 0
        expected = 1
        exit = None
        async for frame in stream:
            if isinstance(frame, protocol.LogBatch):
                records = frame.records
                if not records:
                    continue
                dropped += frame.dropped
                first, last = records[0], records[-1]
                if (first.seq != expected + frame.dropped or last.seq != first.seq + len(records) - 1
                        or first.data != b"%d" % first.seq or last.data != b"%d" % last.seq):
                    raise RuntimeError(f"batch out of order: expected seq {expected}, got {first.seq}..{last.seq}")
                received += len(records)
                expected = last.seq + 1
            elif isinstance(frame, protocol.Exit):
                exit = frame
        elapsed = time.perf_counter() - start
    if exit is None or exit.code != 0:
        raise RuntimeError(f"the service ended with {exit}")
    if received + dropped != lines:
        raise RuntimeError(f"{received} received + {dropped} dropped != {lines} lines")
    return received / elapsed, received, dropped


def pin(server_pid: int) -> tuple[str, set[int] | None]:
    """Pin the guest server to one CPU and this process to another; the server's CPUs (None: unpinned)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "unpinned (one CPU)", None
    os.sched_setaffinity(server_pid, {cpus[0]})
    os.sched_setaffinity(0, {cpus[1]})
    return f"guest server (and seq in the reference) on CPU {cpus[0]}, client on CPU {cpus[1]}", {cpus[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true", help="let guest server and client share the CPUs")
    args = parser.parse_args(argv or [])
    affinity = os.sched_getaffinity(0)
    rates: list[float] = []
    lost: list[int] = []
    local: list[float] = []
    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/api.sock"
        with guest_server(path) as server:
            try:
                placement, producer = ("unpinned", None) if args.no_pin else pin(server.pid)
                print(f"   {args.lines} lines per round; {placement}", file=sys.stderr)
                local_lines_per_second(args.lines, producer)  # warm-up of both
                asyncio.run(flood(f"unix:{path}", "flood-warm-up", args.lines))
                for round_ in range(args.rounds):
                    local.append(local_lines_per_second(args.lines, producer))
                    rate, received, dropped = asyncio.run(flood(f"unix:{path}", f"flood{round_}", args.lines))
                    rates.append(rate)
                    lost.append(dropped)
                    print(f"   round {round_ + 1}: {rate:,.0f} lines/s delivered, {dropped} lost; "
                          f"local read {local[-1]:,.0f} lines/s", file=sys.stderr)
            finally:
                os.sched_setaffinity(0, affinity)
    figure("log_flood_lines_per_s", statistics.median(rates), "lines/s", statistics.median(local),
           ">= 500000 lines/s")
    figure("log_flood_lines_lost", max(lost), "lines", None, "0 (worst round)")


if __name__ == "__main__":
    main(sys.argv[1:])
