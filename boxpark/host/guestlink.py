"""The agent's streams into the guest, each one dialled through the backend (Lima's `GuestAgentConn`).

An API client, a raw `Connect` (docker.sock, a published port) and each connection of the agent's api.sock
forward all begin as `backend.dial(API_PORT)`: the backend hands over a connected socket however it reaches
the guest, and this module puts the Guest API on it (handshake, proof on tcp, the call). So the agent never
dials an address of its own, and on vz nothing is relayed twice. The blocking variants run in the Guest
Proxy's relay threads, which go straight on to move bytes. One exception: a backend that can open what a
`Connect` names by itself (`Backend.connect_direct`: the sandbox, on the same kernel) does, and the call
is never made.
"""

from __future__ import annotations

import socket

from .. import protocol
from ..transport import open_raw, open_raw_blocking
from .backends.base import API_PORT, Backend
from .client import GuestClient


class GuestLink:
    """The guest's API as the agent reaches it through `backend`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def _dial(self, timeout: float) -> socket.socket:
        return await self.backend.dial(API_PORT, timeout)

    async def client(self, timeout: float = 10.0) -> GuestClient:
        """A Guest API client whose every connection (its streams' too) is a dial of the backend."""
        return await GuestClient.open(self.backend.address(API_PORT), secret=self.backend.secret,
                                      timeout=timeout, dialer=self._dial)

    async def connect(self, request: protocol.Connect, timeout: float = 10.0) -> socket.socket:
        """A raw stream to what `request` names in the guest (non-blocking), after the call's `Ok`."""
        sock = await self.backend.dial(API_PORT, timeout)
        return await open_raw(self.backend.address(API_PORT), request, secret=self.backend.secret,
                              timeout=timeout, sock=sock)

    def connect_blocking(self, request: protocol.Connect | protocol.TakeConnection,
                         timeout: float = 10.0) -> socket.socket:
        """`connect` for a relay thread: a blocking socket; the backend's own stream where it has one for a
        `Connect` (the sandbox), which spares the API handshake, the call and the guest's relay."""
        if isinstance(request, protocol.Connect) and (direct := self.backend.connect_direct(request)) is not None:
            return direct
        sock = self.backend.dial_blocking(API_PORT, timeout)
        return open_raw_blocking(self.backend.address(API_PORT), request, secret=self.backend.secret,
                                 timeout=timeout, sock=sock)

    def api_blocking(self, timeout: float = 10.0) -> socket.socket:
        """A bare connection to the guest's API for a relay thread (the api.sock forward: its client speaks)."""
        return self.backend.dial_blocking(API_PORT, timeout)


async def guest_client(backend: Backend, timeout: float = 10.0) -> GuestClient:
    """A Guest API client of a started backend (tools and tests: `async with await guest_client(b) as c`)."""
    return await GuestLink(backend).client(timeout)
