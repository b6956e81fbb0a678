"""The guest's DHCP client against a real DHCP server (busybox udhcpd) with a 10-second lease.

Two private network namespaces joined by a veth pair that is created inside them (the host's own
interfaces are never touched): the server on one end, the client's real code (`network.configure`, then
the init's `keep_lease`) on the other, as eth0. The client runs in a private mount namespace with an overlay
over /etc, so its /etc/hosts and /etc/resolv.conf writes stay there. Each phase waits for a condition
with a generous deadline; nothing asserts on elapsed time.

The namespaces are held by processes, not named with `ip netns add`: slirp4netns --enable-sandbox (which
the sandbox backend runs) unmounts the host's /run/netns/* bind mounts, so a named namespace can vanish
while another sandbox machine starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pytest

from tests.nsfixture import namespace_argv, python_argv, requires_root, sh
from tests.unit.test_dns import query

pytestmark = [pytest.mark.integration, requires_root,
              pytest.mark.skipif(shutil.which("ip") is None or shutil.which("busybox") is None,
                                 reason="needs ip (iproute2) and busybox (its udhcpd)")]

LEASE = 10  # s: T1 at 5 s, T2 at 8.75 s
SERVER = "10.55.0.1"
MAC = "52:54:00:bb:00:01"
HOST_NAME = "host.boxpark.internal"
DEADLINE = 90.0  # s for each phase, under any load

# The init's own lease keeper (`init.keep_lease`: network.keep_lease, and the DNS forwarder moved with the
# address); each start of the forwarder is reported, so every change the init saw is on stdout.
CLIENT = """
import asyncio, json, logging
from boxpark.guest import init, network, settings
logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(message)s")
start_dns = init.start_dns
async def reporting_start_dns(net):
    print(json.dumps({"address": net.address, "gateway": net.gateway, "dns": net.dns}), flush=True)
    return await start_dns(net)
init.start_dns = reporting_start_dns
s = settings.Settings()
s.net = "dhcp"
net = network.configure(s)
async def main():
    forwarder = await init.start_dns(net)
    await init.keep_lease(net, forwarder)
