"""The guest's DNS forwarder: answers `host.boxpark.internal` itself, relays every other query upstream.

It listens on the guest's own non-loopback address, port 53 (UDP and TCP), because Docker drops loopback
nameservers from containers' resolv.conf: an address on eth0 is reachable from the guest, from containers
on the default bridge (which copy the guest's resolv.conf) and through the embedded DNS of user-defined
networks (which forwards to the guest's resolv.conf). `host.boxpark.internal` is the host: the default
gateway (QEMU's and slirp's 10.0.2.2 map to the host's loopback; VZ NAT's gateway is the Mac).

Forwarding keeps no cache and parses no more than the question: each query goes out on one shared UDP
socket under a fresh random id (the client's id is restored in the reply), to each upstream in turn with
a timeout; a reply counts only from the upstream asked, with the id and question it was asked. When every
upstream is silent the client gets SERVFAIL, so its resolver stops waiting. The pending table is bounded:
a query beyond it gets SERVFAIL at once. TCP queries are relayed over a TCP connection per query.

The boot path: nothing slow to import (no `random`/`secrets`: os.urandom gives the ids); of the guest only
`network`, which the boot has loaded already and which owns the host's name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

from .network import HOST_ALIAS

log = logging.getLogger("boxpark.dns")

PORT = 53
TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
RCODE_SERVFAIL = 2
TTL = 60
TIMEOUT = 2.0  # per upstream: two of them still answer (SERVFAIL) before glibc's 5 s per try runs out
MAX_PENDING = 1024
MAX_TCP_CLIENTS = 64
_HEADER = struct.Struct(">HHHHHH")


class Question:
    """The one question of a query: its name (lower case, no trailing dot), type, class and raw bytes."""

    __slots__ = ("name", "qtype", "qclass", "raw")

    def __init__(self, name: str, qtype: int, qclass: int, raw: bytes) -> None:
        self.name = name
        self.qtype = qtype
        self.qclass = qclass
        self.raw = raw  # the question as sent (name, type, class), case preserved


def parse_question(message: bytes) -> Question | None:
    """The question of a message with exactly one (queries have one); None if there is none or it is bad.

    Compression pointers are not followed: no resolver compresses the only name of a query.
    """
    if len(message) < _HEADER.size:
        return None
    qdcount = _HEADER.unpack_from(message)[2]
    if qdcount != 1:
        return None
    labels: list[str] = []
    offset = _HEADER.size
    length = 0
    while True:
        if offset >= len(message):
            return None
        size = message[offset]
        if size == 0:
            offset += 1
            break
        if size & 0xC0:  # a pointer or a reserved label type
            return None
        label = message[offset + 1:offset + 1 + size]
        if len(label) != size:
            return None
        length += size + 1
        if length > 255:
            return None
        labels.append(label.decode("ascii", "replace").lower())
        offset += 1 + size
    if offset + 4 > len(message):
        return None
    qtype, qclass = struct.unpack_from(">HH", message, offset)
    return Question(".".join(labels), qtype, qclass, message[_HEADER.size:offset + 4])


def message_id(message: bytes) -> int:
    return struct.unpack_from(">H", message)[0]


def with_id(message: bytes, ident: int) -> bytes:
    return struct.pack(">H", ident) + message[2:]


def is_query(message: bytes) -> bool:
    """QR=0 and a standard query (opcode 0)."""
    return len(message) >= _HEADER.size and message[2] & 0xF8 == 0


def _reply_header(query: bytes, rcode: int, answers: int, authoritative: bool) -> bytes:
    ident, flags = struct.unpack_from(">HH", query)
    rd = flags & 0x0100
    flags = 0x8000 | rd | 0x0080 | rcode | (0x0400 if authoritative else 0)  # QR, RD as asked, RA, AA
    return _HEADER.pack(ident, flags, 1, answers, 0, 0)


def local_answer(query: bytes, question: Question, address: str) -> bytes:
    """The reply for `host.boxpark.internal`: A → `address`; any other type → no data (NOERROR, empty).

    An empty AAAA answer (not NXDOMAIN) tells resolvers the name exists with only an IPv4 address, so
    they use the A record instead of giving up on the name.
    """
    answers = b""
    if question.qtype == TYPE_A and question.qclass == CLASS_IN:
        # the name as a pointer to the question's (offset 12), type A, class IN, TTL, 4 bytes of address
        answers = struct.pack(">HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL, 4) + socket.inet_aton(address)
    return _reply_header(query, 0, 1 if answers else 0, True) + question.raw + answers


def servfail(query: bytes, question: Question | None) -> bytes:
    """SERVFAIL for `query`, with its question when it has one."""
    if question is None:
        ident, flags = struct.unpack_from(">HH", query)
        return _HEADER.pack(ident, 0x8000 | (flags & 0x0100) | 0x0080 | RCODE_SERVFAIL, 0, 0, 0, 0)
    return _reply_header(query, RCODE_SERVFAIL, 0, False) + question.raw


class _Pending:
    __slots__ = ("query", "question", "client", "client_id", "upstream", "timer")

    def __init__(self, query: bytes, question: Question, client: tuple[str, int]) -> None:
        self.query = query
        self.question = question
        self.client = client
        self.client_id = message_id(query)
        self.upstream = 0  # the index of the upstream asked
        self.timer: asyncio.TimerHandle | None = None


class Forwarder:
    """The forwarder on `listen` (an IPv4 address), answering `host.boxpark.internal` with `host`."""

    def __init__(self, listen: str, upstreams: list[str], host: str, port: int = PORT, upstream_port: int = PORT,
                 timeout: float = TIMEOUT, max_pending: int = MAX_PENDING) -> None:
        self.listen = listen
        self.port = port
        self.upstreams = [(address, upstream_port) for address in upstreams]
        self.host = host
        self.timeout = timeout
        self.max_pending = max_pending
        self.pending: dict[int, _Pending] = {}
        self._server: asyncio.DatagramTransport | None = None
        self._upstream: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._tcp_clients = 0

    async def start(self) -> None:
        """Bind UDP (and TCP) on the listen address; an OSError if the UDP port cannot be had."""
        loop = asyncio.get_running_loop()
        for attempt in range(10 if self.port == 0 else 1):  # port 0 (tests): one free for both UDP and TCP
            self._server, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self._from_client), local_addr=(self.listen, self.port))
            port = self._server.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._tcp_client, self.listen, port, reuse_address=True,
                                                       backlog=16)
                break
            except OSError as exc:
                if self.port == 0 and attempt < 9:
                    self._server.close()
                    continue
                log.warning("DNS over TCP not served on %s:%d: %s", self.listen, port, exc.strerror)
        self.port = port
        if self.upstreams:
            self._upstream, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self._from_upstream), family=socket.AF_INET)

    def close(self) -> None:
        for pending in self.pending.values():
            if pending.timer is not None:
                pending.timer.cancel()
        self.pending.clear()
        for transport in (self._server, self._upstream):
            if transport is not None:
                transport.close()
        if self._tcp is not None:
            self._tcp.close()

    async def stop(self) -> None:
        """`close()`, then wait until its ports are free: a new forwarder may bind the same address."""
        self.close()  # the TCP listener closes at once (its clients are not waited for: 3.12's wait_closed would)
        await asyncio.sleep(0)  # a datagram transport closes its socket on the loop's next iteration

    # ------------------------------------------------------------------------------- UDP

    def answer(self, query: bytes) -> tuple[bytes | None, Question | None]:
        """A local reply for `query`, or None with its question when it must go upstream."""
        question = parse_question(query)
        if question is not None and question.name == HOST_ALIAS:
            return local_answer(query, question, self.host), question
        if question is None or not self.upstreams:
            return servfail(query, question), question
        return None, question

    def _from_client(self, data: bytes, client: tuple[str, int]) -> None:
        if not is_query(data):
            return  # replies, junk: no answer (answering could make a loop)
        reply, question = self.answer(data)
        if reply is None:
            assert question is not None
            if len(self.pending) >= self.max_pending:
                reply = servfail(data, question)
            else:
                self._send(_Pending(data, question, client))
                return
        assert self._server is not None
        self._server.sendto(reply, client)

    def _new_id(self) -> int:
        while True:
            ident = int.from_bytes(os.urandom(2), "big")
            if ident not in self.pending:
                return ident

    def _send(self, pending: _Pending, ident: int | None = None) -> None:
        if ident is None:
            ident = self._new_id()
            self.pending[ident] = pending
        assert self._upstream is not None
        self._upstream.sendto(with_id(pending.query, ident), self.upstreams[pending.upstream])
        pending.timer = asyncio.get_running_loop().call_later(self.timeout, self._timed_out, ident)

    def _timed_out(self, ident: int) -> None:
        pending = self.pending.get(ident)
        if pending is None:
            return
        pending.upstream += 1
        if pending.upstream < len(self.upstreams):
            del self.pending[ident]  # the next upstream gets a fresh id: a late reply to this one is ignored
            self._send(pending)
            return
        del self.pending[ident]
        log.debug("no upstream answered %s (type %d)", pending.question.name, pending.question.qtype)
        assert self._server is not None
        self._server.sendto(servfail(pending.query, pending.question), pending.client)

    def _from_upstream(self, data: bytes, source: tuple[str, int]) -> None:
        if len(data) < _HEADER.size or not data[2] & 0x80:
            return
        pending = self.pending.get(message_id(data))
        if pending is None or source[:2] != self.upstreams[pending.upstream]:
            return
        question = parse_question(data)
        if question is not None and question.raw.lower() != pending.question.raw.lower():
            return  # not the reply to what we asked (a question-less reply, e.g. FORMERR, is taken)
        del self.pending[message_id(data)]
        if pending.timer is not None:
            pending.timer.cancel()
        assert self._server is not None
        self._server.sendto(with_id(data, pending.client_id), pending.client)

    # ------------------------------------------------------------------------------- TCP

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Length-prefixed queries, answered in order, until the client closes or idles for 10 s."""
        self._tcp_clients += 1
        try:
            if self._tcp_clients > MAX_TCP_CLIENTS:
                return
            while True:
                try:
                    size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 10.0))[0]
                    query = await asyncio.wait_for(reader.readexactly(size), 10.0)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
                    return
                if not is_query(query):
                    return
                reply, question = self.answer(query)
                if reply is None:
                    reply = await self._tcp_upstream(query, question)
                writer.write(struct.pack(">H", len(reply)) + reply)
                await writer.drain()
        except OSError:
            pass
        finally:
            self._tcp_clients -= 1
            writer.close()

    async def _tcp_upstream(self, query: bytes, question: Question | None) -> bytes:
        for address in self.upstreams:
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), self.timeout)
                writer.write(struct.pack(">H", len(query)) + query)
                size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), self.timeout))[0]
                reply = await asyncio.wait_for(reader.readexactly(size), self.timeout)
                if len(reply) >= _HEADER.size and message_id(reply) == message_id(query):
                    return reply
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                continue
            finally:
                if writer is not None:
                    writer.close()
        return servfail(query, question)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, received) -> None:  # type: ignore[no-untyped-def]
        self.datagram_received = received  # type: ignore[method-assign]

    def error_received(self, exc: Exception) -> None:  # an ICMP unreachable from a client or upstream
        log.debug("DNS socket: %s", exc)
