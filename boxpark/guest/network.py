"""The guest's network: lo up; eth0 static from the settings or by DHCP; resolv.conf, hosts and hostname.

resolv.conf names the guest's own eth0 address, where the DNS forwarder (dns.py) listens and answers
`host.boxpark.internal` (also in /etc/hosts, for the guest itself); the lease's or the settings' resolvers
are its upstreams. In the sandbox, eth0 is slirp4netns's tap, attached by the host once the namespace
exists: the init waits for it (bounded) instead of racing it.

The boot path: plain ioctls (0.5 ms) instead of a netlink library (pyroute2 costs 240 ms to import).
No network is never fatal: the API may still be reachable over vsock.

A DHCP lease is kept for as long as the machine runs (`keep_lease`, a task on the init's loop): what a
renewal changes is applied to eth0 (`apply_lease`) without ever blocking the loop (ioctls only).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Awaitable, Callable

from . import libc
from .settings import Settings, Static

if TYPE_CHECKING:
    from .dhcp import Lease

log = logging.getLogger("boxpark.init")

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCGIFHWADDR = 0x8927
SIOCADDRT = 0x890B
SIOCDELRT = 0x890C
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2


class _SockaddrIn(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_ushort), ("addr", ctypes.c_ubyte * 4),
                ("zero", ctypes.c_ubyte * 8)]


class _Rtentry(ctypes.Structure):
    """struct rtentry (linux/route.h), laid out by ctypes for this architecture."""

    _fields_ = [("rt_pad1", ctypes.c_ulong), ("rt_dst", _SockaddrIn), ("rt_gateway", _SockaddrIn),
                ("rt_genmask", _SockaddrIn), ("rt_flags", ctypes.c_ushort), ("rt_pad2", ctypes.c_short),
                ("rt_pad3", ctypes.c_ulong), ("rt_pad4", ctypes.c_void_p), ("rt_metric", ctypes.c_short),
                ("rt_dev", ctypes.c_char_p), ("rt_mtu", ctypes.c_ulong), ("rt_window", ctypes.c_ulong),
                ("rt_irtt", ctypes.c_ushort)]


def _sockaddr(address: str) -> _SockaddrIn:
    sa = _SockaddrIn()
    sa.family = socket.AF_INET
    sa.addr[:] = list(socket.inet_aton(address))
    return sa


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s", name.encode()) + payload.ljust(24, b"\0")


def interfaces() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/net"))
    except OSError:
        return []


def link_up(sock: socket.socket, name: str) -> None:
    flags = struct.unpack_from("H", fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq(name)), 16)[0]
    fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))


def mac_address(sock: socket.socket, name: str) -> bytes:
    return fcntl.ioctl(sock, SIOCGIFHWADDR, _ifreq(name))[18:24]


def set_address(sock: socket.socket, name: str, address: str, prefix: int) -> None:
    mask = socket.inet_ntoa(struct.pack(">I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
    fcntl.ioctl(sock, SIOCSIFADDR, _ifreq(name, bytes(_sockaddr(address))))
    fcntl.ioctl(sock, SIOCSIFNETMASK, _ifreq(name, bytes(_sockaddr(mask))))


def default_route(sock: socket.socket, gateway: str, delete: bool = False) -> None:
    route = _Rtentry()
    route.rt_dst = _sockaddr("0.0.0.0")
    route.rt_genmask = _sockaddr("0.0.0.0")
    route.rt_gateway = _sockaddr(gateway)
    route.rt_flags = RTF_UP | RTF_GATEWAY
    fcntl.ioctl(sock, SIOCDELRT if delete else SIOCADDRT, bytes(route))


def write_resolv_conf(servers: list[str], search: str = "") -> None:
    lines = [f"nameserver {server}" for server in servers]
    if search:
        lines.append(f"search {search}")
    text = "\n".join(lines) + "\n" if lines else ""
    tmp = "/etc/resolv.conf.boxpark"
    with open(tmp, "w") as f:
        f.write(text)
    if os.path.islink("/etc/resolv.conf"):
        os.unlink("/etc/resolv.conf")
    os.replace(tmp, "/etc/resolv.conf")


HOST_ALIAS = "host.boxpark.internal"
"""The name the guest knows the host by (in /etc/hosts, and answered by the DNS forwarder): not a hostname."""
SANDBOX_TAP_WAIT = 5.0  # s; the host attaches the tap within milliseconds of the init starting


class Result:
    """What the network step set up: eth0's address, the gateway (= the host) and the upstream resolvers."""

    def __init__(self, summary: str, address: str = "", gateway: str = "", dns: list[str] | None = None,
                 lease: Lease | None = None) -> None:
        self.summary = summary
        self.address = address
        self.gateway = gateway
        self.dns = dns or []
        self.lease = lease  # eth0's DHCP lease, kept by `keep_lease`; None for a static address


