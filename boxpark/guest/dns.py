"""The guest's DNS forwarder: answers `host.boxpark.internal` itself, asks the host, relays the rest upstream.

It listens on the guest's own non-loopback address, port 53 (UDP and TCP), because Docker drops loopback
nameservers from containers' resolv.conf: an address on eth0 is reachable from the guest, from containers
on the default bridge (which copy the guest's resolv.conf) and through the embedded DNS of user-defined
networks (which forwards to the guest's resolv.conf). `host.boxpark.internal` is the host: the default
gateway (QEMU's and slirp's 10.0.2.2 map to the host's loopback; VZ NAT's gateway is the Mac).

Names go to the host first (Lima's `hostResolver`): the agent holds a `HostResolver` call open to the guest
(`HostLink`), and an A, AAAA or reverse (PTR) question goes to it as a `ResolveRequest`, answered by the
host's own resolver (its hosts file, a VPN's split DNS, macOS's scoped resolvers). The host never blocks the
guest: its answer has `HOST_TIMEOUT`, the questions waiting for it are bounded, and without a link, past the
deadline, when full or on `failed` the query goes upstream as below. Other types always go upstream.

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
from typing import TYPE_CHECKING

from .network import HOST_ALIAS

if TYPE_CHECKING:
    from ..transport import Channel

log = logging.getLogger("boxpark.dns")

PORT = 53
TYPE_A, TYPE_AAAA, TYPE_PTR, CLASS_IN = 1, 28, 12, 1
RCODE_SERVFAIL, RCODE_NXDOMAIN = 2, 3
TTL = 60
HOST_TTL = 10  # the host's resolver gives no TTL: short, so a changed hosts file or VPN shows soon
HOST_TIMEOUT = 1.5  # for the host's answer; then one upstream's 2 s still fits glibc's 5 s per try
MAX_HOST_PENDING = 256
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


def host_answer(query: bytes, question: Question, reply: object) -> bytes | None:
    """The DNS reply for the host's `ResolveReply` (found, nxdomain, nodata) to `query`; None for `failed`.

    Records of the type asked only (an address of the other family makes no record: no data), as many as fit
    a 512-byte UDP reply.
    """
    status = getattr(reply, "status", "failed")
    if status == "nxdomain":
        return _reply_header(query, RCODE_NXDOMAIN, 0, False) + question.raw
    if status not in ("found", "nodata"):
        return None
    if question.qtype == TYPE_PTR:
        return _ptr_answer(query, question, getattr(reply, "names", ()) if status == "found" else ())
    family, size = (socket.AF_INET, 4) if question.qtype == TYPE_A else (socket.AF_INET6, 16)
    records: list[bytes] = []
    room = (512 - _HEADER.size - len(question.raw)) // (12 + size)
    for address in getattr(reply, "addresses", ()) if status == "found" else ():
        try:
            packed = socket.inet_pton(family, address)
        except (OSError, ValueError, TypeError):
            continue  # an address of the other family, or junk
        if len(records) < room:
            records.append(struct.pack(">HHHIH", 0xC00C, question.qtype, CLASS_IN, HOST_TTL, size) + packed)
    return _reply_header(query, 0, len(records), False) + question.raw + b"".join(records)


def _ptr_answer(query: bytes, question: Question, names: object) -> bytes:
    """PTR records for `names` (those that make a valid DNS name), as many as fit 512 bytes."""
    records: list[bytes] = []
    room = 512 - _HEADER.size - len(question.raw)
    for name in names if isinstance(names, (list, tuple)) else ():
        wire = _wire_name(name)
        if wire is None or len(wire) + 12 > room:
            continue
        records.append(struct.pack(">HHHIH", 0xC00C, TYPE_PTR, CLASS_IN, HOST_TTL, len(wire)) + wire)
        room -= len(wire) + 12
    return _reply_header(query, 0, len(records), False) + question.raw + b"".join(records)


def _wire_name(name: object) -> bytes | None:
    if not isinstance(name, str):
        return None
    try:
        labels = [label.encode("ascii") for label in name.rstrip(".").split(".")]
    except UnicodeError:
        return None
    if not all(0 < len(label) < 64 for label in labels):
        return None
    wire = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    return wire if len(wire) <= 255 else None


def asks_host(question: Question | None) -> bool:
    if question is None or question.qclass != CLASS_IN:
        return False
    if question.qtype == TYPE_PTR:
        return question.name.endswith((".in-addr.arpa", ".ip6.arpa"))
    return question.qtype in (TYPE_A, TYPE_AAAA)


class HostLink:
    """The host's resolver as the guest sees it: the agent's `HostResolver` call, while one is open.

    `ask` never waits past its timeout and never queues past `max_pending`: it returns None instead, and
    the forwarder asks the network.
    """

    def __init__(self, max_pending: int = MAX_HOST_PENDING) -> None:
        self.max_pending = max_pending
        self.channel: Channel | None = None
        self.pending: dict[int, asyncio.Future[object]] = {}
        self._next = 0

    @property
    def up(self) -> bool:
        return self.channel is not None

    async def ask(self, name: str, qtype: int, timeout: float = HOST_TIMEOUT) -> object | None:
        """The host's `ResolveReply` for `name`, or None (no link, too many waiting, no answer in time)."""
        channel = self.channel
        if channel is None or len(self.pending) >= self.max_pending:
            return None
        from .. import protocol

        self._next = (self._next + 1) & 0x7FFFFFFF
        ident = self._next
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        try:
            channel.send(protocol.ResolveRequest(id=ident, name=name, type=qtype))
            return await asyncio.wait_for(future, timeout)
        except (asyncio.TimeoutError, ConnectionError):
            return None
        finally:
            self.pending.pop(ident, None)

    async def serve(self, channel: Channel, message: object) -> None:
        """The `HostResolver` call: take the link (ending an older one), then route replies until it ends."""
        from .. import protocol

        old, self.channel = self.channel, channel
        if old is not None:
            old.close()
            self._give_up()
        channel.send(protocol.Ok())
        try:
            while True:
                reply = await channel.recv()
                if not isinstance(reply, protocol.ResolveReply):
                    return  # the end, or not what this call carries: the host opens another
                future = self.pending.get(reply.id)
                if future is not None and not future.done():
                    future.set_result(reply)
        finally:
            if self.channel is channel:
                self.channel = None
                self._give_up()
            channel.close()

    def _give_up(self) -> None:
        """The questions asked on a link that ended get no answer from it: upstream now, not at the deadline."""
        for future in self.pending.values():
            if not future.done():
                future.set_result(None)


