"""A `ReverseForward` against a real Guest API server: a guest socket's connections reach a host socket."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from boxpark.host.client import GuestClient
from boxpark.host.hostservices import HostService, ReverseForward
from boxpark.transport import open_raw_blocking

from ..guestserver import running_server

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def echo_server(path: Path) -> Iterator[None]:
    """A host unix socket that answers every connection with b"host:" and what it got, until EOF."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(b"host:" + data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


def dial_when_there(path: Path, timeout: float = 60.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            assert time.monotonic() < deadline, f"{path} did not appear within {timeout:g} s"
            time.sleep(0.05)


async def forwarding(address: str, service: HostService) -> tuple[ReverseForward, asyncio.Task[None]]:
    forward = ReverseForward(service, lambda: GuestClient.open(address),
                             lambda request: open_raw_blocking(address, request, timeout=60))
    return forward, asyncio.ensure_future(forward.run())


def test_a_guest_socket_reaches_the_host_socket(tmp_path: Path) -> None:
    host_path, guest_path = tmp_path / "host.sock", tmp_path / "guest" / "svc.sock"

    async def main(address: str) -> None:
        forward, task = await forwarding(address, HostService("echo", str(guest_path), str(host_path)))
        try:
            for _ in range(3):
                user = await asyncio.to_thread(dial_when_there, guest_path)
                user.sendall(b"hello")
                got = b""
                while len(got) < 10:
                    got += await asyncio.to_thread(user.recv, 100)
                assert got == b"host:hello"
                user.close()
            assert forward.accepted == 3 and forward.refused == 0
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with echo_server(host_path), running_server(tmp_path) as srv:
        asyncio.run(main(srv.address))
        deadline = time.monotonic() + 60
        while guest_path.exists():  # the forward's end is its Listen stream's end: the guest socket goes
            assert time.monotonic() < deadline, "the guest socket outlived its forward"
            time.sleep(0.05)


def test_a_host_socket_that_is_gone_closes_the_guest_connection(tmp_path: Path) -> None:
    host_path, guest_path = tmp_path / "absent.sock", tmp_path / "svc.sock"

    async def main(address: str) -> None:
        forward, task = await forwarding(address, HostService("gone", str(guest_path), str(host_path)))
        try:
            user = await asyncio.to_thread(dial_when_there, guest_path)
            assert await asyncio.to_thread(user.recv, 1) == b""  # taken and closed, not left to time out
            user.close()
            assert forward.refused == 1
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with running_server(tmp_path) as srv:
        srv.server.listeners.take_within = 3600.0  # so only the forward's own close can end it
        asyncio.run(main(srv.address))


def test_a_broken_listen_is_opened_again(tmp_path: Path) -> None:
    host_path, guest_path = tmp_path / "host.sock", tmp_path / "svc.sock"

    def roundtrip() -> bytes:
        user = dial_when_there(guest_path)
        with user:
            user.sendall(b"again")
            got = b""
            while len(got) < 10 and (chunk := user.recv(100)):
                got += chunk
            return got

    with echo_server(host_path), running_server(tmp_path) as srv:
        async def main() -> None:
            forward, task = await forwarding(srv.address, HostService("echo", str(guest_path), str(host_path)))
            try:
                assert await asyncio.to_thread(roundtrip) == b"host:again"
                assert forward.listens == 1
                srv.loop.call_soon_threadsafe(srv.server.listeners.close)  # the guest ends the stream
                deadline = time.monotonic() + 60
                while forward.listens < 2:
                    assert time.monotonic() < deadline, "the forward did not listen again"
                    await asyncio.sleep(0.02)
                assert await asyncio.to_thread(roundtrip) == b"host:again"  # back, after its backoff
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        asyncio.run(main())
