"""The guest's DNS forwarder on loopback, against a fake upstream this test runs on 127.0.0.1 (no real DNS)."""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
import time

import pytest

from boxpark.guest import dns
from tests.unit.test_dns import query

pytestmark = pytest.mark.integration

ANSWER = "192.0.2.7"


def run(test):  # type: ignore[no-untyped-def]
    """An async test run to completion in a fresh event loop."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        return asyncio.run(test(*args, **kwargs))
    return wrapper


def answer_for(message: bytes) -> bytes:
    """A reply to `message` with one A record: 192.0.2.7."""
    question = dns.parse_question(message)
    assert question is not None
    rr = struct.pack(">HHHIH", 0xC00C, 1, 1, 30, 4) + socket.inet_aton(ANSWER)
    return message[:2] + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0) + question.raw + rr


class FakeUpstream:
    """Answers `example.test` A with 192.0.2.7 over UDP and TCP; never answers `silent.test`."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []  # (id, name) of every query that reached it
        self.port = 0
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.base_events.Server | None = None

    def reply(self, message: bytes) -> bytes | None:
        question = dns.parse_question(message)
        assert question is not None
        self.seen.append((dns.message_id(message), question.name))
        if question.name == "silent.test":
            return None
        return answer_for(message)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport):  # type: ignore[no-untyped-def]
                self.transport = transport

            def datagram_received(self, data, addr):  # type: ignore[no-untyped-def]
                answer = upstream.reply(data)
                if answer is not None:
                    self.transport.sendto(answer, addr)

        self.udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
        self.port = self.udp.get_extra_info("sockname")[1]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            size = struct.unpack(">H", await reader.readexactly(2))[0]
            answer = self.reply(await reader.readexactly(size))
            if answer is not None:
                writer.write(struct.pack(">H", len(answer)) + answer)
                await writer.drain()
            else:
                await asyncio.sleep(5)
            writer.close()

        self.tcp = await asyncio.start_server(tcp, "127.0.0.1", self.port)

    def close(self) -> None:
        assert self.udp is not None and self.tcp is not None
        self.udp.close()
        self.tcp.close()


async def ask_udp(port: int, message: bytes, timeout: float = 60.0) -> bytes:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.connect(("127.0.0.1", port))
        await loop.sock_sendall(sock, message)
        return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
    finally:
        sock.close()


async def ask_tcp(port: int, message: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(struct.pack(">H", len(message)) + message)
        size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 60))[0]
        return await reader.readexactly(size)
    finally:
        writer.close()


async def forwarder_and_upstream(upstreams: list[str] | None = None,
                                 **kwargs: object) -> tuple[dns.Forwarder, FakeUpstream]:
    upstream = FakeUpstream()
    await upstream.start()
    forwarder = dns.Forwarder("127.0.0.1", upstreams or ["127.0.0.1"], "10.0.2.2", port=0,
                              upstream_port=upstream.port, **kwargs)  # type: ignore[arg-type]
    await forwarder.start()
    return forwarder, upstream


def rcode(reply: bytes) -> int:
    return reply[3] & 0x0F


@run
async def test_forwarded_answer_is_relayed_with_the_clients_id() -> None:
    forwarder, upstream = await forwarder_and_upstream()
    try:
        for ident in (1, 2, 0xFFFF):
            reply = await ask_udp(forwarder.port, query("Example.Test", ident=ident))
            assert dns.message_id(reply) == ident and rcode(reply) == 0
            assert reply.endswith(socket.inet_aton(ANSWER)) and struct.unpack_from(">H", reply, 6)[0] == 1
        assert [name for _, name in upstream.seen] == ["example.test"] * 3
        assert not forwarder.pending
        # over TCP, relayed over TCP
        reply = await ask_tcp(forwarder.port, query("example.test", ident=77))
        assert dns.message_id(reply) == 77 and reply.endswith(socket.inet_aton(ANSWER))
    finally:
        forwarder.close()
        upstream.close()