LINK = HostLink()
"""The guest's one link to the host's resolver: the API server serves `HostResolver` on it, forwarders ask it."""


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
                 timeout: float = TIMEOUT, max_pending: int = MAX_PENDING, link: HostLink | None = None,
                 host_timeout: float = HOST_TIMEOUT) -> None:
        self.listen = listen
        self.port = port
        self.upstreams = [(address, upstream_port) for address in upstreams]
        self.host = host
        self.timeout = timeout
        self.max_pending = max_pending
        self.pending: dict[int, _Pending] = {}
        self.link = LINK if link is None else link
        self.host_timeout = host_timeout
        self._asking: set[asyncio.Task[None]] = set()  # queries waiting for the host (bounded by the link)
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
        for task in self._asking:
            task.cancel()
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
        if question is None or (not self.upstreams and not (asks_host(question) and self.link.up)):
            return servfail(query, question), question
        return None, question

    def _from_client(self, data: bytes, client: tuple[str, int]) -> None:
        if not is_query(data):
            return  # replies, junk: no answer (answering could make a loop)
        reply, question = self.answer(data)
        if reply is None:
            assert question is not None
            if asks_host(question) and self.link.up and len(self._asking) < self.link.max_pending:
                task = asyncio.get_running_loop().create_task(self._via_host(data, question, client))
                self._asking.add(task)
                task.add_done_callback(self._asking.discard)
                return
            if len(self.pending) >= self.max_pending or not self.upstreams:
                reply = servfail(data, question)
            else:
                self._send(_Pending(data, question, client))
                return
        assert self._server is not None
        self._server.sendto(reply, client)

    async def _via_host(self, query: bytes, question: Question, client: tuple[str, int]) -> None:
        reply = await self._ask_host(query, question)
        if self._server is None or self._server.is_closing():
            return
        if reply is None:  # the host had no answer: the network's resolvers, as any other query
            if len(self.pending) < self.max_pending and self.upstreams:
                self._send(_Pending(query, question, client))
                return
            reply = servfail(query, question)
        self._server.sendto(reply, client)

    async def _ask_host(self, query: bytes, question: Question) -> bytes | None:
        return host_answer(query, question, await self.link.ask(question.name, question.qtype, self.host_timeout))

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
                if reply is None and asks_host(question):
                    assert question is not None
                    reply = await self._ask_host(query, question)
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