def wait_for_interface(name: str, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while name not in interfaces():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def write_sysctl(key: str, value: str) -> None:
    with open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
        f.write(value)


def add_host(name: str, address: str) -> None:
    """A line in /etc/hosts (which `init_hostname` wrote)."""
    with open("/etc/hosts", "a") as f:
        f.write(f"{address}\t{name}\n")


def replace_host(name: str, address: str) -> None:
    """`name`'s line in /etc/hosts now says `address` (the file replaced whole: readers never see half)."""
    try:
        with open("/etc/hosts") as f:
            lines = [line for line in f.read().splitlines() if line.split()[1:] != [name]]
    except OSError:
        lines = []
    lines.append(f"{address}\t{name}")
    with open("/etc/hosts.boxpark", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace("/etc/hosts.boxpark", "/etc/hosts")


def init_hostname(name: str) -> None:
    """The boot's hostname: the kernel's, /etc/hostname, and a fresh /etc/hosts naming it (the API's
    `Hostname` call sets only the kernel's: `system.set_hostname`)."""
    libc.sethostname(name)
    try:
        with open("/etc/hostname", "w") as f:
            f.write(name + "\n")
        with open("/etc/hosts", "w") as f:
            f.write(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    except OSError:
        pass


def configure(settings: Settings) -> Result:
    """Bring the network up as the settings say; the result has a one-line summary for the log.

    resolv.conf gets the upstream resolvers here; the init's `start_dns` points it at the forwarder once that
    runs.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        link_up(sock, "lo")
        if settings.net == "none":
            return Result("lo up; eth0 left down (boxpark.net=none)")
        if "eth0" not in interfaces() and not (settings.sandbox and wait_for_interface("eth0", SANDBOX_TAP_WAIT)):
            return Result("lo up; no eth0")
        link_up(sock, "eth0")
        static = settings.static
        lease = None
        if settings.net == "dhcp":
            from . import dhcp

            lease = dhcp.request("eth0", mac_address(sock, "eth0"))
            static = Static(lease.address, lease.prefix, lease.router, lease.dns)
            how = f"DHCP from {lease.server} ({lease.lease_time} s lease)"
        else:
            how = "static"
        assert static is not None
        set_address(sock, "eth0", static.address, static.prefix)
        if static.gateway:
            default_route(sock, static.gateway)
            add_host(HOST_ALIAS, static.gateway)
        if settings.sandbox:
            _route_containers()
        write_resolv_conf(static.dns)
        return Result(f"eth0 {static.address}/{static.prefix} via {static.gateway}, dns {','.join(static.dns) or '-'} "
                      f"({how})", static.address, static.gateway, static.dns, lease)
    finally:
        sock.close()


def apply_lease(interface: str, old: Lease | None, new: Lease | None) -> None:
    """Make `interface` what `new` says after `old`: address, prefix, default route, the host's name.

    None for `new` removes the address (a lease that ended must not be used, RFC 2131 §4.4.5). Changing
    the address makes the kernel flush the routes through the interface, so the default route is added
    again after it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if new is None:
            fcntl.ioctl(sock, SIOCSIFADDR, _ifreq(interface, bytes(_sockaddr("0.0.0.0"))))  # 0.0.0.0 deletes it
            return
        moved = old is None or (old.address, old.prefix) != (new.address, new.prefix)
        if moved:
            set_address(sock, interface, new.address, new.prefix)
        if old is not None and old.router and old.router != new.router:
            try:
                default_route(sock, old.router, delete=True)
            except OSError:  # gone with the old address
                pass
        if new.router and (moved or old is None or old.router != new.router):
            try:
                default_route(sock, new.router)
            except FileExistsError:
                pass
            replace_host(HOST_ALIAS, new.router)
    finally:
        sock.close()


async def keep_lease(net: Result, on_change: Callable[[Result], Awaitable[None]] | None = None,
                     interface: str = "eth0") -> None:
    """Keep `net`'s DHCP lease for as long as the loop runs; after each change applied to `interface`,
    `net` says what is now and `on_change(net)` moves whatever depends on it (the DNS forwarder)."""
    from . import dhcp

    if net.lease is None:
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        mac = mac_address(sock, interface)
    finally:
        sock.close()

    async def changed(old: Lease | None, new: Lease | None) -> None:
        apply_lease(interface, old, new)
        net.lease = new
        net.address, net.gateway, net.dns = (new.address, new.router, new.dns) if new else ("", "", [])
        net.summary = f"{interface} {net.address or 'no address'}" + (f"/{new.prefix} via {new.router}, dns "
                                                                      f"{','.join(new.dns) or '-'}" if new else "")
        log.info("network: %s (DHCP)", net.summary)
        if on_change is not None:
            await on_change(net)

    await dhcp.Renewer(interface, mac, net.lease, changed).run()


def _route_containers() -> None:
    """The sandbox's dockerd has no NAT (iptables off): containers' packets leave eth0 with their own source
    addresses, so the guest forwards them and answers slirp's ARP for them (proxy ARP) to get the replies."""
    try:
        write_sysctl("net.ipv4.ip_forward", "1")
        write_sysctl("net.ipv4.conf.eth0.proxy_arp", "1")
    except OSError as exc:
        log.warning("containers cannot reach the host: %s", exc)
