"""A small DHCPv4 client for eth0 at boot: DISCOVER, OFFER, REQUEST, ACK, with retries.

It asks for broadcast replies (the interface has no address yet), so a plain UDP socket bound to the
interface receives them. Only what the boot needs: address, prefix, router, DNS servers, lease time.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK = 1, 2, 3, 4, 5, 6


class DhcpError(Exception):
    """No usable lease: the message says what was tried."""


@dataclass
class Lease:
    address: str
    prefix: int
    router: str
    dns: list[str] = field(default_factory=list)
    server: str = ""
    lease_time: int = 0


def build(kind: int, xid: int, mac: bytes, options: dict[int, bytes] | None = None) -> bytes:
    """A BOOTREQUEST packet of the given DHCP message type, asking for broadcast replies."""
    header = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4, b"\0" * 4,
                         b"\0" * 4, b"\0" * 4, mac.ljust(16, b"\0"), b"", b"")
    body = bytearray(MAGIC)
    body += bytes([53, 1, kind])
    body += bytes([55, 4, 1, 3, 6, 51])  # ask for: subnet mask, router, DNS, lease time
    for code, value in (options or {}).items():
        body += bytes([code, len(value)]) + value
    body += b"\xff"
    return header + bytes(body)


def parse(packet: bytes, xid: int) -> tuple[int, str, dict[int, bytes]] | None:
    """(message type, offered address, options) of a reply to `xid`, or None if it is not one."""
    if len(packet) < 240 or packet[0] != 2 or packet[236:240] != MAGIC:
        return None
    if struct.unpack_from("!I", packet, 4)[0] != xid:
        return None
    yiaddr = socket.inet_ntoa(packet[16:20])
    options: dict[int, bytes] = {}
    i = 240
    while i < len(packet):
        code = packet[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(packet):
            break
        length = packet[i + 1]
        options[code] = packet[i + 2:i + 2 + length]
        i += 2 + length
    kind = options.get(53, b"\0")[0]
    return kind, yiaddr, options


def _lease(address: str, options: dict[int, bytes]) -> Lease:
    mask = options.get(1, b"\xff\xff\xff\x00")
    prefix = bin(int.from_bytes(mask, "big")).count("1")
    router = socket.inet_ntoa(options[3][:4]) if len(options.get(3, b"")) >= 4 else ""
    dns = [socket.inet_ntoa(options[6][i:i + 4]) for i in range(0, len(options.get(6, b"")) // 4 * 4, 4)]
    server = socket.inet_ntoa(options[54][:4]) if len(options.get(54, b"")) >= 4 else ""
    lease_time = struct.unpack("!I", options[51][:4])[0] if len(options.get(51, b"")) >= 4 else 0
    return Lease(address, prefix, router, dns, server, lease_time)


def request(interface: str, mac: bytes, timeout: float = 10.0) -> Lease:
    """Get a lease on `interface` (up, no address yet) within `timeout` seconds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("0.0.0.0", 68))
        xid = int.from_bytes(os.urandom(4), "big")
        deadline = time.monotonic() + timeout
        wait = 0.25
        offer: tuple[str, dict[int, bytes]] | None = None
        while time.monotonic() < deadline:
            if offer is None:
                packet = build(DISCOVER, xid, mac)
            else:
                address, options = offer
                packet = build(REQUEST, xid, mac, {50: socket.inet_aton(address), 54: options.get(54, b"")})
            sock.sendto(packet, ("255.255.255.255", 67))
            until = min(deadline, time.monotonic() + wait)
            while (left := until - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                reply = parse(sock.recv(4096), xid)
                if reply is None:
                    continue
                kind, address, options = reply
                if offer is None and kind == OFFER:
                    offer = (address, options)
                    break
                if offer is not None and kind == ACK:
                    return _lease(address, options)
                if offer is not None and kind == NAK:
                    offer = None
                    break
            else:
                wait = min(wait * 2, 2.0)
        raise DhcpError(f"no DHCP lease on {interface} within {timeout:.0f} s "
                        f"({'no offer' if offer is None else 'offer not acknowledged'})")
    finally:
        sock.close()
