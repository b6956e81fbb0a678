"""The Guest Proxy over a real Guest API server: bytes both ways, half-close, 1,000 concurrent
connections, a refusal that says why, and a dead guest side that closes the host side promptly; relaying
in the agent and in a relay process of its own (`handoff`, the api.sock forward), which ends its
connections and itself with the proxy."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from boxpark.host.guestproxy import GuestProxy
from boxpark.protocol import Connect
from boxpark.transport import open_raw_blocking
from tests.guestserver import running_server

pytestmark = pytest.mark.integration


class EchoServer:
    """A threaded unix-socket echo server that answers EOF with a byte count (to prove half-close)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(4096)
        self.clients: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.clients.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        total = 0
        try:
            while data := conn.recv(65536):
                total += len(data)
                conn.sendall(data)
            conn.sendall(f"EOF after {total}".encode())
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.clients:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


@pytest.fixture
def setup(short_tmp):
    echo = EchoServer(f"{short_tmp}/echo.sock")
    with running_server(Path(short_tmp)) as srv:
        yield short_tmp, srv, echo
    echo.close()


def make_proxy(directory: str, srv, unavailable=lambda: None, handoff: bool = False) -> GuestProxy:
    def open_target() -> socket.socket:
        return open_raw_blocking(srv.address, Connect(path=f"{directory}/echo.sock"))

    return GuestProxy(f"{directory}/proxy.sock", open_target, unavailable=unavailable, handoff=handoff)


@pytest.mark.parametrize("handoff", [False, True], ids=["in-process", "handoff"])
def test_bytes_both_ways_and_half_close(setup, handoff: bool) -> None:
    directory, srv, _ = setup

    async def scenario() -> bytes:
        proxy = make_proxy(directory, srv, handoff=handoff)
        await proxy.start()
        try:
            reader, writer = await asyncio.open_unix_connection(f"{directory}/proxy.sock")
            payload = os.urandom(3 * 1024 * 1024)
            reading = asyncio.ensure_future(reader.read())  # read while writing: the echo answers as it goes

            writer.write(payload)
            await writer.drain()
            writer.write_eof()  # half-close: the echo server still answers after our EOF
            data = await asyncio.wait_for(reading, 30)
            writer.close()
            assert data[:len(payload)] == payload
            return data[len(payload):]
        finally:
            proxy.close()

    assert asyncio.run(scenario()) == f"EOF after {3 * 1024 * 1024}".encode()
    assert not os.path.exists(f"{directory}/proxy.sock")


def test_a_thousand_concurrent_connections(setup) -> None:
    directory, srv, _ = setup

    async def scenario() -> list[bytes]:
        proxy = make_proxy(directory, srv)
        await proxy.start()

        async def one(i: int) -> bytes:
            reader, writer = await asyncio.open_unix_connection(f"{directory}/proxy.sock")
            await start.wait()  # all 1,000 open at the same time before any talks
            writer.write(b"hello %d" % i)
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(), 60)
            writer.close()
            return data

        start = asyncio.Event()
        try:
            tasks = [asyncio.ensure_future(one(i)) for i in range(1000)]
            await asyncio.sleep(0)
            while proxy.accepted < 1000:
                await asyncio.sleep(0.05)
            start.set()
            return await asyncio.gather(*tasks)
        finally:
            proxy.close()

    from boxpark.host.guestproxy import raise_nofile

    raise_nofile()
    started = time.monotonic()
    results = asyncio.run(scenario())
    assert results == [b"hello %d" % i + f"EOF after {len(b'hello %d' % i)}".encode() for i in range(1000)]
    print(f"1000 concurrent connections in {time.monotonic() - started:.1f} s")


def test_refusal_says_why(setup) -> None:
    directory, srv, _ = setup

    async def scenario() -> bytes:
        proxy = make_proxy(directory, srv, unavailable=lambda: "dockerd in the Boxpark guest is restarting")
        await proxy.start()
        try:
            reader, writer = await asyncio.open_unix_connection(f"{directory}/proxy.sock")
            writer.write(b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 60)
            writer.close()
            return data
        finally:
            proxy.close()

    answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 503") and b"restarting" in answer


@pytest.mark.parametrize("handoff", [False, True], ids=["in-process", "handoff"])
def test_dead_guest_side_closes_the_host_side_promptly(setup, handoff: bool) -> None:
    """The target's end reaches the host side as EOF (a proxy that missed it would hold the connection open
    until the deadline; how soon it comes is bench's to measure)."""
    directory, srv, echo = setup

    async def scenario() -> bytes:
        proxy = make_proxy(directory, srv, handoff=handoff)
        await proxy.start()
        try:
            reader, writer = await asyncio.open_unix_connection(f"{directory}/proxy.sock")
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            echo.close()  # the target in the guest goes away without a word
            data = await asyncio.wait_for(reader.read(), 60)
            writer.close()
            return data
        finally:
            proxy.close()

    assert asyncio.run(scenario()) == b""


def test_the_relay_process_ends_its_connections_and_itself_with_the_proxy(setup) -> None:
    """A connection relayed by the proxy's relay process (the agent's api.sock) is open and working; the proxy
    closes (the agent stops): the client sees the end of its stream and the process is gone."""
    directory, srv, _ = setup

    async def scenario() -> tuple[bytes, int]:
        proxy = make_proxy(directory, srv, handoff=True)
        await proxy.start()
        assert proxy._handoff is not None
        child = proxy._handoff._process
        try:
            reader, writer = await asyncio.open_unix_connection(f"{directory}/proxy.sock")
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 60) == b"ping"
        finally:
            proxy.close()
        data = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        return data, child.pid

    data, pid = asyncio.run(scenario())
    assert data == b""
    assert not os.path.exists(f"/proc/{pid}")  # waited for by close: gone, not a zombie


def test_the_relay_process_ends_when_its_parent_end_closes(setup) -> None:
    """The relay process outlives nothing: its end of the socketpair reads EOF (the agent SIGKILLed) and it
    ends its connections and exits."""
    from boxpark.relay import Handoff

    directory, _, echo = setup
    handoff = Handoff()
    client, near = socket.socketpair()
    target = socket.socket(socket.AF_UNIX)
    target.connect(echo.path)
    handoff.relay(near, target)
    client.settimeout(60)
    client.sendall(b"ping")
    assert client.recv(4) == b"ping"
    handoff._sock.close()  # as the kernel does when the agent dies
    assert handoff._process.wait(60) == 0
    assert client.recv(100) == b""
    client.close()
