"""The host's resolver for the guest (Lima's `hostResolver`): names resolve in containers as on the host.

The agent opens a `HostResolver` call to the guest and keeps it open (again after it drops); the guest's DNS
forwarder sends A, AAAA and reverse (PTR) questions on it and this module answers each with the host's own
resolver: `getaddrinfo` (`getnameinfo` for PTR), which reads /etc/hosts and nsswitch on Linux and uses the
scoped resolvers (VPNs' split DNS) on macOS. `[dns] hosts_file` adds a hosts file read before it (for names
only Boxpark's containers should see, and for tests, which must not touch the machine's /etc/hosts).

It must never hold the guest up: lookups run in a few worker threads with a deadline each, a question
beyond what they can take is answered `failed` at once (the guest then asks the network), and the link is
the guest's to time out. Names are resolved as given, without a trailing dot (glibc's hosts file lookup
does not match one), so a single-label name gets the host's search domains, as on the host.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import Awaitable, Callable

from .. import protocol
from ..protocol import ProtocolError, RemoteError
from ..transport import Channel, TransportError

log = logging.getLogger("boxpark.resolver")

WORKERS = 4
MAX_IN_FLIGHT = 64  # questions queued for the workers; the guest's own bound is higher, so it falls back
TIMEOUT = 5.0  # a lookup that takes longer is answered `failed` (the guest stopped waiting long before)
TYPE_A, TYPE_AAAA, TYPE_PTR = 1, 28, 12
_FAMILIES = {TYPE_A: socket.AF_INET, TYPE_AAAA: socket.AF_INET6}
_NXDOMAIN = {socket.EAI_NONAME}
_NODATA = {getattr(socket, "EAI_NODATA", -5), getattr(socket, "EAI_ADDRFAMILY", -9)}


class HostsFile:
    """A hosts file (`address name alias…`, `#` comments), read again when it changes; absent = empty."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._names: dict[str, list[str]] = {}
        self._addresses: dict[str, str] = {}

    def lookup(self, name: str) -> list[str] | None:
        """Every address of `name` (any family), or None if the file does not name it."""
        self._reload()
        return self._names.get(name.lower().rstrip("."))

    def reverse(self, address: str) -> str | None:
        """The first name the file gives `address` (as the C library's hosts lookup does), or None."""
        self._reload()
        return self._addresses.get(address)

    def _reload(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            text = self.path.read_text(errors="replace")
        except OSError:
            self._stamp, self._names, self._addresses = None, {}, {}
            return
        names: dict[str, list[str]] = {}
        addresses: dict[str, str] = {}
        for line in text.splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            try:
                address = str(ipaddress.ip_address(fields[0].split("%", 1)[0]))
            except ValueError:
                continue
            addresses.setdefault(address, fields[1].rstrip("."))
            for name in fields[1:]:
                names.setdefault(name.lower().rstrip("."), []).append(address)
        self._stamp, self._names, self._addresses = stamp, names, addresses


def resolve(name: str, qtype: int, hosts: HostsFile | None = None) -> protocol.ResolveReply:
    """How the host resolves `name` for DNS type `qtype` (blocking: a worker thread's job); id 0.

    Both families are asked at once, so a name with only IPv4 addresses is `found` with none for AAAA (no
    data, which resolvers take as "use the A record"), not NXDOMAIN.
    """
    if qtype == TYPE_PTR:
        return _reverse(name, hosts)
    family = _FAMILIES.get(qtype)
    if family is None or not name or len(name) > 253:
        return protocol.ResolveReply(id=0, status="failed")
    listed = hosts.lookup(name) if hosts is not None else None
    if listed is not None:
        return _found(listed, family)
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NXDOMAIN:
            return protocol.ResolveReply(id=0, status="nxdomain")
        if exc.errno in _NODATA:
            return protocol.ResolveReply(id=0, status="nodata")
        return protocol.ResolveReply(id=0, status="failed")  # EAI_AGAIN, EAI_FAIL, ...: the guest asks the network
    except (OSError, UnicodeError, ValueError):
        return protocol.ResolveReply(id=0, status="failed")
    return _found([str(info[4][0]).split("%", 1)[0] for info in infos], family)


def reverse_address(name: str) -> str | None:
    """The address of a reverse name (`4.3.2.1.in-addr.arpa`, 32 nibbles then `ip6.arpa`); None if not one."""
    labels = name.lower().rstrip(".").split(".")
    try:
        if labels[-2:] == ["in-addr", "arpa"] and len(labels) == 6:
            return str(ipaddress.IPv4Address(".".join(reversed(labels[:4]))))
        if labels[-2:] == ["ip6", "arpa"] and len(labels) == 34 and all(len(n) == 1 for n in labels[:32]):
            return str(ipaddress.IPv6Address(int("".join(reversed(labels[:32])), 16)))
    except ValueError:
        pass
    return None


def _reverse(name: str, hosts: HostsFile | None) -> protocol.ResolveReply:
    address = reverse_address(name)
    if address is None:
        return protocol.ResolveReply(id=0, status="failed")  # a partial reverse zone: the network's to answer
    listed = hosts.reverse(address) if hosts is not None else None
    if listed is not None:
        return protocol.ResolveReply(id=0, status="found", names=[listed])
    try:
        host, _ = socket.getnameinfo((address, 0), socket.NI_NAMEREQD)
    except socket.gaierror as exc:
        return protocol.ResolveReply(id=0, status="nxdomain" if exc.errno in _NXDOMAIN else "failed")
    except (OSError, UnicodeError, ValueError):
        return protocol.ResolveReply(id=0, status="failed")
    return protocol.ResolveReply(id=0, status="found", names=[host])


def _found(addresses: list[str], family: int) -> protocol.ResolveReply:
    kept: list[str] = []
    for address in addresses:
        with contextlib.suppress(ValueError):
            parsed = ipaddress.ip_address(address)
            if (parsed.version == 4) == (family == socket.AF_INET) and str(parsed) not in kept:
                kept.append(str(parsed))
    return protocol.ResolveReply(id=0, status="found", addresses=kept)


class HostResolver:
    """The agent's side of the `HostResolver` call: opened with `open_link`, kept open by `run`."""

    def __init__(self, open_link: Callable[[], Awaitable[Channel]], hosts_file: str = "",
                 workers: int = WORKERS, max_in_flight: int = MAX_IN_FLIGHT, timeout: float = TIMEOUT,
                 resolve: Callable[[str, int, HostsFile | None], protocol.ResolveReply] = resolve) -> None:
        self._open_link = open_link
        self.hosts = HostsFile(hosts_file) if hosts_file else None
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._resolve = resolve
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="boxpark-resolver")
        self._in_flight = 0
        self.answered = 0

    async def run(self) -> None:
        """Until cancelled: hold the link open, answering; after a drop, open it again (1 s, doubling to 30 s)."""
        delay = 1.0
        try:
            while True:
                try:
                    channel = await self._open_link()
                except (TransportError, RemoteError, ConnectionError, ProtocolError, OSError,
                        asyncio.TimeoutError) as exc:
                    log.warning("the host resolver cannot reach the guest: %s", exc)
                else:
                    delay = 1.0
                    try:
                        await self.serve(channel)
                    except (ConnectionError, ProtocolError, OSError) as exc:
                        log.info("the host resolver's link ended: %s", exc)
                    finally:
                        channel.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def serve(self, channel: Channel) -> None:
        """Answer every `ResolveRequest` on `channel` until it ends."""
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                message = await channel.recv()
                if message is None:
                    return
                if not isinstance(message, protocol.ResolveRequest):
                    raise ProtocolError(f"expected resolve_request, got {type(message).__name__}")
                if self._in_flight >= self.max_in_flight:
                    channel.send(protocol.ResolveReply(id=message.id, status="failed"))
                    continue
                task = asyncio.ensure_future(self._answer(channel, message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()

    async def _answer(self, channel: Channel, request: protocol.ResolveRequest) -> None:
        self._in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(self._pool, self._resolve, request.name, request.type, self.hosts)
            reply = await asyncio.wait_for(work, self.timeout)
        except asyncio.TimeoutError:
            reply = protocol.ResolveReply(id=0, status="failed")
        except Exception as exc:  # a resolver bug must not end the link
            log.warning("resolving %r: %s: %s", request.name, type(exc).__name__, exc)
            reply = protocol.ResolveReply(id=0, status="failed")
        finally:
            self._in_flight -= 1
        reply.id = request.id
        self.answered += 1
        channel.send(reply)
