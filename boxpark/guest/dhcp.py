"""A small DHCPv4 client for eth0: the lease at boot (DISCOVER, OFFER, REQUEST, ACK), then kept for as long
as the machine runs (RFC 2131 §4.4.5).

At boot `request()` runs before the event loop exists and may wait (bounded) for its answer. It asks for
broadcast replies (the interface has no address yet), so a plain UDP socket bound to the interface
receives them. Only what the machine needs: address, prefix, router, DNS servers, lease time, T1, T2.

Afterwards `Renewer` keeps the lease on PID 1's event loop: at T1 it asks the server that granted the lease
(unicast), at T2 any server (broadcast), and when the lease ends it forgets the address and discovers a new
one; a new address, router or DNS list is handed to its `on_change`. It must never block or spin: one
non-blocking socket, asyncio timers, and waits that `next_step` (a pure function of the lease's age) keeps
at least a minute apart for any lease longer than a few minutes. Ages are measured on CLOCK_BOOTTIME, not
the wall clock: VZ gives the guest no RTC, so its wall clock jumps by decades when the host sets it.

The boot path: stdlib only, nothing slow to import (no dataclasses: 15 ms; asyncio, which the init runs on
right after the network step, is no extra cost).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import struct
import time
from typing import Awaitable, Callable

log = logging.getLogger("boxpark.init")

MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK = 1, 2, 3, 4, 5, 6
SERVER_PORT, CLIENT_PORT = 67, 68
INFINITE = 0xFFFFFFFF  # a lease time that never ends (RFC 2131 §3.3)

BOUND, RENEWING, REBINDING, EXPIRED = "bound", "renewing", "rebinding", "expired"
MIN_RETRY = 60.0  # s between REQUESTs while renewing or rebinding (RFC 2131 §4.4.5), unless less time is left
RECHECK = 300.0  # s: the longest wait for a reply, and a BOUND sleep's cap unless an eighth of it is more (`nap`)
DISCOVER_FIRST, DISCOVER_LAST = 4.0, 64.0  # s between DISCOVERs nobody answers (RFC 2131 §4.1), ±1 s
REQUEST_WAIT = 4.0  # s for the ACK of a REQUEST after an OFFER


class DhcpError(Exception):
    """No usable lease: the message says what was tried."""


class Lease:
    """What a server granted; `granted` is when the REQUEST it answered was sent (`lease_clock()`)."""

    __slots__ = ("address", "prefix", "router", "dns", "server", "lease_time", "renew_time", "rebind_time",
                 "granted")

    def __init__(self, address: str, prefix: int, router: str, dns: list[str] | None = None, server: str = "",
                 lease_time: int = 0, renew_time: int = 0, rebind_time: int = 0, granted: float = 0.0) -> None:
        self.address = address
        self.prefix = prefix
        self.router = router
        self.dns = dns or []
        self.server = server
        self.lease_time = lease_time  # s; 0 = the server named none
        self.renew_time = renew_time  # T1 (option 58), 0 = the default
        self.rebind_time = rebind_time  # T2 (option 59), 0 = the default
        self.granted = granted

    def network(self) -> tuple[str, int, str, list[str]]:
        """What the machine's configuration depends on: a change here must be applied."""
        return self.address, self.prefix, self.router, self.dns

    def __repr__(self) -> str:
        return (f"Lease({self.address}/{self.prefix} via {self.router or '-'}, dns {','.join(self.dns) or '-'}, "
                f"from {self.server or '-'}, {self.lease_time} s)")


def nap(wait: float) -> float:
    """How long to sleep of `wait` (s, on the lease's clock) before looking again: the loop's clock stops
    while a guest is suspended and the lease's does not, so no sleep is longer than RECHECK or an eighth
    of `wait`, whichever is longer: the wake-up is at most that late after a resume (for a day's lease,
    T1 noticed at most 1.5 h late, still long before T2), and an idle guest wakes ~30 times in the 12 h
    to T1 instead of every 5 minutes (issue 12: each wake-up of the idle init costs it CPU)."""
    return min(wait, max(RECHECK, wait / 8))


