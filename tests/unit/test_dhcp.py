"""The DHCP client's packets: what it sends is a valid BOOTREQUEST; what it parses from a reply is right."""

from __future__ import annotations

import socket
import struct

from boxpark.guest import dhcp

MAC = bytes.fromhex("525400123456")


def reply(kind: int, xid: int, address: str, options: bytes) -> bytes:
    header = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 2, 1, 6, 0, xid, 0, 0, b"\0" * 4,
                         socket.inet_aton(address), b"\0" * 4, b"\0" * 4, MAC.ljust(16, b"\0"), b"", b"")
    return header + dhcp.MAGIC + bytes([53, 1, kind]) + options + b"\xff"


def test_request_packet_layout() -> None:
    packet = dhcp.build(dhcp.REQUEST, 0x1234, MAC, {50: socket.inet_aton("10.0.2.15")})
    assert packet[0] == 1 and packet[1] == 1 and packet[2] == 6
    assert struct.unpack_from("!I", packet, 4)[0] == 0x1234
    assert struct.unpack_from("!H", packet, 10)[0] == 0x8000  # broadcast replies, please
    assert packet[28:34] == MAC
    assert packet[236:240] == dhcp.MAGIC
    assert bytes([53, 1, dhcp.REQUEST]) in packet and bytes([50, 4]) + socket.inet_aton("10.0.2.15") in packet


def test_parse_ack_into_a_lease() -> None:
    options = (bytes([1, 4]) + socket.inet_aton("255.255.255.0") + bytes([3, 4]) + socket.inet_aton("10.0.2.2")
               + bytes([6, 8]) + socket.inet_aton("10.0.2.3") + socket.inet_aton("1.1.1.1")
               + bytes([51, 4]) + struct.pack("!I", 86400) + bytes([54, 4]) + socket.inet_aton("10.0.2.2"))
    kind, address, parsed = dhcp.parse(reply(dhcp.ACK, 7, "10.0.2.15", options), 7)
    assert kind == dhcp.ACK and address == "10.0.2.15"
    lease = dhcp.lease_from(address, parsed)
    assert (lease.prefix, lease.router, lease.dns, lease.lease_time, lease.server) == (
        24, "10.0.2.2", ["10.0.2.3", "1.1.1.1"], 86400, "10.0.2.2")


def test_parse_ignores_other_transactions_and_junk() -> None:
    assert dhcp.parse(reply(dhcp.ACK, 7, "10.0.2.15", b""), 8) is None
    assert dhcp.parse(b"\x02" * 100, 7) is None
    truncated = reply(dhcp.OFFER, 7, "10.0.2.15", bytes([3, 200, 1]))  # length runs past the end
    assert dhcp.parse(truncated, 7)[0] == dhcp.OFFER
