"""Published ports: `docker run -p 8080:80 …` answers at localhost:8080 on the host.

The agent watches dockerd's container events (through a `connect` to the guest's docker.sock, the Guest
Proxy's path). For each port binding of a running container it listens on the host — 127.0.0.1 and ::1 by
default; all interfaces only when the binding asks for them (docker's default `-p 8080:80` does) and
`ports.all_interfaces` allows it — and joins every connection to a `connect` to the same port in the guest,
where docker-proxy listens. A UDP binding carries each host-side peer's datagrams over a stream of its own
(`Connect(udp=True)`), closed after a minute of silence. Bindings go when their container dies. A host
port that cannot be had is a problem in `boxpark status` and the agent's log, never a crash. The running
containers are listed every time the event stream (re)opens — after the events request, so nothing that
starts in between is missed — which picks up containers that ran before the agent watched, or that dockerd
restarted.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import socket
import threading
import urllib.parse
from typing import Any, AsyncIterator, Awaitable, Callable, NamedTuple

from .. import protocol
from ..relay import DATAGRAM, frame_datagram
from ..transport import RemoteError, TransportError
from .guestproxy import GuestProxy

log = logging.getLogger("boxpark.agent.ports")

UDP_IDLE = 60.0  # seconds of silence after which a UDP peer's stream is closed
DIALS = 8  # new streams being opened into the guest at once; more wait their turn here (see _dial)
EVENTS_FILTER = json.dumps({"type": ["container"], "event": ["start", "die"]})

OpenDocker = Callable[[], Awaitable[socket.socket]]
OpenGuest = Callable[[protocol.Connect], socket.socket]  # blocking: run in a relay thread


class DockerAPIError(Exception):
    """dockerd answered something other than what the watcher needs."""


class Binding(NamedTuple):
    """One published port of a container, as dockerd reports it."""

    proto: str  # "tcp" or "udp"
    host_ip: str  # "0.0.0.0", "::", "127.0.0.1", ...
    host_port: int
    container: str  # the container's name, for messages


class Listen(NamedTuple):
    """Where the host listens for a binding, and the guest address its connections go to."""

    proto: str
    ip: str
    port: int
    guest_ip: str


def bindings_of(container: dict[str, Any]) -> list[Binding]:
    """The published ports of one entry of `GET /containers/json`."""
    names = container.get("Names") or [container.get("Id", "?")[:12]]
    name = names[0].lstrip("/")
    result = []
    for port in container.get("Ports") or ():
        public = port.get("PublicPort")
        if public and port.get("Type") in ("tcp", "udp"):
            result.append(Binding(port["Type"], port.get("IP") or "0.0.0.0", int(public), name))
    return result


def listen_for(binding: Binding, siblings: list[Binding], all_interfaces: bool) -> Listen:
    """Where to listen on the host for `binding` (one of `siblings`, its container's bindings).

    A wildcard binding listens on loopback unless all interfaces are allowed; so does an address that is
    not loopback (it names one of the guest's interfaces, not the host's). The guest side is where
    docker-proxy listens; `::` goes to the guest's 127.0.0.1 when the same port is published on IPv4 too
    (docker's default pair), so a client that tries ::1 first never meets a dead end.
    """
    try:
        address = ipaddress.ip_address(binding.host_ip)
    except ValueError:
        address = ipaddress.ip_address("0.0.0.0")
    v6 = address.version == 6
    if address.is_loopback or all_interfaces:
        host_ip = str(address)
    else:
        host_ip = "::1" if v6 else "127.0.0.1"
    if address.is_unspecified:
        v4_twin = any(s.proto == binding.proto and s.host_port == binding.host_port and ":" not in s.host_ip
                      for s in siblings)
        guest_ip = "127.0.0.1" if not v6 or v4_twin else "::1"
    else:
        guest_ip = str(address)
    return Listen(binding.proto, host_ip, binding.host_port, guest_ip)


# ------------------------------------------------------------------------------------ dockerd's HTTP API


async def _request(open_docker: OpenDocker, path: str, *, close: bool = True
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, str]]:
    """Send a GET; return the stream positioned at the body, and the response's headers."""
    reader, writer = await asyncio.open_connection(sock=await open_docker(), limit=1 << 20)
    try:
        connection = "Connection: close\r\n" if close else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: boxpark\r\n{connection}\r\n".encode())
        status = (await reader.readline()).decode("latin-1").split(" ", 2)
        if len(status) < 2 or not status[1].isdigit():
            raise DockerAPIError(f"GET {path}: not an HTTP answer")
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        if status[1] != "200":
            body = await _body(reader, headers)
            raise DockerAPIError(f"GET {path}: {status[1]} {body[:200].decode(errors='replace')}")
        return reader, writer, headers
    except BaseException:
        writer.close()
        raise


async def _chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body's pieces as they come: chunked (a stream like /events), sized, or up to the end."""
    if "chunked" not in headers.get("transfer-encoding", ""):
        length = headers.get("content-length")
        yield await (reader.readexactly(int(length)) if length is not None else reader.read())
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    return b"".join([chunk async for chunk in _chunks(reader, headers)])


async def get_json(open_docker: OpenDocker, path: str) -> Any:
    reader, writer, headers = await _request(open_docker, path)
    try:
        return json.loads(await _body(reader, headers))
    finally:
        writer.close()


# ------------------------------------------------------------------------------------ UDP


class UdpForward(asyncio.DatagramProtocol):
    """A host UDP port: each peer's datagrams go over a `connect` stream of its own to the guest's port."""

    def __init__(self, listen: Listen, open_guest: OpenGuest, idle: float = UDP_IDLE) -> None:
        self.listen = listen
        self.open_guest = open_guest
        self.idle = idle
        self._transport: asyncio.DatagramTransport | None = None
        self._flows: dict[Any, _Flow] = {}
        self.accepted = 0

    async def start(self, sock: socket.socket) -> None:
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, peer: Any) -> None:
        flow = self._flows.get(peer)
        if flow is None:
            self.accepted += 1
            flow = self._flows[peer] = _Flow(self, peer)
        flow.send(data)

    def reply(self, data: bytes, peer: Any) -> None:
        if self._transport is not None:
            self._transport.sendto(data, peer)

    def forget(self, peer: Any) -> None:
        self._flows.pop(peer, None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for flow in list(self._flows.values()):
            flow.task.cancel()


class _Flow:
    """One UDP peer's stream into the guest: datagrams queue until it is open, then go straight on."""

    def __init__(self, forward: UdpForward, peer: Any) -> None:
        self.forward = forward
        self.peer = peer
        loop = asyncio.get_running_loop()
        self.last = loop.time()
        self.pending: list[bytes] = []
        self.writer: asyncio.StreamWriter | None = None
        self.task = loop.create_task(self.run())

    def send(self, data: bytes) -> None:
        self.last = asyncio.get_running_loop().time()
        if self.writer is None:
            if len(self.pending) < 256:
                self.pending.append(frame_datagram(data))
        elif self.writer.transport.get_write_buffer_size() < 1 << 20:  # a backed-up stream drops, as UDP may
            self.writer.write(frame_datagram(data))

    async def run(self) -> None:
        forward, loop = self.forward, asyncio.get_running_loop()
        listen = forward.listen
        try:
            request = protocol.Connect(port=listen.port, host=listen.guest_ip, udp=True)
            sock = await asyncio.to_thread(forward.open_guest, request)
            sock.setblocking(False)
            reader, self.writer = await asyncio.open_connection(sock=sock)
            self.writer.write(b"".join(self.pending))
            self.pending.clear()
            while True:
                try:
                    header = await asyncio.wait_for(reader.readexactly(DATAGRAM.size), forward.idle)
                except asyncio.TimeoutError:
                    if loop.time() - self.last >= forward.idle:
                        return
                    continue
                (length,) = DATAGRAM.unpack(header)
                forward.reply(await reader.readexactly(length), self.peer)
                self.last = loop.time()
        except (OSError, TransportError, RemoteError, asyncio.IncompleteReadError) as exc:
            log.info("udp %s:%d from %s: %s", listen.ip, listen.port, self.peer, exc)
        finally:
            forward.forget(self.peer)
            if self.writer is not None:
                self.writer.close()


# ------------------------------------------------------------------------------------ the forwards


def _bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.ip else socket.AF_INET
    kind = socket.SOCK_STREAM if listen.proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port just closed is free again
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.ip, listen.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class PortForwards:
    """Keeps the host's listeners in step with the published ports of dockerd's running containers."""

    def __init__(self, open_docker: OpenDocker, open_guest: OpenGuest, *, all_interfaces: bool = False) -> None:
        self._open_docker = open_docker
        self._open_guest = open_guest
        self.all_interfaces = all_interfaces
        self.forwards: dict[Listen, tuple[str, Binding, GuestProxy | UdpForward]] = {}  # → (container id, …)
        self.problems: dict[Listen, tuple[str, str]] = {}  # → (container id, what went wrong)
        self._containers: dict[str, set[Listen]] = {}
        self.synced = asyncio.Event()  # set after each listing of the running containers
        self.watching = False
        self._dials = threading.BoundedSemaphore(DIALS)

    def _dial(self, request: protocol.Connect) -> socket.socket:
        """A stream into the guest (in a relay thread), a few at a time: QEMU's user network accepts host
        connections with a backlog of one, and a burst beyond it would wait for TCP's SYN retries (1 s,
        3 s, 7 s ...) instead."""
        with self._dials:
            return self._open_guest(request)

    # -- the watch

    async def run(self) -> None:
        """Watch until cancelled; a lost event stream (dockerd restarting) is reopened and resynced."""
        delay = 0.2
        try:
            while True:
                try:
                    await self._watch()
                    delay = 0.2
                except (OSError, TransportError, RemoteError, DockerAPIError, ValueError,
                        asyncio.IncompleteReadError) as exc:
                    log.info("docker events: %s; again in %.1f s", exc, delay)
                self.watching = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self.close()

    async def _watch(self) -> None:
        query = urllib.parse.urlencode({"filters": EVENTS_FILTER})
        reader, writer, headers = await _request(self._open_docker, f"/events?{query}", close=False)
        try:
            await self.sync()
            self.watching = True
            buffer = b""
            async for chunk in _chunks(reader, headers):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        await self._event(json.loads(line))
        finally:
            writer.close()

    async def _event(self, event: dict[str, Any]) -> None:
        action, cid = event.get("Action") or event.get("status"), event.get("id") or ""
        if action == "die":
            self.drop(cid)
        elif action == "start":
            query = urllib.parse.urlencode({"filters": json.dumps({"id": [cid]})})
            for container in await get_json(self._open_docker, f"/containers/json?{query}"):
                await self.apply(container["Id"], bindings_of(container))

    async def sync(self) -> None:
        """Make the listeners match the running containers' bindings."""
        running = {c["Id"]: bindings_of(c) for c in await get_json(self._open_docker, "/containers/json")}
        for cid in list(self._containers):
            if cid not in running:
                self.drop(cid)
        for cid, bindings in running.items():
            await self.apply(cid, bindings)
        self.synced.set()

    # -- listeners

    async def apply(self, cid: str, bindings: list[Binding]) -> None:
        wanted: dict[Listen, Binding] = {}
        for binding in bindings:
            wanted.setdefault(listen_for(binding, bindings, self.all_interfaces), binding)
        held = self._containers.setdefault(cid, set())
        for listen in held - wanted.keys():
            self._close(listen, cid)
            held.discard(listen)
        for listen, binding in wanted.items():
            if listen not in held:
                held.add(listen)
                await self._open(cid, listen, binding)

    async def _open(self, cid: str, listen: Listen, binding: Binding) -> None:
        name = f"{listen.proto} {_show(listen.ip)}:{listen.port}"
        owner = self.forwards.get(listen)
        if owner is not None:
            self._problem(cid, listen, f"{name} for {binding.container}: already forwarded for "
                                       f"{owner[1].container}")
            return
        try:
            sock = _bind(listen)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL and ":" in listen.ip and not self.all_interfaces:
                return  # this host has no IPv6 loopback: 127.0.0.1 serves
            self._problem(cid, listen, f"{name} for {binding.container}: {exc.strerror or exc}")
            return
        forward: GuestProxy | UdpForward
        if listen.proto == "tcp":
            request = protocol.Connect(port=listen.port, host=listen.guest_ip)
            forward = GuestProxy(name, lambda: self._dial(request), refusal=lambda reason: b"",
                                 listener=sock)
            await forward.start()
        else:
            forward = UdpForward(listen, self._dial)
            await forward.start(sock)
        self.forwards[listen] = (cid, binding, forward)
        log.info("published port %s → %s (%s)", name, binding.container, listen.guest_ip)

    def _problem(self, cid: str, listen: Listen, message: str) -> None:
        self.problems[listen] = (cid, message)
        log.warning("published port %s (the container runs; this host port is not forwarded)", message)

    def drop(self, cid: str) -> None:
        for listen in self._containers.pop(cid, set()):
            self._close(listen, cid)

    def _close(self, listen: Listen, cid: str) -> None:
        entry = self.forwards.get(listen)
        if entry is not None and entry[0] == cid:
            del self.forwards[listen]
            entry[2].close()
            log.info("published port %s %s:%d closed", listen.proto, _show(listen.ip), listen.port)
        if self.problems.get(listen, ("",))[0] == cid:
            del self.problems[listen]

    def close(self) -> None:
        for cid in list(self._containers):
            self.drop(cid)

    def status(self) -> dict[str, Any]:
        return {
            "watching": self.watching,
            "forwarded": [{"proto": listen.proto, "host": f"{_show(listen.ip)}:{listen.port}",
                           "guest": f"{_show(listen.guest_ip)}:{listen.port}", "container": binding.container,
                           "connections": forward.accepted}
                          for listen, (_, binding, forward) in sorted(self.forwards.items())],
            "problems": sorted(message for _, message in self.problems.values()),
        }


def _show(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