def lease_clock() -> float:
    """Seconds on the clock lease ages are measured on: it counts a suspended guest, never jumps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


# ------------------------------------------------------------------------------------------ packets


def build(kind: int, xid: int, mac: bytes, options: dict[int, bytes] | None = None, ciaddr: str = "",
          broadcast: bool = True) -> bytes:
    """A BOOTREQUEST packet of the given DHCP message type.

    `ciaddr` is the client's address while it renews or rebinds (then the server answers it by unicast);
    `broadcast` asks for broadcast replies, for a client that has no address yet.
    """
    header = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000 if broadcast else 0,
                         socket.inet_aton(ciaddr) if ciaddr else b"\0" * 4, b"\0" * 4, b"\0" * 4, b"\0" * 4,
                         mac.ljust(16, b"\0"), b"", b"")
    body = bytearray(MAGIC)
    body += bytes([53, 1, kind])
    body += bytes([55, 6, 1, 3, 6, 51, 58, 59])  # ask for: subnet mask, router, DNS, lease time, T1, T2
    for code, value in (options or {}).items():
        body += bytes([code, len(value)]) + value
    body += b"\xff"
    return header + bytes(body)


def parse(packet: bytes, xid: int) -> tuple[int, str, dict[int, bytes]] | None:
    """(message type, offered address, options) of a reply to `xid`, or None if it is not one.

    Never raises, whatever the bytes: each step of the option loop moves forward by at least one byte.
    """
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
    kind = (options.get(53) or b"\0")[0]
    return kind, yiaddr, options


def _address(value: bytes | None) -> str:
    return socket.inet_ntoa(value[:4]) if value is not None and len(value) >= 4 else ""


def _seconds(value: bytes | None) -> int:
    return struct.unpack("!I", value[:4])[0] if value is not None and len(value) >= 4 else 0


def lease_from(address: str, options: dict[int, bytes], granted: float = 0.0) -> Lease:
    """The lease an ACK describes (never raises: a mask that is not 4 bytes counts as /24)."""
    mask = options.get(1)
    bits = int.from_bytes(mask, "big") if mask is not None and len(mask) == 4 else 0xFFFFFF00
    prefix = 32 - ((~bits & 0xFFFFFFFF).bit_length())  # the leading ones (a non-contiguous mask: its head)
    dns_bytes = options.get(6) or b""
    dns = [socket.inet_ntoa(dns_bytes[i:i + 4]) for i in range(0, len(dns_bytes) // 4 * 4, 4)]
    return Lease(address, prefix, _address(options.get(3)), dns, _address(options.get(54)),
                 _seconds(options.get(51)), _seconds(options.get(58)), _seconds(options.get(59)), granted)


def usable(lease: Lease) -> bool:
    """An address a host can take: not 0.0.0.0, multicast, broadcast or loopback, with a prefix below 32."""
    first = int(lease.address.split(".")[0]) if lease.address else 0
    return lease.address not in ("", "0.0.0.0", "255.255.255.255") and first != 127 and first < 224 \
        and 0 < lease.prefix < 32


# -------------------------------------------------------------------------------------- the timing


def timers(lease: Lease) -> tuple[float, float, float] | None:
    """(T1, T2, end) in seconds after the lease was granted; None for a lease that never ends.

    T1 and T2 are the server's when they make sense (T1 ≤ T2 < end), else RFC 2131's 0.5 and 0.875 of it.
    A lease without a lease time is treated as never ending: there is nothing to renew by.
    """
    if lease.lease_time in (0, INFINITE):
        return None
    end = float(lease.lease_time)
    t2 = float(lease.rebind_time) if 0 < lease.rebind_time < end else 0.875 * end
    t1 = float(lease.renew_time) if 0 < lease.renew_time <= t2 else min(0.5 * end, t2)
    return t1, t2, end


def next_step(times: tuple[float, float, float], age: float) -> tuple[str, float]:
    """The phase of a lease `age` seconds old and how long to wait before acting again.

    BOUND: sleep until T1. RENEWING/REBINDING: send a REQUEST now, then wait for its answer half the time
    left until T2 (or the end), down to MIN_RETRY (RFC 2131 §4.4.5); when half of it would be less, all of
    it, so no REQUEST goes out in the last moments of a phase. EXPIRED: the lease is gone. Every wait is
    positive, and after the first one at least MIN_RETRY or a whole phase: the loop cannot spin.
    """
    t1, t2, end = times
    if age < t1:
        return BOUND, t1 - age
    if age < t2:
        return RENEWING, _retry(t2 - age)
    if age < end:
        return REBINDING, _retry(end - age)
    return EXPIRED, 0.0


def _retry(left: float) -> float:
    return left / 2 if left >= 2 * MIN_RETRY else left


def discover_wait(attempt: int, jitter: float) -> float:
    """The wait after the `attempt`th unanswered DISCOVER (0 first): 4, 8, … 64 s, plus `jitter` ∈ [-1, 1]."""
    return min(DISCOVER_FIRST * 2 ** min(attempt, 8), DISCOVER_LAST) + max(-1.0, min(1.0, jitter))


def _jitter() -> float:
    return int.from_bytes(os.urandom(2), "big") / 32767.5 - 1.0


def _xid() -> int:
    return int.from_bytes(os.urandom(4), "big")


# ------------------------------------------------------------------------------------------ at boot


def request(interface: str, mac: bytes, timeout: float = 10.0) -> Lease:
    """Get a lease on `interface` (up, no address yet) within `timeout` seconds (at boot, before the loop)."""
    sock = _socket(interface)
    try:
        xid = _xid()
        deadline = time.monotonic() + timeout
        wait = 0.25
        offer: tuple[str, dict[int, bytes]] | None = None
        sent = 0.0
        while time.monotonic() < deadline:
            if offer is None:
                packet = build(DISCOVER, xid, mac)
            else:
                address, options = offer
                packet = build(REQUEST, xid, mac, {50: socket.inet_aton(address), 54: options.get(54, b"")})
                sent = lease_clock()
            sock.sendto(packet, ("255.255.255.255", SERVER_PORT))
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
                    return lease_from(address, options, sent)
                if offer is not None and kind == NAK:
                    offer = None
                    break
            else:
                wait = min(wait * 2, 2.0)
        raise DhcpError(f"no DHCP lease on {interface} within {timeout:.0f} s "
                        f"({'no offer' if offer is None else 'offer not acknowledged'})")
    finally:
        sock.close()


def _socket(interface: str) -> socket.socket:
    """UDP port 68 on `interface` only, able to broadcast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("0.0.0.0", CLIENT_PORT))
    except OSError:
        sock.close()
        raise
    return sock


