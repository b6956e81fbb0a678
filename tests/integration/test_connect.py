"""The connect call over real sockets: a real dockerd's API, a TCP port, half-close both ways, bytes sent
before the `Ok`, and targets that are missing, refusing or silent (an error, never a hang)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest

from boxpark import protocol
from boxpark.host.client import GuestClient, RemoteError
from boxpark.protocol import ErrorCode
from tests.guestserver import refused, running_server
from tests.nsfixture import Namespace, dockerd, requires_root

pytestmark = pytest.mark.integration

needs_dockerd = pytest.mark.skipif(shutil.which("dockerd") is None, reason="needs dockerd (docker.io)")


def with_client(directory: str, body: Callable[[GuestClient], Awaitable[Any]]) -> Any:
    with running_server(Path(directory)) as srv:
        async def run() -> Any:
            async with await GuestClient.open(srv.address) as client:
                return await body(client)

        return asyncio.run(run())


@contextlib.contextmanager
def target(family: int, address: Any, handler: Callable[[socket.socket], None],
           backlog: int = 16) -> Iterator[Any]:
    """A listener served by `handler` (one thread per connection); yields its bound address."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(backlog)
    errors: list[BaseException] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return

            def run(conn: socket.socket = conn) -> None:
                with conn:
                    try:
                        handler(conn)
                    except BaseException as exc:  # surfaced to the test
                        errors.append(exc)

            threading.Thread(target=run, daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
    if errors:
        raise errors[0]


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def read_to_eof(sock: socket.socket) -> bytes:
    parts = []
    while data := sock.recv(65536):
        parts.append(data)
    return b"".join(parts)


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(function, *args), 30)


def blocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(True)
    sock.settimeout(30)
    return sock


@requires_root
@needs_dockerd
def test_the_host_reaches_a_real_dockerd(guest_ns: Namespace) -> None:
    with dockerd(guest_ns) as daemon:
        async def body() -> list[bytes]:
            async with await GuestClient.open(guest_ns.address) as client:
                for _ in range(600):  # until dockerd listens (its socket is refused or missing till then)
                    try:
                        sock = blocking(await client.connect(path=daemon.socket))
                        break
                    except RemoteError as exc:
                        assert exc.code in (ErrorCode.NOT_FOUND, ErrorCode.UNAVAILABLE)
                        await asyncio.sleep(0.05)
                else:
                    raise AssertionError("dockerd did not come up")
                answers = []
                for request in (b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n",
                                b"GET /version HTTP/1.0\r\nHost: docker\r\n\r\n"):
                    if sock is None:
                        sock = blocking(await client.connect(path=daemon.socket))
                    sock.sendall(request)
                    answers.append(await in_thread(read_to_eof, sock))
                    sock.close()
                    sock = None
                return answers

        ping, version = asyncio.run(body())
    assert ping.startswith(b"HTTP/1.0 200") and ping.endswith(b"\r\n\r\nOK")
    assert b'"ApiVersion"' in version


