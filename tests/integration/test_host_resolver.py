"""Names through the host: the real forwarder on loopback, the real Guest API server on a unix socket, and the
agent's `HostResolver` (host/resolver.py) holding the link, with a fake upstream this test runs on 127.0.0.1.

The agent's resolver reads a hosts file written here and says `failed` for anything else (no name leaves the
machine), so "ordinary" names go on to the fake upstream as they would to the network's resolvers. A slow,
silent or vanished host must never hold a query past the host deadline: it falls back to the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from boxpark import protocol
from boxpark.guest import dns
from boxpark.guest.server import GuestServer
from boxpark.host.client import GuestClient
from boxpark.host.resolver import HostResolver, HostsFile, reverse_address
from boxpark.transport import Channel, parse_address
from tests.integration.test_dns_forwarder import ANSWER, FakeUpstream, ask_tcp, ask_udp, rcode, run
from tests.unit.test_dns import name, query, records

pytestmark = pytest.mark.integration

ONLY_HOST = "192.0.2.99"


def hosts_only(name: str, qtype: int, hosts: HostsFile | None) -> protocol.ResolveReply:
    """The agent's resolver, reading the test's hosts file only: anything else `failed` (goes upstream)."""
    assert hosts is not None
    if qtype == dns.TYPE_PTR:
        address = reverse_address(name)
        listed_name = hosts.reverse(address) if address else None
        if listed_name is None:
            return protocol.ResolveReply(id=0, status="failed")
        return protocol.ResolveReply(id=0, status="found", names=[listed_name])
    listed = hosts.lookup(name)
    if listed is None:
        return protocol.ResolveReply(id=0, status="failed")
    family = 4 if qtype == dns.TYPE_A else 6
    return protocol.ResolveReply(id=0, status="found", addresses=[a for a in listed if (":" in a) == (family == 6)])


@contextlib.asynccontextmanager
async def machine(tmp: str, resolve: Callable[..., protocol.ResolveReply] = hosts_only,
                  agent: bool = True, **forwarder: object) -> AsyncIterator[tuple[dns.Forwarder, FakeUpstream]]:
    """The guest's API server and forwarder, a fake upstream, and (with `agent`) the agent's resolver task."""
    hosts = Path(tmp) / "hosts"
    hosts.write_text(f"{ONLY_HOST} only.host.test\n")
    server = GuestServer(pid1=False)
    address = f"unix:{tmp}/api.sock"
    await server.listen(parse_address(address))
    upstream = FakeUpstream()
    await upstream.start()
    fwd = dns.Forwarder("127.0.0.1", ["127.0.0.1"], "10.0.2.2", port=0, upstream_port=upstream.port,
                        **forwarder)  # type: ignore[arg-type]
    await fwd.start()
    task = None
    if agent:
        async def open_link() -> Channel:
            async with await GuestClient.open(address) as client:
                return await client.host_resolver()

        task = asyncio.ensure_future(HostResolver(open_link, str(hosts), resolve=resolve).run())
        await until(lambda: dns.LINK.up)
    try:
        yield fwd, upstream
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        fwd.close()
        upstream.close()
        await server.close()
        await until(lambda: not dns.LINK.up)


async def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout)


@run
async def test_a_name_only_the_host_knows_resolves_and_ordinary_names_still_do(short_tmp: str) -> None:
    async with machine(short_tmp) as (fwd, upstream):
        reply = await ask_udp(fwd.port, query("Only.Host.Test", dns.TYPE_A, ident=11))
        assert dns.message_id(reply) == 11 and rcode(reply) == 0
        asked = dns.parse_question(reply)
        assert asked is not None and records(reply, len(asked.raw)) == [socket.inet_aton(ONLY_HOST)]
        tcp = await ask_tcp(fwd.port, query("only.host.test", ident=12))
        assert dns.message_id(tcp) == 12 and tcp.endswith(socket.inet_aton(ONLY_HOST))
        aaaa = await ask_udp(fwd.port, query("only.host.test", dns.TYPE_AAAA))
        assert rcode(aaaa) == 0 and aaaa[7] == 0  # found, no IPv6 address: no data
        ptr = await ask_udp(fwd.port, query("99.2.0.192.in-addr.arpa", dns.TYPE_PTR))
        asked = dns.parse_question(ptr)
        assert asked is not None and records(ptr, len(asked.raw)) == [name("only.host.test")]
        assert upstream.seen == []  # the host answered all of them
        # a name the host cannot resolve, an MX question, and the host's own name
        other = await ask_udp(fwd.port, query("example.test", ident=13))
        assert dns.message_id(other) == 13 and other.endswith(socket.inet_aton(ANSWER))
        await ask_udp(fwd.port, query("only.host.test", 15))
        local = await ask_udp(fwd.port, query("host.boxpark.internal"))
        assert local.endswith(socket.inet_aton("10.0.2.2"))
        assert [name for _, name in upstream.seen] == ["example.test", "only.host.test"]


@run
async def test_a_slow_host_falls_back_to_the_network_within_its_deadline(short_tmp: str) -> None:
    release = threading.Event()

    def stuck(name: str, qtype: int, hosts: HostsFile | None) -> protocol.ResolveReply:
        release.wait(120)  # a host resolver hung (a dead VPN's DNS): released at the end of the test
        return hosts_only(name, qtype, hosts)

    try:
        async with machine(short_tmp, stuck, host_timeout=0.5) as (fwd, upstream):
            reply = await ask_udp(fwd.port, query("example.test", ident=21))
            assert dns.message_id(reply) == 21 and reply.endswith(socket.inet_aton(ANSWER))
            tcp = await ask_tcp(fwd.port, query("example.test", ident=22))
            assert dns.message_id(tcp) == 22 and tcp.endswith(socket.inet_aton(ANSWER))
            assert [name for _, name in upstream.seen] == ["example.test"] * 2
            assert not dns.LINK.pending and not fwd._asking
    finally:
        release.set()


@run
async def test_a_silent_or_vanished_host_never_holds_queries_and_what_waits_is_bounded(short_tmp: str) -> None:
    async with machine(short_tmp, agent=False, host_timeout=30.0) as (fwd, upstream):
        # no link: straight to the network
        reply = await ask_udp(fwd.port, query("example.test", ident=31))
        assert reply.endswith(socket.inet_aton(ANSWER)) and not dns.LINK.pending
        # an agent that opened the link and never answers: the host deadline is long, so what comes back
        # first comes from the bound (two wait for the host; the third goes upstream at once)
        async with await GuestClient.open(f"unix:{short_tmp}/api.sock") as client:
            silent = await client.host_resolver()
        await until(lambda: dns.LINK.up)
        dns.LINK.max_pending = 2
        try:
            waiting = [asyncio.ensure_future(ask_udp(fwd.port, query("example.test", ident=i))) for i in (32, 33)]
            await until(lambda: len(dns.LINK.pending) == 2)
            third = await ask_udp(fwd.port, query("example.test", ident=34))
            assert dns.message_id(third) == 34 and third.endswith(socket.inet_aton(ANSWER))
            assert not any(w.done() for w in waiting) and len(fwd._asking) == 2
            # the agent goes away: those waiting go upstream at once, not after the deadline
            silent.close()
            for reply in await asyncio.gather(*waiting):
                assert reply.endswith(socket.inet_aton(ANSWER))
            await until(lambda: not dns.LINK.up)
            assert not dns.LINK.pending and not fwd._asking
        finally:
            dns.LINK.max_pending = dns.MAX_HOST_PENDING


@run
async def test_the_agent_opens_the_link_again_after_it_drops(short_tmp: str) -> None:
    async with machine(short_tmp) as (fwd, upstream):
        first = dns.LINK.channel
        assert first is not None
        first.close()  # the guest's side ends (e.g. the connection was lost)
        await until(lambda: dns.LINK.channel is not None and dns.LINK.channel is not first)
        reply = await ask_udp(fwd.port, query("only.host.test"))
        assert reply.endswith(socket.inet_aton(ONLY_HOST))