# ------------------------------------------------------------------------------- for as long as it runs


Change = Callable[["Lease | None", "Lease | None"], Awaitable[None]]


class Renewer:
    """Keeps `lease` on `interface` for as long as `run()` runs (a task on PID 1's loop).

    `on_change(old, new)` hears of every lease whose network differs from the one before: `new` is None
    when a lease ended or a server refused it (the address must go), `old` is None when a new one came
    after that. `clock` (seconds, `lease_clock` by default) is what lease ages are measured on.
    """

    def __init__(self, interface: str, mac: bytes, lease: Lease, on_change: Change,
                 clock: Callable[[], float] = lease_clock) -> None:
        self.interface = interface
        self.mac = mac
        self.lease: Lease | None = lease
        self.on_change = on_change
        self.clock = clock
        self.renewals = 0  # ACKs that extended a lease (renewing or rebinding)
        self._transport: asyncio.DatagramTransport | None = None
        self._waiting: tuple[int, tuple[int, ...], asyncio.Future[tuple[int, str, dict[int, bytes]]]] | None = None

    async def run(self) -> None:
        """Forever (until cancelled); returns at once for a lease that never ends."""
        if self.lease is not None and timers(self.lease) is None:
            log.info("dhcp: the lease on %s never ends: nothing to renew", self.interface)
            return
        loop = asyncio.get_running_loop()
        sock = _socket(self.interface)
        sock.setblocking(False)
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _Replies(self._received), sock=sock)
        try:
            while True:
                if self.lease is None:
                    await self._discover()
                else:
                    await self._keep()
        finally:
            self._transport.close()

    async def _keep(self) -> None:
        """One step of BOUND, RENEWING or REBINDING (or the end of the lease)."""
        lease = self.lease
        assert lease is not None
        times = timers(lease)
        if times is None:  # a renewal made it endless
            await asyncio.Event().wait()
            return
        phase, wait = next_step(times, self.clock() - lease.granted)
        if phase == BOUND:
            await asyncio.sleep(nap(wait))
            return
        if phase == EXPIRED:
            log.warning("dhcp: the lease of %s on %s ended unrenewed: looking for a new one", lease.address,
                        self.interface)
            self.lease = None
            await self._changed(lease, None)
            return
        xid = _xid()
        sent = self.clock()
        packet = build(REQUEST, xid, self.mac, ciaddr=lease.address, broadcast=False)
        self._send(packet, lease.server if phase == RENEWING and lease.server else "255.255.255.255")
        reply = await self._reply(xid, (ACK, NAK), min(wait, RECHECK))
        if reply is None:
            log.debug("dhcp: no answer %s %s", phase, lease.address)
            return
        kind, address, options = reply
        new = lease_from(address, options, sent)
        if kind == NAK or not usable(new):
            log.warning("dhcp: the server refused to extend the lease of %s (%s): looking for a new one",
                        lease.address, phase)
            self.lease = None
            await self._changed(lease, None)
            return
        new.server = new.server or lease.server
        self.lease = new
        self.renewals += 1
        log.debug("dhcp: lease renewed (%s): %r", phase, new)
        if new.network() != lease.network():
            await self._changed(lease, new)

    async def _discover(self) -> None:
        """INIT: one DISCOVER → OFFER → REQUEST → ACK exchange, retried with backoff until one succeeds."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while self.lease is None:
            until = loop.time() + discover_wait(attempt, _jitter())
            xid = _xid()
            self._send(build(DISCOVER, xid, self.mac), "255.255.255.255")
            offer = await self._reply(xid, (OFFER,), until - loop.time())
            if offer is not None and usable(lease_from(offer[1], offer[2])):
                _, address, options = offer
                sent = self.clock()
                self._send(build(REQUEST, xid, self.mac, {50: socket.inet_aton(address), 54: options.get(54, b"")}),
                           "255.255.255.255")
                reply = await self._reply(xid, (ACK, NAK), REQUEST_WAIT)
                if reply is not None and reply[0] == ACK:
                    new = lease_from(reply[1], reply[2], sent)
                    if usable(new):
                        self.lease = new
                        log.info("dhcp: new lease on %s: %r", self.interface, new)
                        await self._changed(None, new)
                        return
            attempt += 1
            await asyncio.sleep(max(0.0, until - loop.time()))

    async def _changed(self, old: Lease | None, new: Lease | None) -> None:
        try:
            await self.on_change(old, new)
        except Exception as exc:  # the renewals go on: the next change may apply
            log.error("dhcp: applying %r failed: %s: %s", new, type(exc).__name__, exc)

    def _send(self, packet: bytes, to: str) -> None:
        assert self._transport is not None
        self._transport.sendto(packet, (to, SERVER_PORT))

    async def _reply(self, xid: int, kinds: tuple[int, ...],
                     timeout: float) -> tuple[int, str, dict[int, bytes]] | None:
        """The first reply to `xid` of one of `kinds` within `timeout` seconds, else None."""
        future: asyncio.Future[tuple[int, str, dict[int, bytes]]] = asyncio.get_running_loop().create_future()
        self._waiting = (xid, kinds, future)
        try:
            return await asyncio.wait_for(future, max(timeout, 0.0))
        except asyncio.TimeoutError:
            return None
        finally:
            self._waiting = None

    def _received(self, data: bytes, source: tuple[str, int]) -> None:
        if self._waiting is None:
            return
        xid, kinds, future = self._waiting
        reply = parse(data, xid)
        if reply is not None and reply[0] in kinds and not future.done():
            future.set_result(reply)


class _Replies(asyncio.DatagramProtocol):
    def __init__(self, received: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.datagram_received = received  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:  # an ICMP unreachable from a unicast REQUEST
        log.debug("dhcp socket: %s", exc)