@run
async def test_host_boxpark_internal_is_answered_locally() -> None:
    forwarder, upstream = await forwarder_and_upstream()
    try:
        a = await ask_udp(forwarder.port, query("host.boxpark.internal", dns.TYPE_A, ident=9))
        assert dns.message_id(a) == 9 and rcode(a) == 0 and a.endswith(socket.inet_aton("10.0.2.2"))
        aaaa = await ask_udp(forwarder.port, query("HOST.boxpark.internal", dns.TYPE_AAAA))
        assert rcode(aaaa) == 0 and struct.unpack_from(">H", aaaa, 6)[0] == 0
        tcp = await ask_tcp(forwarder.port, query("host.boxpark.internal"))
        assert tcp.endswith(socket.inet_aton("10.0.2.2"))
        assert upstream.seen == []
    finally:
        forwarder.close()
        upstream.close()


@run
async def test_silent_upstreams_give_servfail_after_each_timed_out() -> None:
    # 127.0.0.2 has nothing on the port (refused); 127.0.0.1 answers everything but silent.test
    forwarder, upstream = await forwarder_and_upstream(["127.0.0.2", "127.0.0.1"], timeout=0.3)
    try:
        start = time.monotonic()
        reply = await ask_udp(forwarder.port, query("example.test", ident=5))
        assert dns.message_id(reply) == 5 and reply.endswith(socket.inet_aton(ANSWER))
        assert time.monotonic() - start > 0.25  # the first upstream's timeout ran out, then the second answered
        start = time.monotonic()
        reply = await ask_udp(forwarder.port, query("silent.test", ident=6))
        assert dns.message_id(reply) == 6 and rcode(reply) == dns.RCODE_SERVFAIL
        assert time.monotonic() - start > 0.55  # both timed out before the SERVFAIL
        assert not forwarder.pending
    finally:
        forwarder.close()
        upstream.close()


@run
async def test_the_pending_table_is_bounded() -> None:
    # the upstream's timeout is long: a SERVFAIL while both questions still wait comes from the bound
    forwarder, upstream = await forwarder_and_upstream(timeout=10.0, max_pending=2)
    try:
        slow = [asyncio.ensure_future(ask_udp(forwarder.port, query("silent.test", ident=i))) for i in (1, 2)]
        while len(forwarder.pending) < 2:
            await asyncio.sleep(0.01)
        third = await ask_udp(forwarder.port, query("example.test", ident=3))
        assert rcode(third) == dns.RCODE_SERVFAIL
        assert len(forwarder.pending) == 2 and not any(s.done() for s in slow)
        assert [rcode(r) for r in await asyncio.gather(*slow)] == [dns.RCODE_SERVFAIL] * 2
    finally:
        forwarder.close()
        upstream.close()


@run
async def test_a_reply_from_elsewhere_or_to_another_question_is_ignored() -> None:
    forwarder, upstream = await forwarder_and_upstream(timeout=3.0)  # long enough for both replies to land first
    try:
        pending = asyncio.ensure_future(ask_udp(forwarder.port, query("silent.test", ident=4)))
        while not forwarder.pending:
            await asyncio.sleep(0.01)
        ident = next(iter(forwarder.pending))
        assert forwarder._upstream is not None
        target = ("127.0.0.1", forwarder._upstream.get_extra_info("socket").getsockname()[1])
        assert upstream.udp is not None  # from the upstream: the right id, the wrong question
        upstream.udp.sendto(answer_for(query("example.test", ident=ident)), target)
        spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the right id and question, wrong port
        spoofer.sendto(answer_for(query("silent.test", ident=ident)), target)
        spoofer.close()
        reply = await pending
        assert rcode(reply) == dns.RCODE_SERVFAIL  # neither was taken: the query timed out
    finally:
        forwarder.close()
        upstream.close()
