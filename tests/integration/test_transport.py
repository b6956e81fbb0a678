"""The transport's edges over real sockets: what a listener holds for a peer before `Welcome` (frame size,
pending handshakes, which tcp peers it serves at all) and dialing a unix listener whose backlog is full."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import AsyncIterator

import pytest

from boxpark import protocol
from boxpark.protocol import ErrorCode
from boxpark.transport import (Address, Channel, TransportError, dial, dial_blocking, dial_socket,
                               listen_socket, parse_address, proof, serve)

pytestmark = pytest.mark.integration

SECRET = b"s" * 32


async def echo_sizes(channel: Channel) -> None:
    """A handler that answers every message with an Error carrying its encoded size (any reply would do)."""
    while (message := await channel.recv()) is not None:
        channel.send(protocol.error(ErrorCode.FAILED, str(len(protocol.encode(message)))))


@contextlib.asynccontextmanager
async def server(address: Address, **options: object) -> AsyncIterator[Address]:
    sock = listen_socket(address)
    if address.kind == "tcp":
        address = parse_address(f"tcp:127.0.0.1:{sock.getsockname()[1]}")
    srv = await serve(address, echo_sizes, sock=sock, **options)  # type: ignore[arg-type]
    try:
        yield address
    finally:
        srv.close()
        srv.close_clients()


async def open_(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.kind == "unix":
        return await asyncio.open_unix_connection(address.path)
    return await asyncio.open_connection(address.host, address.port)


async def read_frame(reader: asyncio.StreamReader) -> protocol.Message | None:
    """The next frame, or None at the end of the stream (a reset counts as the end)."""
    try:
        header = await asyncio.wait_for(reader.readexactly(4), 30)
        (length,) = protocol.HEADER.unpack(header)
        return protocol.decode_body(await asyncio.wait_for(reader.readexactly(length), 30))
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None


async def everything(reader: asyncio.StreamReader) -> bytes:
    """All the server sends until it closes (a reset counts as closing)."""
    try:
        return await asyncio.wait_for(reader.read(), 30)
    except ConnectionResetError:
        return b""


def test_a_large_frame_before_welcome_is_refused_at_its_header(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with server(parse_address(f"unix:{tmp_path}/api.sock")) as address:
            reader, writer = await open_(address)
            writer.write(protocol.HEADER.pack(protocol.MAX_FRAME) + b"\0" * 65536)
            reply = await read_frame(reader)  # without the cap it waits for 16 MiB, then times out
            assert isinstance(reply, protocol.Error) and reply.code == ErrorCode.BAD_FRAME, reply
            assert str(protocol.MAX_HANDSHAKE_FRAME) in reply.message
            assert await read_frame(reader) is None
            writer.close()

            # after Welcome, full-size frames: even pipelined right behind the Hello
            reader, writer = await open_(address)
            big = protocol.WriteFile(path="/x", data=b"\0" * (1 << 20))
            writer.write(protocol.encode(protocol.Hello()) + protocol.encode(big))
            assert isinstance(await read_frame(reader), protocol.Welcome)
            reply = await read_frame(reader)
            assert isinstance(reply, protocol.Error) and reply.message == str(len(protocol.encode(big)))
            writer.close()

    asyncio.run(scenario())


def test_on_tcp_the_proof_is_small_too_and_a_request_may_ride_behind_it() -> None:
    async def scenario() -> None:
        async with server(parse_address("tcp:127.0.0.1:0"), secret=SECRET) as address:
            for proof_frame in (protocol.HEADER.pack(1 << 24), protocol.HEADER.pack(protocol.MAX_HANDSHAKE_FRAME + 1)):
                reader, writer = await open_(address)
                writer.write(protocol.encode(protocol.Hello()))
                assert isinstance(await read_frame(reader), protocol.Challenge)
                writer.write(proof_frame + b"\0" * 100)
                reply = await read_frame(reader)  # tcp may reset rather than deliver it, if bytes are unread
                assert reply is None or isinstance(reply, protocol.Error) and reply.code == ErrorCode.BAD_FRAME, reply
                assert await read_frame(reader) is None
                writer.close()

            reader, writer = await open_(address)
            writer.write(protocol.encode(protocol.Hello()))
            challenge = await read_frame(reader)
            assert isinstance(challenge, protocol.Challenge)
            big = protocol.WriteFile(path="/x", data=b"\0" * (1 << 20))
            writer.write(protocol.encode(protocol.Proof(hmac=proof(SECRET, challenge.nonce))) + protocol.encode(big))
            assert isinstance(await read_frame(reader), protocol.Welcome)
            reply = await read_frame(reader)
            assert isinstance(reply, protocol.Error) and reply.message == str(len(protocol.encode(big)))
            writer.close()

    asyncio.run(scenario())


def test_pending_handshakes_are_capped_and_the_excess_closed_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with server(parse_address(f"unix:{tmp_path}/api.sock"), max_pending=4) as address:
            silent = [await open_(address) for _ in range(4)]
            reader, writer = await open_(address)
            assert await everything(reader) == b""  # closed before any reply (not a handshake timeout)
            writer.close()

            # the silent ones are still served; each Welcome frees a place
            first_reader, first_writer = silent[0]
            first_writer.write(protocol.encode(protocol.Hello()))
            assert isinstance(await read_frame(first_reader), protocol.Welcome)
            channel, welcome = await dial(address, timeout=30)
            assert isinstance(welcome, protocol.Welcome)
            channel.close()
            for _, w in silent:
                w.close()

    asyncio.run(scenario())


def test_a_tcp_listener_limited_to_peers_closes_others_before_reading_a_byte() -> None:
    async def scenario() -> None:
        async with server(parse_address("tcp:127.0.0.1:0"), secret=SECRET, peers=["10.0.2.2"]) as address:
            reader, writer = await open_(address)
            writer.write(protocol.encode(protocol.Hello()))
            assert await everything(reader) == b""  # no Challenge: the Hello was never read
            writer.close()
            with pytest.raises(TransportError):
                await dial(address, secret=SECRET, timeout=30)
        async with server(parse_address("tcp:127.0.0.1:0"), secret=SECRET, peers=["127.0.0.1"]) as address:
            channel, _ = await dial(address, secret=SECRET, timeout=30)
            channel.close()
        with pytest.raises(TransportError, match="only a tcp listener"):
            await serve(parse_address(f"unix:/nonexistent/x"), echo_sizes, peers=["127.0.0.1"])

    asyncio.run(scenario())


def full_unix_listener(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listener with backlog 1 that does not accept, and the connections that fill its backlog."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    held = []
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(path)
        except BlockingIOError:
            probe.close()
            return listener, held
        held.append(probe)


def accept_later(listener: socket.socket, count: int) -> threading.Thread:
    """Start accepting in a moment (after the dial has met the full backlog), and keep the connections."""
    def run() -> None:
        time.sleep(0.5)
        accepted = []
        listener.settimeout(60)
        for _ in range(count):
            conn, _ = listener.accept()
            accepted.append(conn)
        conn = accepted[-1]
        conn.sendall(b"welcome")
        time.sleep(2)  # let the dialer read it before the connections go

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_dial_blocking_waits_out_a_full_backlog(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    listener, held = full_unix_listener(path)
    try:
        with pytest.raises(TransportError, match="backlog stayed full"):
            dial_blocking(parse_address(f"unix:{path}"), timeout=0.3)
        thread = accept_later(listener, len(held) + 1)
        sock = dial_blocking(parse_address(f"unix:{path}"), timeout=30)  # was: EAGAIN at once
        sock.settimeout(30)
        assert sock.recv(16) == b"welcome"
        sock.close()
        thread.join(60)
    finally:
        listener.close()
        for probe in held:
            probe.close()


def test_dial_socket_waits_out_a_full_backlog_and_times_out_if_it_stays_full(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    listener, held = full_unix_listener(path)

    async def scenario() -> None:
        with pytest.raises(TransportError, match="backlog stayed full"):
            await dial_socket(parse_address(f"unix:{path}"), timeout=0.3)
        thread = accept_later(listener, len(held) + 1)
        sock = await dial_socket(parse_address(f"unix:{path}"), timeout=30)
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(sock, 16), 30) == b"welcome"  # was: not even connected
        sock.close()
        await asyncio.to_thread(thread.join, 60)

    try:
        asyncio.run(scenario())
    finally:
        listener.close()
        for probe in held:
            probe.close()


def test_a_client_with_a_secret_gets_its_first_request_answered_where_no_proof_is_asked(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with server(parse_address(f"unix:{tmp_path}/api.sock")) as address:
            request = protocol.Info()
            channel, _ = await dial(address, secret=SECRET, timeout=30, then=request)
            try:  # was: the request waited for a Challenge that never came, and was never sent
                reply = await asyncio.wait_for(channel.recv(), 30)
            finally:
                channel.close()
            assert isinstance(reply, protocol.Error) and reply.message == str(len(protocol.encode(request)))

    asyncio.run(scenario())


def test_a_closed_channel_with_a_fast_path_is_freed_without_a_cyclic_collection() -> None:
    """The guest server's fast path closes over its channel; once the peer has gone nothing may keep the
    channel (its protocol, decoder and buffers) alive until the next full collection."""
    async def main() -> weakref.ref[Channel]:
        near, far = socket.socketpair()
        channel = await Channel.from_socket(near)
        hold_in_fast_path(channel)
        far.close()
        assert await channel.recv() is None
        channel.abort()
        ref = weakref.ref(channel)
        del channel
        for _ in range(10):  # connection_lost comes on a later turn of the loop
            await asyncio.sleep(0.01)
        return ref

    def hold_in_fast_path(channel: Channel) -> None:  # as the server's does (a closure of its own)
        channel.set_fast_path(lambda message: channel is None)

    gc.disable()  # a collection would hide the cycle
    try:
        ref = asyncio.run(main())
        assert ref() is None, "the closed channel is held by a reference cycle"
    finally:
        gc.enable()
