"""`Listen` and `TakeConnection` against a real Guest API server: a guest socket whose connections the client
takes, data both ways, the server's bounds, and cleanup when the `Listen` stream's client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from boxpark import protocol
from boxpark.guest.listen import Listeners
from boxpark.host.client import GuestClient
from boxpark.protocol import ErrorCode

from ..guestserver import refused, running_server, serve_process

pytestmark = pytest.mark.integration


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.02)
    return result


def dial(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(path))
    return sock


def sees_end(sock: socket.socket) -> bool:
    """The guest closed this connection (read gives EOF or a reset), within the socket's timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


async def next_accepted(stream: Any) -> int:
    async for frame in stream:
        assert isinstance(frame, protocol.Accepted), frame
        return int(frame.id)
    raise AssertionError("the Listen stream ended")


async def read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        assert chunk, f"end of stream after {data!r}"
        data += chunk
    return data


def test_connections_are_taken_and_carry_data_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "run" / "host-services" / "svc.sock"

    async def main(address: str) -> None:
        async with await GuestClient.open(address) as client:
            stream = await client.stream(protocol.Listen(path=str(path)))
            assert isinstance(stream.first, protocol.Ok)
            assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o666
            loop = asyncio.get_running_loop()
            for round_ in range(3):  # several connections, one after another, each its own id
                user = await asyncio.to_thread(dial, path)
                ident = await next_accepted(stream)
                taken = await client.open_raw(protocol.TakeConnection(id=ident))
                taken.setblocking(False)
                user.sendall(b"ping %d" % round_)
                assert await read_exactly(taken, 6) == b"ping %d" % round_
                await loop.sock_sendall(taken, b"pong" * 10000)  # more than one read's worth the other way
                got = b""
                while len(got) < 40000:
                    got += await asyncio.to_thread(user.recv, 65536)
                assert got == b"pong" * 10000
                user.shutdown(socket.SHUT_WR)  # half-close reaches the taker, and its answer still arrives
                assert await loop.sock_recv(taken, 1) == b""
                await loop.sock_sendall(taken, b"bye")
                taken.close()
                assert await asyncio.to_thread(user.recv, 3) == b"bye"
                user.close()
            await refused(client.open_raw(protocol.TakeConnection(id=ident)), ErrorCode.NOT_FOUND, "no such")
            stream.close()

    with running_server(tmp_path) as srv:
        asyncio.run(main(srv.address))
        wait_for(lambda: srv.server.listeners.status() == {"listeners": 0, "pending": 0},
                 "the listener went with its stream")
    assert not path.exists()


def test_the_server_bounds_waiting_connections_and_their_time(tmp_path: Path) -> None:
    path = tmp_path / "svc.sock"

    async def main(address: str) -> None:
        async with await GuestClient.open(address) as client:
            stream = await client.stream(protocol.Listen(path=str(path)))
            users = []
            ids = []
            for _ in range(3):  # one more than may wait: the oldest is closed
                users.append(await asyncio.to_thread(dial, path))
                ids.append(await next_accepted(stream))
            assert await asyncio.to_thread(sees_end, users[0])
            await refused(client.open_raw(protocol.TakeConnection(id=ids[0])), ErrorCode.NOT_FOUND)
            # the others are closed when nobody takes them in time, and cannot be taken after
            for user, ident in zip(users[1:], ids[1:]):
                assert await asyncio.to_thread(sees_end, user)
                await refused(client.open_raw(protocol.TakeConnection(id=ident)), ErrorCode.NOT_FOUND)
            for user in users:
                user.close()
            stream.close()

    with running_server(tmp_path) as srv:
        srv.server._listeners = Listeners(max_pending=2, take_within=1.0)
        asyncio.run(main(srv.address))
        wait_for(lambda: srv.server.listeners.status() == {"listeners": 0, "pending": 0}, "cleanup")


