"""Fuzzing the DNS forwarder's parsing with its invariants: any bytes give a question or None, never an
exception; no compression pointer is followed (so none can loop); the work is linear in the message; and
the forwarder's datagram handlers, fed junk from a client or its upstream, never raise and never grow the
pending table past its bound."""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from typing import Any, Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boxpark.guest import dns


def lines_run(function: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    """`function(*args)` and the number of its own lines that ran: work counted, not timed."""
    count = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if frame.f_code is function.__code__:
            if event == "line":
                count += 1
            return tracer
        return None

    sys.settrace(tracer)
    try:
        result = function(*args)
    finally:
        sys.settrace(None)
    return result, count


def header(qdcount: int = 1, ident: int = 0x4242, flags: int = 0x0100) -> bytes:
    return struct.pack(">HHHHHH", ident, flags, qdcount, 0, 0, 0)


labels = st.lists(st.one_of(
    st.binary(min_size=1, max_size=63).map(lambda b: bytes([len(b)]) + b),  # a label
    st.integers(0, 0x3FFF).map(lambda offset: struct.pack(">H", 0xC000 | offset)),  # a compression pointer
    st.integers(0x40, 0xBF).map(lambda kind: bytes([kind])),  # a reserved label type
    st.just(b"\0")), max_size=12)


def check_question(message: bytes) -> None:
    question, lines = lines_run(dns.parse_question, message)
    assert lines <= 12 * min(len(message), 300) + 40  # one pass over at most a 255-byte name
    if question is not None:
        assert isinstance(question, dns.Question)
        assert message[12:12 + len(question.raw)] == question.raw
        assert len(question.name) <= 255 and 0 <= question.qtype <= 0xFFFF and 0 <= question.qclass <= 0xFFFF


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_give_a_question_or_none(message: bytes) -> None:
    check_question(message)


@settings(max_examples=500, deadline=None)
@given(labels, st.binary(max_size=6), st.integers(0, 3))
def test_names_of_labels_pointers_and_junk(parts: list[bytes], tail: bytes, qdcount: int) -> None:
    message = header(qdcount) + b"".join(parts) + tail
    check_question(message)
    if any(part[0] & 0xC0 for part in parts):
        first = message[12:]
        at = 0
        while at < len(first) and first[at] and not first[at] & 0xC0:
            at += 1 + first[at]
        if at < len(first) and first[at] & 0xC0:  # the name reaches a pointer or reserved type: refused
            assert dns.parse_question(message) is None


def test_compression_pointer_loops_are_refused_without_following() -> None:
    to_itself = header() + struct.pack(">H", 0xC00C) + b"\0\1\0\1"
    to_each_other = header() + b"\x01a" + struct.pack(">H", 0xC00E) + struct.pack(">H", 0xC00C) + b"\0\1\0\1"
    for message in (to_itself, to_each_other):
        question, lines = lines_run(dns.parse_question, message)
        assert question is None and lines < 60


def test_the_longest_message_is_one_bounded_pass() -> None:
    message = header() + b"\x01a" * 32767 + b"\0\0\1\0\1"  # 64 KiB of one-letter labels
    question, lines = lines_run(dns.parse_question, message)
    assert question is None and lines < 12 * 300  # the 255-byte name limit stops it early


class Rig:
    """A real Forwarder on loopback with a silent upstream; its client replies land in `sink`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.silent.bind(("127.0.0.1", 0))
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind(("127.0.0.1", 0))
        self.sink.setblocking(False)
        self.forwarder = dns.Forwarder("127.0.0.1", ["127.0.0.1"], "10.0.2.2", port=0,
                                       upstream_port=self.silent.getsockname()[1], timeout=3600.0, max_pending=8)
        self.loop.run_until_complete(self.forwarder.start())

    def run(self, call: Callable[[], None]) -> list[bytes]:
        """`call()` on the running loop; what the client got back."""
        async def go() -> None:
            call()
            await asyncio.sleep(0)

        self.loop.run_until_complete(go())
        replies = []
        while True:
            try:
                replies.append(self.sink.recv(65536))
            except BlockingIOError:
                return replies

    def close(self) -> None:
        self.forwarder.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        self.silent.close()
        self.sink.close()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


queries = st.one_of(st.binary(max_size=300),
                    st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 3), labels,
                              st.binary(max_size=6)).map(
                        lambda t: header(t[2], t[0], t[1] & 0x87FF) + b"".join(t[3]) + t[4]))


@settings(max_examples=400, deadline=None)
@given(queries)
def test_junk_from_a_client_is_answered_or_dropped_never_raised(rig: Rig, data: bytes) -> None:
    sink = rig.sink.getsockname()
    before = len(rig.forwarder.pending)
    replies = rig.run(lambda: rig.forwarder._from_client(data, sink))
    assert len(rig.forwarder.pending) <= rig.forwarder.max_pending
    if not dns.is_query(data):
        assert replies == [] and len(rig.forwarder.pending) == before  # no answer to junk: no loops
    else:
        assert len(replies) + len(rig.forwarder.pending) - before == 1  # answered now, or asked upstream
        for reply in replies:
            assert reply[:2] == data[:2] and reply[2] & 0x80  # a reply, under the client's id


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_junk_from_the_upstream_is_relayed_or_dropped_never_raised(rig: Rig, data: bytes, known: bool) -> None:
    sink = rig.sink.getsockname()
    if known and rig.forwarder.pending:  # under an id the forwarder is waiting on
        data = struct.pack(">H", next(iter(rig.forwarder.pending))) + data[2:]
    before = len(rig.forwarder.pending)
    replies = rig.run(lambda: rig.forwarder._from_upstream(data, rig.silent.getsockname()))
    assert len(replies) == before - len(rig.forwarder.pending)  # relayed exactly when it matched
    if not replies:  # keep the table stocked for the next examples
        rig.run(lambda: rig.forwarder._from_client(header(1, 7) + b"\x01x\x04test\0\0\1\0\1", sink))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([dns.TYPE_A, dns.TYPE_AAAA]), st.binary(min_size=1, max_size=63),
       st.sampled_from(["found", "nxdomain", "nodata", "failed"]),
       st.lists(st.one_of(st.ip_addresses().map(str), st.text(max_size=40)), max_size=80))
def test_any_host_reply_makes_a_well_formed_reply_that_fits_udp(qtype: int, label: bytes, status: str,
                                                                   addresses: list[str]) -> None:
    from boxpark.protocol import ResolveReply

    message = header() + bytes([len(label)]) + label + b"\0" + struct.pack(">HH", qtype, 1)
    question = dns.parse_question(message)
    assert question is not None
    host = ResolveReply(id=1, status=status, addresses=addresses)  # type: ignore[arg-type]
    reply = dns.host_answer(message, question, host)
    if status == "failed":
        assert reply is None
        return
    assert reply is not None and len(reply) <= 512 and reply[:2] == message[:2]
    echoed = dns.parse_question(reply)
    assert echoed is not None and echoed.raw == question.raw
