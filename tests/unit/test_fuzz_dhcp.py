"""Fuzzing the DHCP client's reply parsing with its invariants: any bytes give a reply or None, never an
exception, in work linear in the packet; any options give a lease whose numbers are sane and whose timing
cannot make the renewal loop spin; junk on the renewal socket never raises and never counts as an answer."""

from __future__ import annotations

import asyncio
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from boxpark.guest import dhcp
from tests.unit.test_dhcp import MAC
from tests.unit.test_fuzz_dns import lines_run

XID = 0x1234ABCD


def reply_header(xid: int = XID, yiaddr: bytes = b"\x0a\x00\x02\x0f") -> bytes:
    return struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 2, 1, 6, 0, xid, 0, 0, b"\0" * 4, yiaddr, b"\0" * 4,
                       b"\0" * 4, MAC.ljust(16, b"\0"), b"", b"") + dhcp.MAGIC


options = st.lists(st.one_of(
    st.tuples(st.sampled_from([1, 3, 6, 51, 53, 54, 58, 59]), st.binary(max_size=12)).map(
        lambda t: bytes([t[0], len(t[1])]) + t[1]),  # the options the client reads, any length
    st.tuples(st.integers(1, 254), st.integers(0, 255), st.binary(max_size=8)).map(
        lambda t: bytes([t[0], t[1]]) + t[2]),  # a length that lies
    st.sampled_from([b"\0", b"\xff", b"\x35"])), max_size=16)


def check(packet: bytes, xid: int = XID) -> None:
    reply, lines = lines_run(dhcp.parse, packet, xid)
    assert lines <= 10 * len(packet) + 40
    if reply is None:
        return
    kind, address, parsed = reply
    assert 0 <= kind <= 255 and socket.inet_aton(address)
    lease = dhcp.lease_from(address, parsed)
    assert 0 <= lease.prefix <= 32 and all(socket.inet_aton(server) for server in lease.dns)
    assert 0 <= lease.lease_time <= dhcp.INFINITE
    dhcp.usable(lease)
    times = dhcp.timers(lease)
    if times is not None:
        assert 0 < times[0] <= times[1] <= times[2]
        for age in (0.0, times[0], times[1], times[2] - 1e-3, times[2]):
            phase, wait = dhcp.next_step(times, age)
            assert wait > 0 or phase == dhcp.EXPIRED


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_give_a_reply_or_none(packet: bytes) -> None:
    check(packet)
    check(packet, struct.unpack_from("!I", packet, 4)[0] if len(packet) >= 8 else XID)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=4, max_size=4), options, st.binary(max_size=8))
def test_well_formed_headers_with_any_options(yiaddr: bytes, parts: list[bytes], tail: bytes) -> None:
    check(reply_header(yiaddr=yiaddr) + b"".join(parts) + tail)


def test_the_longest_packet_is_one_pass() -> None:
    packet = reply_header() + b"\0" * 65000  # pad options, one byte each
    _, lines = lines_run(dhcp.parse, packet, XID)
    assert lines <= 10 * len(packet)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=400), st.tuples(st.integers(0, 6), options).map(
    lambda t: reply_header() + bytes([53, 1, t[0]]) + b"".join(t[1]))))
def test_junk_on_the_renewal_socket_never_raises(packet: bytes) -> None:
    async def feed() -> None:
        async def never(old: dhcp.Lease | None, new: dhcp.Lease | None) -> None:
            raise AssertionError("no change without a run")

        renewer = dhcp.Renewer("eth0", MAC, dhcp.Lease("10.0.2.15", 24, "10.0.2.2", lease_time=60), never)
        waiting = asyncio.get_running_loop().create_future()
        renewer._waiting = (XID, (dhcp.ACK, dhcp.NAK), waiting)
        renewer._received(packet, ("10.0.2.2", 67))
        parsed = dhcp.parse(packet, XID)
        assert waiting.done() == (parsed is not None and parsed[0] in (dhcp.ACK, dhcp.NAK))

    asyncio.run(feed())