def test_refusals(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a socket")

    async def main(address: str) -> None:
        async with await GuestClient.open(address) as client:
            await refused(client.stream(protocol.Listen(path="relative.sock")), ErrorCode.INVALID_ARGUMENT)
            await refused(client.stream(protocol.Listen(path=str(tmp_path / "file"))), ErrorCode.ALREADY_EXISTS)
            assert (tmp_path / "file").read_text() == "not a socket"
            await refused(client.stream(protocol.Listen(path=str(tmp_path / "m.sock"), mode=0o7777)),
                          ErrorCode.INVALID_ARGUMENT)
            await refused(client.open_raw(protocol.TakeConnection(id=12345)), ErrorCode.NOT_FOUND)
            streams = [await client.stream(protocol.Listen(path=str(tmp_path / f"{i}.sock"))) for i in range(2)]
            await refused(client.stream(protocol.Listen(path=str(tmp_path / "2.sock"))), ErrorCode.UNAVAILABLE,
                          "2 listening sockets")
            for stream in streams:
                stream.close()

    with running_server(tmp_path) as srv:
        srv.server._listeners = Listeners(max_listeners=2)
        asyncio.run(main(srv.address))


def test_a_second_listen_takes_the_path_over(tmp_path: Path) -> None:
    path = tmp_path / "svc.sock"

    async def main(address: str) -> None:
        async with await GuestClient.open(address) as client:
            first = await client.stream(protocol.Listen(path=str(path)))
            second = await client.stream(protocol.Listen(path=str(path)))
            assert [frame async for frame in first] == []  # the first stream ended
            user = await asyncio.to_thread(dial, path)
            ident = await next_accepted(second)
            taken = await client.open_raw(protocol.TakeConnection(id=ident))
            user.sendall(b"x")
            assert await read_exactly(taken, 1) == b"x"
            taken.close()
            user.close()
            second.close()

    with running_server(tmp_path) as srv:
        asyncio.run(main(srv.address))


def test_guest_serve_removes_the_socket_and_what_waits_when_the_client_goes(tmp_path: Path) -> None:
    path = tmp_path / "svc.sock"

    async def listen_and_leave(address: str) -> socket.socket:
        client = await GuestClient.open(address)
        stream = await client.stream(protocol.Listen(path=str(path)))
        user = await asyncio.to_thread(dial, path)
        await next_accepted(stream)
        stream.channel.abort()  # the client vanishes with a connection still waiting
        await client.close()
        return user

    with serve_process(tmp_path) as (address, process):
        user = asyncio.run(listen_and_leave(address))
        assert sees_end(user)
        user.close()
        wait_for(lambda: not path.exists(), "the socket file went with the client")
        assert process.poll() is None


def test_a_host_that_does_not_read_stops_the_accepting_not_the_server(tmp_path: Path) -> None:
    """Announcements to a client that reads none of them do not pile up in the server: once its stream's
    buffers are full the guest stops accepting, and the socket's backlog fills and refuses connects; when
    the client reads again, accepting goes on."""
    from .test_server import hello, raw_connect, recv_frame, send_frame

    path = tmp_path / "svc.sock"
    with running_server(tmp_path) as srv:
        host = raw_connect(srv.address)
        host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hello(host)
        send_frame(host, protocol.Listen(path=str(path)))
        assert isinstance(recv_frame(host), protocol.Ok)
        connected = refusals = 0
        deadline = time.monotonic() + 120  # a bound on the loop, not the condition
        while connected < 40_000 and refusals < 500 and time.monotonic() < deadline:
            user = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                user.connect(str(path))
                connected, refusals = connected + 1, 0
            except BlockingIOError:  # the backlog is full: the guest is not accepting (or is behind)
                refusals += 1
                time.sleep(0.002)
            finally:
                user.close()

        async def buffered() -> int:
            listener = srv.server.listeners._listeners[str(path)]
            return int(listener.channel._transport.get_write_buffer_size())

        # each `Accepted` is ~20 bytes: what 40,000 of them would be, minus what the sockets hold, is far more
        assert srv.run(buffered()) <= 64 * 1024 + 1024, f"{connected} announced to a client that reads none"
        assert srv.server.listeners.status()["pending"] <= Listeners().max_pending
        host.setblocking(False)

        def accepting_again() -> bool:
            with contextlib.suppress(BlockingIOError):
                while host.recv(1 << 20):
                    pass
            user = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            with user:
                try:
                    user.connect(str(path))
                except BlockingIOError:
                    return False
            return True

        wait_for(accepting_again, "accepting after the client read again")
        host.close()
        wait_for(lambda: srv.server.listeners.status() == {"listeners": 0, "pending": 0}, "cleanup")
