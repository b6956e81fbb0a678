"""The DHCP client's packets: what it sends is a valid BOOTREQUEST; what it parses from a reply is right."""

from __future__ import annotations

import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_renew_and_rebind_requests_carry_the_address_and_ask_for_unicast() -> None:
    packet = dhcp.build(dhcp.REQUEST, 9, MAC, ciaddr="10.0.2.15", broadcast=False)
    assert packet[12:16] == socket.inet_aton("10.0.2.15")  # ciaddr: the server answers it directly
    assert struct.unpack_from("!H", packet, 10)[0] == 0
    assert bytes([50, 4]) not in packet[240:] and bytes([54, 4]) not in packet[240:]  # RFC 2131 §4.3.2: neither
    assert bytes([55, 6, 1, 3, 6, 51, 58, 59]) in packet  # T1 and T2 asked for


def test_lease_from_reads_t1_t2_and_keeps_the_prefix_sane() -> None:
    lease = dhcp.lease_from("10.0.2.15", {51: struct.pack("!I", 3600), 58: struct.pack("!I", 1000),
                                          59: struct.pack("!I", 2000), 1: socket.inet_aton("255.255.0.0")}, 7.5)
    assert (lease.lease_time, lease.renew_time, lease.rebind_time, lease.prefix, lease.granted) == (
        3600, 1000, 2000, 16, 7.5)
    assert dhcp.lease_from("10.0.2.15", {1: b"\xff" * 8}).prefix == 24  # not 4 bytes: the default
    assert dhcp.lease_from("10.0.2.15", {1: socket.inet_aton("255.0.255.0")}).prefix == 8  # its head


def test_usable_refuses_addresses_a_host_cannot_take() -> None:
    assert dhcp.usable(dhcp.Lease("10.0.2.15", 24, ""))
    for address, prefix in (("0.0.0.0", 24), ("127.0.0.1", 8), ("224.0.0.1", 24), ("255.255.255.255", 24),
                            ("10.0.2.15", 32), ("10.0.2.15", 0), ("", 24)):
        assert not dhcp.usable(dhcp.Lease(address, prefix, "")), address


def lease(seconds: int, t1: int = 0, t2: int = 0) -> dhcp.Lease:
    return dhcp.Lease("10.0.2.15", 24, "10.0.2.2", lease_time=seconds, renew_time=t1, rebind_time=t2)


def test_timers_default_to_half_and_seven_eighths() -> None:
    assert dhcp.timers(lease(86400)) == (43200.0, 75600.0, 86400.0)
    assert dhcp.timers(lease(3600, 600, 1800)) == (600.0, 1800.0, 3600.0)  # the server's, when they make sense
    assert dhcp.timers(lease(3600, 3000)) == (3000.0, 3150.0, 3600.0)
    assert dhcp.timers(lease(3600, 3500)) == (1800.0, 3150.0, 3600.0)  # T1 after T2: the default
    assert dhcp.timers(lease(3600, 0, 4000)) == (1800.0, 3150.0, 3600.0)  # T2 after the end: the default
    assert dhcp.timers(lease(0)) is None and dhcp.timers(lease(dhcp.INFINITE)) is None


def test_next_step_follows_the_phases_of_a_day_lease() -> None:
    times = (43200.0, 75600.0, 86400.0)
    assert dhcp.next_step(times, 0.0) == (dhcp.BOUND, 43200.0)
    assert dhcp.next_step(times, 43000.0) == (dhcp.BOUND, 200.0)
    assert dhcp.next_step(times, 43200.0) == (dhcp.RENEWING, 16200.0)  # half the way to T2
    assert dhcp.next_step(times, 75480.0) == (dhcp.RENEWING, 60.0)  # down to a minute
    assert dhcp.next_step(times, 75500.0) == (dhcp.RENEWING, 100.0)  # not less: then all that is left
    assert dhcp.next_step(times, 75600.0) == (dhcp.REBINDING, 5400.0)
    assert dhcp.next_step(times, 86400.0) == (dhcp.EXPIRED, 0.0)


def unanswered(times: tuple[float, float, float], age: float = 0.0) -> list[tuple[str, float]]:
    """The steps a client takes from `age` when no server ever answers, with an injected clock."""
    steps = []
    while True:
        phase, wait = dhcp.next_step(times, age)
        steps.append((phase, wait))
        if phase == dhcp.EXPIRED:
            return steps
        assert len(steps) < 200, steps
        age += wait


def test_an_unanswered_day_lease_sends_a_dozen_requests_at_least_a_minute_apart() -> None:
    steps = unanswered(dhcp.timers(lease(86400)))
    requests = [wait for phase, wait in steps if phase in (dhcp.RENEWING, dhcp.REBINDING)]
    assert 5 <= len(requests) <= 20, steps
    assert all(wait >= dhcp.MIN_RETRY for wait in requests), steps
    assert [phase for phase, _ in steps][0] == dhcp.BOUND and steps[-1][0] == dhcp.EXPIRED


def test_an_answered_day_lease_wakes_the_client_twice_a_day() -> None:
    times = dhcp.timers(lease(86400))
    assert times is not None
    now, granted, wakeups, renewals = 0.0, 0.0, 0, 0
    while now < 7 * 86400:
        phase, wait = dhcp.next_step(times, now - granted)
        wakeups += 1
        if phase == dhcp.BOUND:
            now += wait
        else:
            assert phase == dhcp.RENEWING
            granted = now  # the REQUEST sent now is ACKed 50 ms later: the lease starts again
            now += 0.05
            renewals += 1
    assert renewals == 13 and wakeups <= 2 * renewals + 1  # at 12 h, 24 h, … 156 h


@settings(max_examples=300, deadline=None)
@given(st.integers(1, dhcp.INFINITE - 1), st.integers(0, dhcp.INFINITE), st.integers(0, dhcp.INFINITE),
       st.floats(0, 2.0 ** 33))
def test_no_lease_makes_the_client_spin(seconds: int, t1: int, t2: int, age: float) -> None:
    times = dhcp.timers(lease(seconds, t1, t2))
    assert times is not None and 0 < times[0] <= times[1] <= times[2]
    steps = unanswered(times, age)  # ends, within 200 steps
    assert all(wait > 0 for _, wait in steps[:-1])
    lengths = {dhcp.RENEWING: times[1] - times[0], dhcp.REBINDING: times[2] - times[1]}
    for phase, wait in steps[1:-1]:  # the first step may start in a phase's last moment
        assert wait >= min(dhcp.MIN_RETRY, lengths[phase]), steps


def test_discover_backoff_doubles_to_a_minute_with_a_second_of_jitter() -> None:
    assert [dhcp.discover_wait(n, 0.0) for n in range(7)] == [4.0, 8.0, 16.0, 32.0, 64.0, 64.0, 64.0]
    assert dhcp.discover_wait(0, -5.0) == 3.0 and dhcp.discover_wait(10**6, 5.0) == 65.0


def test_a_bound_guest_naps_an_eighth_of_the_wait_but_at_most_recheck_below_that() -> None:
    assert dhcp.nap(200.0) == 200.0  # all of a short wait
    assert dhcp.nap(1000.0) == dhcp.RECHECK  # an eighth would be shorter: the cap
    assert dhcp.nap(43200.0) == 5400.0  # a day's lease to T1: an eighth, so about 30 wake-ups in those 12 h
    wait, naps = 43200.0, 0
    while wait > 0:
        wait -= dhcp.nap(wait)
        naps += 1
    assert naps < 40