def test_tcp_port_and_bytes_both_ways_at_once(short_tmp: str) -> None:
    payload_up, payload_down = os.urandom(8 << 20), os.urandom(8 << 20)

    def handler(conn: socket.socket) -> None:
        sender = threading.Thread(target=lambda: (conn.sendall(payload_down), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        received = read_to_eof(conn)
        sender.join()
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload_up).digest()

    with target(socket.AF_INET, ("127.0.0.1", 0), handler) as (_, port):
        async def body(client: GuestClient) -> bytes:
            sock = blocking(await client.connect(port=port, host="127.0.0.1"))
            with sock:
                def up() -> None:
                    sock.sendall(payload_up)
                    sock.shutdown(socket.SHUT_WR)

                sending = asyncio.create_task(in_thread(up))
                received = await in_thread(read_to_eof, sock)
                await sending
                return received

        assert with_client(short_tmp, body) == payload_down


def test_half_close_from_the_client(short_tmp: str) -> None:
    """The client ends its stream; the target reads to EOF and then still answers (`docker run -i`)."""
    def handler(conn: socket.socket) -> None:
        data = read_to_eof(conn)
        conn.sendall(b"got %d bytes, sha256 %s" % (len(data), hashlib.sha256(data).hexdigest().encode()))

    data = os.urandom(3 << 20)
    with target(socket.AF_UNIX, f"{short_tmp}/t.sock", handler):
        async def body(client: GuestClient) -> bytes:
            with blocking(await client.connect(path=f"{short_tmp}/t.sock")) as sock:
                await in_thread(sock.sendall, data)
                sock.shutdown(socket.SHUT_WR)
                return await in_thread(read_to_eof, sock)

        assert with_client(short_tmp, body) == b"got %d bytes, sha256 %s" % (
            len(data), hashlib.sha256(data).hexdigest().encode())


def test_half_close_from_the_target(short_tmp: str) -> None:
    """The target ends its stream first; the client sees EOF and can still send (`docker attach`)."""
    received: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        received.append(read_to_eof(conn))

    with target(socket.AF_UNIX, f"{short_tmp}/t.sock", handler):
        async def body(client: GuestClient) -> bytes:
            with blocking(await client.connect(path=f"{short_tmp}/t.sock")) as sock:
                banner = await in_thread(read_to_eof, sock)
                sock.sendall(b"still talking after your EOF")
                sock.shutdown(socket.SHUT_WR)
                assert await in_thread(read_to_eof, sock) == b""
                return banner

        assert with_client(short_tmp, body) == b"banner"
        for _ in range(500):
            if received:
                break
            time.sleep(0.01)
    assert received == [b"still talking after your EOF"]


def test_bytes_sent_right_behind_the_connect_frame_go_first(short_tmp: str) -> None:
    """A client may pipeline: Hello, Connect and raw bytes in one write, before any reply."""
    def handler(conn: socket.socket) -> None:
        conn.sendall(b"target saw: " + read_to_eof(conn))

    with target(socket.AF_UNIX, f"{short_tmp}/t.sock", handler), running_server(Path(short_tmp)) as srv:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(srv.address.removeprefix("unix:"))
        sock.sendall(protocol.encode(protocol.Hello()) + protocol.encode(protocol.Connect(path=f"{short_tmp}/t.sock"))
                     + b"EARLY BYTES|")
        sock.sendall(b"later bytes")
        sock.shutdown(socket.SHUT_WR)
        decoder = protocol.FrameDecoder()
        replies: list[protocol.Message] = []
        while len(replies) < 2:
            decoder.feed(sock.recv(65536))
            while (message := decoder.next_message()) is not None:
                replies.append(message)
        assert [type(r) for r in replies] == [protocol.Welcome, protocol.Ok]
        rest = decoder.detach() + read_to_eof(sock)
        sock.close()
    assert rest == b"target saw: EARLY BYTES|later bytes"


def test_targets_that_fail_give_errors_not_hangs(short_tmp: str) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(f"{short_tmp}/stale.sock")  # bound, never listening: refused
    open(f"{short_tmp}/file", "w").close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # nothing listens once it is closed

    async def body(client: GuestClient) -> dict[str, tuple[ErrorCode, str]]:
        cases = {
            "missing": dict(path=f"{short_tmp}/missing.sock"),
            "stale": dict(path=f"{short_tmp}/stale.sock"),
            "file": dict(path=f"{short_tmp}/file"),
            "refused": dict(port=closed_port),
            "both": dict(path="/x", port=1),
            "neither": dict(),
            "port 0": dict(port=0),
            "bad host": dict(port=80, host="no-such-host.invalid"),
        }
        outcome = {}
        for name, kwargs in cases.items():
            with pytest.raises(RemoteError) as info:
                await asyncio.wait_for(client.connect(**kwargs), 60)  # type: ignore[arg-type]
            outcome[name] = (info.value.code, info.value.message)
        return outcome

    try:
        outcome = with_client(short_tmp, body)
    finally:
        stale.close()
    assert outcome["missing"][0] == ErrorCode.NOT_FOUND and "missing.sock" in outcome["missing"][1]
    assert outcome["stale"][0] == ErrorCode.UNAVAILABLE and "nothing listens" in outcome["stale"][1]
    assert outcome["file"][0] == ErrorCode.UNAVAILABLE
    assert outcome["refused"][0] == ErrorCode.UNAVAILABLE and str(closed_port) in outcome["refused"][1]
    assert {outcome[k][0] for k in ("both", "neither", "port 0")} == {ErrorCode.INVALID_ARGUMENT}
    assert outcome["bad host"][0] == ErrorCode.NOT_FOUND


def test_a_target_that_never_accepts_times_out(short_tmp: str) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{short_tmp}/full.sock")
    listener.listen(0)
    fillers = []
    while True:  # fill the backlog until a connect would block
        filler = socket.socket(socket.AF_UNIX)
        filler.setblocking(False)
        try:
            filler.connect(f"{short_tmp}/full.sock")
        except BlockingIOError:
            filler.close()
            break
        fillers.append(filler)

    async def body(client: GuestClient) -> float:
        start = time.monotonic()
        with pytest.raises(RemoteError) as info:
            await asyncio.wait_for(client.connect(path=f"{short_tmp}/full.sock", timeout=0.5), 10)
        assert info.value.code == ErrorCode.TIMEOUT and "0.5 s" in info.value.message
        return time.monotonic() - start

    try:
        assert with_client(short_tmp, body) < 5
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_many_connections_at_once_and_a_client_that_vanishes(short_tmp: str) -> None:
    eofs: list[int] = []

    def handler(conn: socket.socket) -> None:
        if conn.recv(1) == b"V":  # the vanishing client: we must see EOF, not hang
            read_to_eof(conn)
            eofs.append(1)
            return
        echo(conn)

    with target(socket.AF_UNIX, f"{short_tmp}/t.sock", handler, backlog=128):
        async def one(client: GuestClient, i: int) -> bytes:
            with blocking(await client.connect(path=f"{short_tmp}/t.sock")) as sock:
                message = b"E%04d" % i * 1000
                await in_thread(sock.sendall, message)
                sock.shutdown(socket.SHUT_WR)
                return await in_thread(read_to_eof, sock)

        async def body(client: GuestClient) -> list[bytes]:
            vanishing = blocking(await client.connect(path=f"{short_tmp}/t.sock"))
            vanishing.sendall(b"V partial")
            vanishing.close()  # no shutdown, just gone
            return await asyncio.gather(*(one(client, i) for i in range(40)))

        answers = with_client(short_tmp, body)
        assert answers == [(b"E%04d" % i * 1000)[1:] for i in range(40)]
        for _ in range(500):
            if eofs:
                break
            time.sleep(0.01)
    assert eofs == [1]


def test_closing_the_server_ends_open_relays(short_tmp: str) -> None:
    ended = threading.Event()

    def handler(conn: socket.socket) -> None:
        read_to_eof(conn)
        ended.set()

    with target(socket.AF_UNIX, f"{short_tmp}/t.sock", handler):
        with running_server(Path(short_tmp)) as srv:
            async def open_one() -> socket.socket:
                async with await GuestClient.open(srv.address) as client:
                    return blocking(await client.connect(path=f"{short_tmp}/t.sock"))

            sock = asyncio.run(open_one())
            sock.sendall(b"x")
        # the server is gone: the target saw its stream end and the client sees EOF
        assert ended.wait(60)
        assert read_to_eof(sock) == b""
        sock.close()


def test_a_timeout_that_is_not_a_positive_finite_number_of_seconds_is_refused(short_tmp: str) -> None:
    async def body(client: GuestClient) -> None:
        for timeout in (math.nan, math.inf, 0.0, -1.0):
            await refused(asyncio.wait_for(client.connect(path=f"{short_tmp}/missing.sock", timeout=timeout), 60),
                          ErrorCode.INVALID_ARGUMENT, "timeout", str(timeout))

    with_client(short_tmp, body)
