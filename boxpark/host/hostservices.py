"""Host services in the guest: a unix socket in the guest whose every connection reaches a host socket.

The first one is the host's SSH agent at `/run/host-services/ssh-auth.sock`, where Docker Desktop puts it,
so `docker run -v /run/host-services/ssh-auth.sock:… -e SSH_AUTH_SOCK=…` and `docker build --ssh default`
work unchanged. Each `ReverseForward` holds a `Listen` stream open on the guest; for each `Accepted(id)` a
pooled relay thread dials the host socket, takes the guest's connection with `TakeConnection(id)` and joins
the two (`relay`). Every stream starts from the host, on every backend: the guest never dials out.

This module never blocks the agent's loop (dials run in relay threads) and never keeps more than
`MAX_CONNECTIONS` relays per service; what the host's socket refuses is closed in the guest at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from .. import protocol, relay
from .client import GuestClient, RemoteError, TransportError

log = logging.getLogger("boxpark.hostservices")

SSH_AGENT_GUEST_PATH = "/run/host-services/ssh-auth.sock"  # Docker Desktop's path, which users' scripts name
MAX_CONNECTIONS = 64  # relays at once per service; beyond, a connection is taken and closed
RETRY_MAX = 30.0  # seconds between attempts to listen again after the stream broke

OpenClient = Callable[[], Awaitable[GuestClient]]
TakeBlocking = Callable[[protocol.TakeConnection], socket.socket]  # a raw upgrade, from a relay thread


@dataclass(frozen=True)
class HostService:
    name: str
    guest_path: str
    host_path: str


def ssh_agent(setting: str, environ: Mapping[str, str] = os.environ) -> tuple[HostService | None, str]:
    """The SSH agent service from the config's `ssh_agent` ("" = the environment's SSH_AUTH_SOCK, "off" =
    none, else a host socket path), and a sentence for the log and status when there is none."""
    if setting == "off":
        return None, "the host's SSH agent is not forwarded (ssh_agent = \"off\")"
    path = setting or environ.get("SSH_AUTH_SOCK", "")
    if not path:
        return None, ("the host's SSH agent is not forwarded: SSH_AUTH_SOCK was not set where `boxpark up` ran "
                      "(set it, or the config's ssh_agent)")
    return HostService("ssh-agent", SSH_AGENT_GUEST_PATH, os.path.abspath(os.path.expanduser(path))), ""


class ReverseForward:
    """One service: the guest's `Listen` stream at `guest_path`, each connection relayed to `host_path`."""

    def __init__(self, service: HostService, open_client: OpenClient, take: TakeBlocking,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.service = service
        self._open_client = open_client
        self._take = take
        self.max_connections = max_connections
        self.listening = False
        self.listens = 0  # streams opened: more than one means the guest's end broke and was opened again
        self.first_listen = asyncio.Event()  # `up` waits for it, so the socket is there when it says ready
        self.accepted = 0
        self.refused = 0  # the host's socket refused (agent gone), or too many at once
        self.active = 0
        self._lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        return {"name": self.service.name, "guest": self.service.guest_path, "host": self.service.host_path,
                "listening": self.listening, "listens": self.listens, "accepted": self.accepted,
                "refused": self.refused, "active": self.active}

    async def run(self) -> None:
        """Listen until cancelled; a broken stream (a guest API hiccup) is opened again, with a backoff."""
        delay = 1.0
        while True:
            try:
                await self._listen()
                delay = 1.0
            except (TransportError, RemoteError, OSError, protocol.ProtocolError, asyncio.TimeoutError) as exc:
                log.warning("%s: listening at %s in the guest failed: %s", self.service.name,
                            self.service.guest_path, exc)
            except Exception:  # a bug must not end the service for the machine's lifetime: said, then retried
                log.exception("%s: internal error while listening in the guest", self.service.name)
            self.listening = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _listen(self) -> None:
        client = await self._open_client()
        async with client:
            stream = await client.stream(protocol.Listen(path=self.service.guest_path))
            async with stream:
                self.listening = True
                self.listens += 1
                self.first_listen.set()
                async for frame in stream:
                    if isinstance(frame, protocol.Accepted):
                        self.accepted += 1
                        relay.submit(lambda ident=frame.id: self._relay(ident))

    def _relay(self, ident: int) -> None:
        """In a pooled thread: dial the host's socket, take the guest's connection, move bytes until done."""
        with self._lock:
            full = self.active >= self.max_connections
            if not full:
                self.active += 1
        host: socket.socket | None = None
        if not full:
            host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                host.settimeout(10)
                host.connect(self.service.host_path)
                host.settimeout(None)
            except OSError as exc:
                log.warning("%s: cannot reach %s: %s", self.service.name, self.service.host_path, exc)
                host.close()
                host = None
        if host is None:  # take it anyway, so the guest's client sees its end now rather than after a timeout
            self.refused += 1
            if not full:
                self._finished()
            with contextlib.suppress(TransportError, RemoteError, OSError, protocol.ProtocolError):
                self._take(protocol.TakeConnection(id=ident)).close()
            return
        try:
            guest = self._take(protocol.TakeConnection(id=ident))
        except (TransportError, RemoteError, OSError, protocol.ProtocolError) as exc:
            log.warning("%s: taking connection %d from the guest failed: %s", self.service.name, ident, exc)
            host.close()
            self._finished()
            return
        relay.Relay(guest, host, b"", self._finished).run_here()

    def _finished(self) -> None:
        with self._lock:
            self.active -= 1
