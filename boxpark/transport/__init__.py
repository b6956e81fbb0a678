"""Addresses and connections, shared by guest and host: one parser, one dialer, one listener, one handshake.

- `address`: `vsock:CID:PORT`, `unix:PATH`, `tcp:HOST:PORT`, and the machine's secret file;
- `sockets`: listen on an address, dial one (asyncio or a thread);
- `channel`: `Channel`, framed messages over one asyncio connection;
- `handshake`: `dial`, and the handshake driven over a channel from either side;
- `raw`: one upgrade call on a connection of its own, returned as a bare socket;
- `listener`: `serve`, the accept loop and what it bounds before `Welcome`.
The state machines they drive are the protocol's (`protocol.handshake`); nothing here knows what a call
means. Every public name is importable from `boxpark.transport` itself.
"""

from ..protocol import RemoteError, proof
from .address import DEFAULT_PORT, Address, TransportError, parse_address, read_secret, write_secret
from .channel import Channel
from .handshake import HANDSHAKE_TIMEOUT, client_handshake, dial, server_handshake
from .listener import MAX_PENDING_HANDSHAKES, Handler, serve
from .raw import open_raw, open_raw_blocking
from .sockets import dial_blocking, dial_socket, listen_socket

__all__ = ["DEFAULT_PORT", "HANDSHAKE_TIMEOUT", "MAX_PENDING_HANDSHAKES", "Address", "Channel", "Handler",
           "RemoteError", "TransportError", "client_handshake", "dial", "dial_blocking", "dial_socket",
           "listen_socket", "open_raw", "open_raw_blocking", "parse_address", "proof", "read_secret", "serve",
           "server_handshake", "write_secret"]
