"""Published ports without Docker: the guest's UDP `connect`, and the host's forwards of TCP and UDP ports
through a real Guest API server to real servers. (Docker's events and bindings: tests/*/test_everyday.py.)

The forwarded "guest" servers listen on 127.0.0.2, the host's listeners on 127.0.0.1: one machine plays both
sides, so the test's `open_guest` sends each `Connect` to 127.0.0.2 instead of the binding's guest address.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Iterator

import msgspec
import pytest

from boxpark import protocol
from boxpark.host.client import GuestClient
from boxpark.host.ports import Binding, PortForwards
from boxpark.relay import frame_datagram
from boxpark.transport import open_raw, open_raw_blocking
from tests.guestserver import running_server
from tests.servers import serving

pytestmark = pytest.mark.integration

GUEST_IP = "127.0.0.2"


@contextlib.contextmanager
def udp_echo(address: tuple[str, int] = (GUEST_IP, 0)) -> Iterator[int]:
    """A UDP server that answers each datagram with b"echo:" + it, from a thread; yields its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            sock.sendto(b"echo:" + data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        sock.close()


def tcp_echo() -> contextlib.AbstractContextManager[int]:
    """A TCP echo server on GUEST_IP, a thread per connection; yields its port."""
    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    return serving(echo, host=GUEST_IP, threaded=True)


def read_frames(sock: socket.socket, count: int) -> list[bytes]:
    sock.settimeout(10)
    buffer, frames = b"", []
    while len(frames) < count:
        chunk = sock.recv(65536)
        assert chunk, "the stream ended early"
        buffer += chunk
        while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack_from("!H", buffer)[0]:
            (length,) = struct.unpack_from("!H", buffer)
            frames.append(buffer[2:2 + length])
            buffer = buffer[2 + length:]
    return frames


def test_udp_connect_carries_datagrams_both_ways(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv, udp_echo() as port:
        async def body() -> list[bytes]:
            async with await GuestClient.open(srv.address) as client:
                sock = await client.connect(port=port, host=GUEST_IP, udp=True)
            sock.setblocking(True)
            with sock:
                payloads = [b"one", b"", b"x" * 60000]
                sock.sendall(b"".join(frame_datagram(p) for p in payloads))
                return await asyncio.to_thread(read_frames, sock, 3)

        assert sorted(srv.run(body()), key=len) == [b"echo:", b"echo:one", b"echo:" + b"x" * 60000]


def test_a_udp_flow_outlives_a_refused_datagram(tmp_path: Path) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind((GUEST_IP, 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: the first datagram is refused (ICMP), as UDP does
    with running_server(tmp_path) as srv:
        async def body() -> list[bytes]:
            async with await GuestClient.open(srv.address) as client:
                sock = await client.connect(port=port, host=GUEST_IP, udp=True)
            sock.setblocking(True)
            with sock:
                sock.sendall(frame_datagram(b"lost"))
                await asyncio.sleep(0.3)
                with udp_echo((GUEST_IP, port)):
                    sock.sendall(frame_datagram(b"kept"))
                    return await asyncio.to_thread(read_frames, sock, 1)

        assert srv.run(body()) == [b"echo:kept"]


def test_udp_connect_refuses_a_path(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        async def body() -> str:
            with pytest.raises(Exception) as caught:
                await open_raw(srv.address, protocol.Connect(path="/x.sock", udp=True))
            return str(caught.value)

        assert "udp needs a port" in srv.run(body())


def forwards_for(address: str) -> PortForwards:
    async def no_docker() -> socket.socket:
        raise OSError("no dockerd in this test")

    def open_guest(request: protocol.Connect) -> socket.socket:
        return open_raw_blocking(address, msgspec.structs.replace(request, host=GUEST_IP))

    return PortForwards(no_docker, open_guest)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_forwarded_tcp_port_serves_200_connections_at_once_and_closes_with_its_container(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv, tcp_echo() as port:
        forwards = forwards_for(srv.address)

        async def body() -> dict[str, Any]:
            await forwards.apply("c1", [Binding("tcp", "0.0.0.0", port, "web")])
            assert forwards.problems == {}

            async def one(i: int) -> bytes:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"hello %d\n" % i)
                line = await reader.readline()
                writer.close()
                return line

            lines = await asyncio.gather(*(one(i) for i in range(200)))
            assert lines == [b"hello %d\n" % i for i in range(200)]
            status = forwards.status()
            forwards.drop("c1")
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            return status

        status = srv.run(body())
        assert status["forwarded"][0]["host"] == f"127.0.0.1:{port}"
        assert status["forwarded"][0]["connections"] == 200


def test_forwarded_udp_port_keeps_each_peer_apart(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv, udp_echo() as port:
        forwards = forwards_for(srv.address)

        async def body() -> list[tuple[bytes, bytes]]:
            await forwards.apply("c2", [Binding("udp", "127.0.0.1", port, "dns")])
            peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
            try:
                for i, peer in enumerate(peers):
                    peer.settimeout(10)
                    peer.sendto(b"peer%d" % i, ("127.0.0.1", port))

                def exchange(peer: socket.socket) -> tuple[bytes, bytes]:
                    first = peer.recv(100)
                    peer.sendto(b"again", ("127.0.0.1", port))
                    return first, peer.recv(100)

                answers = await asyncio.to_thread(lambda: [exchange(peer) for peer in peers])
            finally:
                for peer in peers:
                    peer.close()
            forwards.drop("c2")
            return answers

        assert srv.run(body()) == [(b"echo:peer%d" % i, b"echo:again") for i in range(3)]


def test_a_host_port_in_use_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        forwards = forwards_for(srv.address)
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        free = free_port(socket.SOCK_STREAM)

        async def body() -> dict[str, Any]:
            await forwards.apply("c3", [Binding("tcp", "127.0.0.1", port, "busy"),
                                        Binding("tcp", "127.0.0.1", free, "busy")])
            status = forwards.status()
            forwards.drop("c3")
            return status

        try:
            status = srv.run(body())
        finally:
            taken.close()
        assert status["problems"] == [f"tcp 127.0.0.1:{port} for busy: Address already in use"]
        assert [f["host"] for f in status["forwarded"]] == [f"127.0.0.1:{free}"]
        assert forwards.problems == {}  # dropped with its container
