"""Benchmark of the Guest API's connect call: throughput and the added latency of a new connection.

Side by side in one run, every figure against its reference:
- throughput: 1 GiB written to a unix-socket sink through `Connect` versus straight to the sink, the
  median of `--rounds` alternating samples per side after a warm-up of each (goal: ratio >= 0.6);
- latency: a new connection with one 1-byte round trip through `Connect` versus a direct connect to the
  same echo server; the value is the difference (goal: <= 0.3 ms added).

The guest server, the sink and the echo server each run in their own process, as in the guest. The client
side speaks the protocol with blocking sockets and pre-encoded frames, so the figure is the guest's share.
`main()` prints one JSON line per figure on stdout; human text goes to stderr.
Run: `python bench/connect_throughput.py [--size-mib N] [--rounds N] [--connections N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._report import figure, server_process  # noqa: E402
from boxpark import protocol  # noqa: E402

CHUNK = 1024 * 1024


def _sink(path: str) -> None:
    """Accept connections; read each to EOF and answer with the byte count (8 bytes, big-endian)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    buffer = bytearray(CHUNK)
    while True:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):  # the readiness probe connects and goes
            total = 0
            while got := conn.recv_into(buffer):
                total += got
            conn.sendall(total.to_bytes(8, "big"))


def _echo(path: str) -> None:
    """Accept connections; echo one byte back on each, then close it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    while True:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):
            data = conn.recv(1)
            if data:
                conn.sendall(data)


def _recv_frame(sock: socket.socket, decoder: protocol.FrameDecoder) -> protocol.Message:
    while (message := decoder.next_message()) is None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the guest server closed the connection")
        decoder.feed(data)
    return message


_HELLO = protocol.encode(protocol.Hello(client="bench"))


def open_connect(api: str, target: str) -> socket.socket:
    """A raw stream to `target` through the Guest API at unix socket `api` (blocking, minimal client)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(api)
    decoder = protocol.FrameDecoder()
    sock.sendall(_HELLO + protocol.encode(protocol.Connect(path=target)))
    welcome = _recv_frame(sock, decoder)
    reply = _recv_frame(sock, decoder)
    if not isinstance(welcome, protocol.Welcome) or not isinstance(reply, protocol.Ok):
        raise RuntimeError(f"connect through the API failed: {welcome!r} {reply!r}")
    assert not decoder.detach()
    return sock


def _send_all(sock: socket.socket, size: int) -> float:
    """Write `size` bytes, half-close, wait for the sink's count; return seconds."""
    block = memoryview(b"\x5a" * CHUNK)
    start = time.perf_counter()
    left = size
    while left:
        n = min(left, CHUNK)
        sock.sendall(block[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while len(answer) < 8:
        data = sock.recv(8 - len(answer))
        if not data:
            raise ConnectionError("the sink closed without a count")
        answer += data
    elapsed = time.perf_counter() - start
    sock.close()
    if int.from_bytes(answer, "big") != size:
        raise RuntimeError(f"the sink got {int.from_bytes(answer, 'big')} bytes, not {size}")
    return elapsed


def throughput(api: str, sink: str, size: int, rounds: int) -> tuple[float, float]:
    """Median bytes/s through the API and direct, alternating so both see the same machine."""
    via, direct = [], []
    for _ in range(rounds + 1):  # the first pair warms up
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        plain.connect(sink)
        direct.append(size / _send_all(plain, size))
        via.append(size / _send_all(open_connect(api, sink), size))
    return statistics.median(via[1:]), statistics.median(direct[1:])


def _round_trip(sock: socket.socket) -> None:
    sock.sendall(b"x")
    if sock.recv(1) != b"x":
        raise RuntimeError("the echo server did not answer")
    sock.close()


def _handshake_only(api: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(api)
    sock.sendall(_HELLO)
    if not isinstance(_recv_frame(sock, protocol.FrameDecoder()), protocol.Welcome):
        raise RuntimeError("no Welcome")
    sock.close()


def latency(api: str, echo: str, connections: int) -> tuple[float, float, float]:
    """Median seconds for connect + 1-byte round trip, through the API and direct; and for a bare handshake."""
    via, direct, handshake = [], [], []
    for _ in range(20):  # warm-up of all three
        _handshake_only(api)
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        plain.connect(echo)
        _round_trip(plain)
        _round_trip(open_connect(api, echo))
    for _ in range(connections):
        start = time.perf_counter()
        _handshake_only(api)
        handshake.append(time.perf_counter() - start)
        start = time.perf_counter()
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        plain.connect(echo)
        _round_trip(plain)
        direct.append(time.perf_counter() - start)
        start = time.perf_counter()
        _round_trip(open_connect(api, echo))
        via.append(time.perf_counter() - start)
    return statistics.median(via), statistics.median(direct), statistics.median(handshake)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    parser.add_argument("--echo", help=argparse.SUPPRESS)
    args = parser.parse_args(argv or [])  # `python -m bench` calls main() with no arguments
    if args.sink:
        _sink(args.sink)
        return 0
    if args.echo:
        _echo(args.echo)
        return 0
    me = [sys.executable, os.path.abspath(__file__)]
    env_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="bp-bench-", dir="/tmp") as tmp:
        api, sink, echo = f"{tmp}/api.sock", f"{tmp}/sink.sock", f"{tmp}/echo.sock"
        server = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from boxpark.cli import main; "
                  "sys.exit(main(['guest', 'serve', '--listen', 'unix:' + sys.argv[2]]))", env_root, api]
        with server_process(server, api, connect=True), server_process(me + ["--sink", sink], sink, connect=True), \
                server_process(me + ["--echo", echo], echo, connect=True):
            size = args.size_mib * 1024 * 1024
            print(f"connect: {args.size_mib} MiB to a unix-socket sink, median of {args.rounds} ...", file=sys.stderr)
            via, direct = throughput(api, sink, size, args.rounds)
            figure("connect_throughput", via / 1e9, "GB/s", direct / 1e9, ">= 0.6 (ratio)")
            print(f"connect: {args.connections} new connections with a 1-byte round trip ...", file=sys.stderr)
            via_s, direct_s, handshake_s = latency(api, echo, args.connections)
            added = (via_s - direct_s) * 1e3
            print(f"   through the API {via_s * 1e3:.3f} ms, direct {direct_s * 1e3:.3f} ms; of the added time "
                  f"a new API connection's Hello/Welcome alone takes {handshake_s * 1e3:.3f} ms", file=sys.stderr)
            figure("connect_added_latency", added, "ms", direct_s * 1e3, "<= 0.3 ms (value)", ratio=via_s / direct_s)
            figure("connect_added_latency_past_handshake", (via_s - handshake_s - direct_s) * 1e3, "ms",
                   handshake_s * 1e3, "informative: the Connect call's own share")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