asyncio.run(main())
"""


def udhcpd_config(tmp: str, router: str, dns: str, static: str = "") -> str:
    lines = ["start 10.55.0.100", "end 10.55.0.110", "interface eth1", f"lease_file {tmp}/leases",
             f"pidfile {tmp}/udhcpd.pid", "option subnet 255.255.255.0", f"option router {router}",
             f"option dns {dns}", f"option lease {LEASE}", "min_lease 1"]
    if static:
        lines.append(f"static_lease {MAC} {static}")
    return "\n".join(lines) + "\n"


def wait_for(condition: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Link:
    """A server namespace (eth1, 10.55.0.1/24) and a client namespace (eth0, no address), veth-joined."""

    tmp: str
    server_ns: int  # the pid of the process holding the namespace
    client_ns: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    server: subprocess.Popen[bytes] | None = None
    client: subprocess.Popen[bytes] | None = None

    def ip(self, ns: int, *args: str) -> str:
        return sh(["nsenter", f"--net=/proc/{ns}/ns/net", "ip", *args]).stdout

    def start_server(self, config: str) -> None:
        """udhcpd with `config` (a running one is stopped first: a new config takes a restart)."""
        if self.server is not None:
            stop(self.server)
        with open(f"{self.tmp}/udhcpd.conf", "w") as f:
            f.write(config)
        with open(f"{self.tmp}/udhcpd.log", "ab") as log:
            self.server = subprocess.Popen(["nsenter", f"--net=/proc/{self.server_ns}/ns/net", "busybox", "udhcpd",
                                            "-f", "-a", "200", f"{self.tmp}/udhcpd.conf"], stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(self.server)

    def server_log(self) -> str:
        with open(f"{self.tmp}/udhcpd.log", errors="replace") as f:
            return f.read()

    def start_client(self) -> None:
        os.makedirs(f"{self.tmp}/ov", exist_ok=True)
        # a sysfs of its own shows the namespace's interfaces (network.interfaces() reads /sys/class/net)
        setup = (f"mount -t sysfs sysfs /sys && mount -t tmpfs none {self.tmp}/ov && "
                 f"mkdir {self.tmp}/ov/up {self.tmp}/ov/work && mount -t overlay overlay -o lowerdir=/etc,"
                 f"upperdir={self.tmp}/ov/up,workdir={self.tmp}/ov/work /etc && exec \"$@\"")
        argv = ["nsenter", f"--net=/proc/{self.client_ns}/ns/net"] + namespace_argv(
            ["sh", "-c", setup, "sh"] + python_argv(CLIENT))
        with open(f"{self.tmp}/client.out", "wb") as out, open(f"{self.tmp}/client.log", "wb") as log:
            self.client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=log)
        self.processes.append(self.client)

    def reports(self) -> list[dict[str, object]]:
        """What the client said its network is, at the start and after each change."""
        with open(f"{self.tmp}/client.out") as f:
            return [json.loads(line) for line in f.read().splitlines() if line.startswith("{")]

    def client_log(self) -> str:
        with open(f"{self.tmp}/client.log", errors="replace") as f:
            return f.read()

    def client_file(self, path: str) -> str:
        """A file as the client sees it (its /etc is an overlay in its own mount namespace)."""
        assert self.client is not None
        with open(f"/proc/{self.client.pid}/root{path}") as f:
            return f.read()

    def addresses(self) -> list[str]:
        return [line.split()[1] for line in self.ip(self.client_ns, "-4", "addr", "show", "eth0").splitlines()
                if line.strip().startswith("inet ")]

    def default_route(self) -> str:
        return self.ip(self.client_ns, "route", "show", "default").strip()

    def resolve_host(self, address: str) -> str:
        """What the client's DNS forwarder on `address` says host.boxpark.internal is (asked from the server;
        "" when nothing answers)."""
        ask = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10); "
               "s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 53)); print(socket.inet_ntoa(s.recv(512)[-4:]))")
        argv = ["nsenter", f"--net=/proc/{self.server_ns}/ns/net", *python_argv(ask, query(HOST_NAME).hex(), address)]
        return sh(argv, check=False).stdout.strip()


def netns_holder() -> subprocess.Popen[bytes]:
    """A process alone in a new network namespace, which lives as long as it does."""
    holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "100000"], stdin=subprocess.DEVNULL)
    mine = os.readlink("/proc/self/ns/net")
    wait_for(lambda: holder.poll() is not None or os.readlink(f"/proc/{holder.pid}/ns/net") != mine,
             "a new network namespace", 30)
    assert holder.poll() is None, "unshare --net failed"
    return holder


@contextlib.contextmanager
def link(tmp: str) -> Iterator[Link]:
    holders: list[subprocess.Popen[bytes]] = []
    result: Link | None = None
    try:
        holders = [netns_holder(), netns_holder()]
        server_ns, client_ns = holders[0].pid, holders[1].pid
        # both ends are created inside the namespaces: the veth never exists in the host's
        sh(["ip", "link", "add", "bp-s", "netns", str(server_ns), "type", "veth", "peer", "name", "bp-c", "netns",
            str(client_ns)])
        result = Link(tmp, server_ns, client_ns)
        result.ip(server_ns, "link", "set", "bp-s", "name", "eth1")
        result.ip(client_ns, "link", "set", "bp-c", "name", "eth0", "address", MAC)
        result.ip(server_ns, "addr", "add", f"{SERVER}/24", "dev", "eth1")
        result.ip(server_ns, "link", "set", "eth1", "up")
        open(f"{tmp}/leases", "wb").close()
        yield result
    finally:
        if result is not None:
            for process in result.processes:
                stop(process)
            if os.path.exists(f"{tmp}/client.log"):
                print("client log:\n" + result.client_log()[-6000:])
                print("server log:\n" + result.server_log()[-3000:])
        for holder in holders:  # the last process in a namespace takes it, and its veth end, with it
            stop(holder)


def test_a_short_lease_is_renewed_then_a_changed_router_dns_and_address_are_applied(short_tmp: str) -> None:
    with link(short_tmp) as net:
        net.start_server(udhcpd_config(short_tmp, SERVER, "10.55.0.53"))
        net.start_client()

        # the boot's lease, then renewals at T1 (unicast to the server) past the first lease's end
        wait_for(lambda: net.reports(), "the client's first lease")
        first = net.reports()[0]
        address = str(first["address"])
        assert address.startswith("10.55.0.1") and first["gateway"] == SERVER and first["dns"] == ["10.55.0.53"]
        granted = time.monotonic()
        wait_for(lambda: net.server_log().count(f"sending ACK to {address}") >= 4
                 and time.monotonic() > granted + 1.5 * LEASE, "three renewals past the first lease's end")
        assert net.addresses() == [f"{address}/24"]
        assert net.reports() == [first]  # nothing changed, nothing ended
        assert "lease renewed (renewing)" in net.client_log()
        assert "ended unrenewed" not in net.client_log()
        assert net.resolve_host(address) == SERVER

        # the same address with a new router and DNS server: the next renewal's ACK brings them
        net.start_server(udhcpd_config(short_tmp, "10.55.0.254", "10.55.0.54", static=address))
        wait_for(lambda: net.reports()[-1]["gateway"] == "10.55.0.254", "the new router")
        assert net.reports()[-1] == {"address": address, "gateway": "10.55.0.254", "dns": ["10.55.0.54"]}
        assert net.addresses() == [f"{address}/24"]
        assert net.default_route().startswith("default via 10.55.0.254 dev eth0"), net.default_route()
        assert "10.55.0.254\thost.boxpark.internal" in net.client_file("/etc/hosts")
        assert "10.55.0.1\thost.boxpark.internal" not in net.client_file("/etc/hosts")
        wait_for(lambda: net.resolve_host(address) == "10.55.0.254", "the forwarder to know the new router")
        assert net.client_file("/etc/resolv.conf") == f"nameserver {address}\n"

        # a server that will only give another address ignores the renewals: the lease ends, the address
        # goes, and the client discovers the new one
        net.start_server(udhcpd_config(short_tmp, "10.55.0.254", "10.55.0.54", static="10.55.0.150"))
        wait_for(lambda: net.reports()[-1]["address"] == "10.55.0.150", "the new address")
        assert {"address": "", "gateway": "", "dns": []} in net.reports()  # the ended lease was given up first
        assert net.reports()[-1] == {"address": "10.55.0.150", "gateway": "10.55.0.254", "dns": ["10.55.0.54"]}
        assert net.addresses() == ["10.55.0.150/24"]
        assert net.default_route().startswith("default via 10.55.0.254 dev eth0"), net.default_route()
        assert "ended unrenewed" in net.client_log()
        wait_for(lambda: net.resolve_host("10.55.0.150") == "10.55.0.254", "the forwarder on the new address")
        assert net.client_file("/etc/resolv.conf") == "nameserver 10.55.0.150\n"
