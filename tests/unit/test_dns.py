"""The DNS forwarder's message handling: questions parsed, local answers and SERVFAILs built byte-exact."""

from __future__ import annotations

import socket
import struct

from boxpark.guest import dns


def name(text: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in text.split(".")) + b"\0"


def query(qname: str, qtype: int = dns.TYPE_A, ident: int = 0x1234, flags: int = 0x0100, extra: bytes = b"",
          arcount: int = 0) -> bytes:
    return struct.pack(">HHHHHH", ident, flags, 1, 0, 0, arcount) + name(qname) + struct.pack(">HH", qtype, 1) + extra


def test_parse_question_lowers_the_name_and_keeps_the_raw_bytes() -> None:
    q = dns.parse_question(query("Host.BoxPark.Internal", dns.TYPE_AAAA))
    assert q is not None
    assert (q.name, q.qtype, q.qclass) == ("host.boxpark.internal", dns.TYPE_AAAA, 1)
    assert q.raw == name("Host.BoxPark.Internal") + struct.pack(">HH", dns.TYPE_AAAA, 1)


def test_parse_question_refuses_what_is_not_one_plain_question() -> None:
    assert dns.parse_question(b"\0" * 11) is None
    two = bytearray(query("a.b"))
    two[5] = 2
    assert dns.parse_question(bytes(two)) is None
    assert dns.parse_question(query("a.b")[:-2]) is None  # no class
    assert dns.parse_question(query("a.b")[:15]) is None  # the name cut short
    pointer = struct.pack(">HHHHHH", 1, 0x100, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack(">HH", 1, 1)
    assert dns.parse_question(pointer) is None
    too_long = struct.pack(">HHHHHH", 1, 0x100, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\0" + b"\0\1\0\1"
    assert dns.parse_question(too_long) is None


def test_local_a_answer() -> None:
    q = query("HOST.boxpark.internal", ident=0xBEEF, extra=b"\0\0\x29\x10\0\0\0\0\0\0\0", arcount=1)  # EDNS OPT
    question = dns.parse_question(q)
    assert question is not None
    reply = dns.local_answer(q, question, "10.0.2.2")
    ident, flags, qd, an, ns, ar = struct.unpack_from(">HHHHHH", reply)
    assert ident == 0xBEEF
    assert flags == 0x8000 | 0x0400 | 0x0100 | 0x0080  # QR, AA, RD (as asked), RA; NOERROR
    assert (qd, an, ns, ar) == (1, 1, 0, 0)  # the OPT record is not echoed
    body = reply[12:]
    assert body.startswith(question.raw)  # the question as asked, its case kept
    rr = body[len(question.raw):]
    assert rr == struct.pack(">HHHIH", 0xC00C, 1, 1, dns.TTL, 4) + socket.inet_aton("10.0.2.2")


def test_local_aaaa_and_other_types_are_empty_noerror() -> None:
    for qtype in (dns.TYPE_AAAA, 15, 16):
        q = query("host.boxpark.internal", qtype, flags=0)
        question = dns.parse_question(q)
        assert question is not None
        reply = dns.local_answer(q, question, "10.0.2.2")
        assert struct.unpack_from(">HHHHHH", reply) == (0x1234, 0x8000 | 0x0400 | 0x0080, 1, 0, 0, 0)
        assert reply[12:] == question.raw


def test_servfail_keeps_id_rd_and_question() -> None:
    q = query("example.test", ident=7)
    question = dns.parse_question(q)
    reply = dns.servfail(q, question)
    assert struct.unpack_from(">HHHHHH", reply) == (7, 0x8000 | 0x0100 | 0x0080 | 2, 1, 0, 0, 0)
    assert reply[12:] == question.raw
    bare = dns.servfail(q, None)
    assert struct.unpack_from(">HHHHHH", bare) == (7, 0x8000 | 0x0100 | 0x0080 | 2, 0, 0, 0, 0) and len(bare) == 12


def test_ids_and_query_flags() -> None:
    q = query("a.b", ident=0x0102)
    assert dns.message_id(q) == 0x0102
    assert dns.message_id(dns.with_id(q, 0xFFFE)) == 0xFFFE and dns.with_id(q, 0xFFFE)[2:] == q[2:]
    assert dns.is_query(q)
    assert not dns.is_query(query("a.b", flags=0x8100))  # a reply
    assert not dns.is_query(query("a.b", flags=0x2800))  # opcode 5 (update)
    assert not dns.is_query(b"\0" * 5)


def test_answer_decides_local_forward_or_servfail() -> None:
    forwarder = dns.Forwarder("127.0.0.1", ["192.0.2.1"], "10.0.2.2")
    local, _ = forwarder.answer(query("host.boxpark.internal"))
    assert local is not None and struct.unpack_from(">H", local, 6)[0] == 1
    upstream, question = forwarder.answer(query("example.test"))
    assert upstream is None and question is not None and question.name == "example.test"
    bad, _ = forwarder.answer(b"\0" * 12)  # no question: cannot be forwarded meaningfully
    assert bad is not None and bad[3] & 0x0F == dns.RCODE_SERVFAIL
    alone = dns.Forwarder("127.0.0.1", [], "10.0.2.2")
    nothing, _ = alone.answer(query("example.test"))
    assert nothing is not None and nothing[3] & 0x0F == dns.RCODE_SERVFAIL


def test_no_message_makes_the_handling_raise() -> None:
    """Whatever arrives on port 53 (junk, truncations, mutations of a real query) gets an answer or nothing."""
    import random

    rng = random.Random(6)
    forwarder = dns.Forwarder("127.0.0.1", ["192.0.2.1"], "10.0.2.2")
    seeds = [query("host.boxpark.internal"), query("example.test", dns.TYPE_AAAA)]
    for _ in range(5000):
        if rng.random() < 0.3:
            message = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        else:
            message = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                message[rng.randrange(len(message))] = rng.getrandbits(8)
            message = bytes(message[:rng.randrange(len(message) + 1)])
        dns.parse_question(message)
        if dns.is_query(message):
            reply, _ = forwarder.answer(message)
            assert reply is None or (len(reply) >= 12 and reply[:2] == message[:2] and reply[2] & 0x80)


def records(reply: bytes, question_length: int) -> list[bytes]:
    """The rdata of each answer record of a reply built here (names as pointers)."""
    count = struct.unpack_from(">H", reply, 6)[0]
    offset, found = 12 + question_length, []
    for _ in range(count):
        size = struct.unpack_from(">H", reply, offset + 10)[0]
        found.append(reply[offset + 12:offset + 12 + size])
        offset += 12 + size
    assert offset == len(reply)
    return found


def test_host_answer_maps_the_hosts_reply() -> None:
    from boxpark.protocol import ResolveReply

    a = query("only.host.test", dns.TYPE_A, ident=7)
    question = dns.parse_question(a)
    assert question is not None
    found = dns.host_answer(a, question, ResolveReply(id=1, status="found", addresses=["192.0.2.1", "192.0.2.2"]))
    assert found is not None and found[:2] == a[:2] and found[3] & 0x0F == 0
    assert records(found, len(question.raw)) == [socket.inet_aton("192.0.2.1"), socket.inet_aton("192.0.2.2")]
    # AAAA of a name with only IPv4 addresses: no data (NOERROR, empty), never NXDOMAIN
    aaaa = query("only.host.test", dns.TYPE_AAAA)
    q6 = dns.parse_question(aaaa)
    assert q6 is not None
    empty = dns.host_answer(aaaa, q6, ResolveReply(id=1, status="found", addresses=["192.0.2.1"]))
    assert empty is not None and empty[3] & 0x0F == 0 and records(empty, len(q6.raw)) == []
    six = dns.host_answer(aaaa, q6, ResolveReply(id=1, status="found", addresses=["2001:db8::1", "192.0.2.1"]))
    assert six is not None and records(six, len(q6.raw)) == [socket.inet_pton(socket.AF_INET6, "2001:db8::1")]
    nodata = dns.host_answer(a, question, ResolveReply(id=1, status="nodata", addresses=["192.0.2.1"]))
    assert nodata is not None and nodata[3] & 0x0F == 0 and records(nodata, len(question.raw)) == []
    nx = dns.host_answer(a, question, ResolveReply(id=1, status="nxdomain"))
    assert nx is not None and nx[3] & 0x0F == dns.RCODE_NXDOMAIN and records(nx, len(question.raw)) == []
    assert dns.host_answer(a, question, ResolveReply(id=1, status="failed")) is None
    assert dns.host_answer(a, question, None) is None  # no reply at all: upstream


def test_host_answer_fits_a_udp_reply() -> None:
    from boxpark.protocol import ResolveReply

    for qtype, many in ((dns.TYPE_A, [f"10.0.{i // 256}.{i % 256}" for i in range(500)]),
                        (dns.TYPE_AAAA, [f"2001:db8::{i:x}" for i in range(500)])):
        message = query("many.test", qtype)
        question = dns.parse_question(message)
        assert question is not None
        reply = dns.host_answer(message, question, ResolveReply(id=1, status="found", addresses=many))
        assert reply is not None and len(reply) <= 512 and len(records(reply, len(question.raw))) > 10


def test_only_a_and_aaaa_in_class_in_ask_the_host() -> None:
    asked = [dns.asks_host(dns.parse_question(query("x.test", qtype))) for qtype in (1, 28, 12, 15, 16, 33, 255)]
    assert asked == [True, True, False, False, False, False, False]
    assert not dns.asks_host(None)


def test_host_answer_for_a_reverse_name() -> None:
    from boxpark.protocol import ResolveReply

    message = query("10.2.0.192.in-addr.arpa", dns.TYPE_PTR, ident=3)
    question = dns.parse_question(message)
    assert question is not None and dns.asks_host(question)
    reply = dns.host_answer(message, question, ResolveReply(id=1, status="found",
                                                            names=["only.host.test", "bad..name", "x" * 70]))
    assert reply is not None and reply[:2] == message[:2] and reply[3] & 0x0F == 0
    assert records(reply, len(question.raw)) == [name("only.host.test")]  # the invalid names make no record
    nx = dns.host_answer(message, question, ResolveReply(id=1, status="nxdomain"))
    assert nx is not None and nx[3] & 0x0F == dns.RCODE_NXDOMAIN
    assert not dns.asks_host(dns.parse_question(query("example.test", dns.TYPE_PTR)))  # not a reverse name
