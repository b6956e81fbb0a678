"""Driving the handshake over a `Channel`: `dial` for the client's side, `server_handshake` for a listener's.

The state machines are `protocol.ClientHandshake` and `protocol.ServerHandshake`; this module only moves
their messages and bytes, bounds the handshake in time, and turns what the peer did wrong into one
`TransportError` sentence naming the address.
"""

from __future__ import annotations

import asyncio
import socket

from .. import protocol
from ..protocol import (ClientHandshake, ErrorCode, Hello, Message, ProtocolError, RemoteError, ServerHandshake,
                        Welcome)
from .address import Address, TransportError, parse_address
from .channel import Channel
from .sockets import dial_socket

HANDSHAKE_TIMEOUT = 10.0
"""Seconds either side gives the other to complete the handshake."""


def handshake_failure(address: Address, exc: ProtocolError | RemoteError) -> TransportError:
    """What a client raises when the server refused it or broke the handshake."""
    if isinstance(exc, RemoteError):
        return TransportError(f"{address} refused the connection: {exc.message}", exc.code)
    if exc.code in (ErrorCode.BAD_FRAME, ErrorCode.UNSUPPORTED):
        return TransportError(f"{address} is not a Boxpark endpoint: {exc}", ErrorCode.BAD_FRAME)
    return TransportError(f"{address}: {exc}", exc.code)


async def client_handshake(channel: Channel, address: Address, secret: bytes | None,
                           hello: Hello | None = None, then: Message | None = None) -> Welcome:
    """Send `Hello` (and the token proof on tcp); return the server's `Welcome` or raise `TransportError`.

    `then` is a first request sent without waiting for `Welcome` (saving a round trip on every new
    connection); its reply follows the `Welcome`.
    """
    if address.needs_secret and not secret:
        raise TransportError(f"{address} needs the machine's secret (a secret file) to connect",
                             ErrorCode.UNAUTHENTICATED)
    handshake = ClientHandshake(hello=hello, secret=secret, then=then)
    channel.send_bytes(handshake.data_to_send())
    try:
        while handshake.welcome is None:
            message = await asyncio.wait_for(channel.recv(), HANDSHAKE_TIMEOUT)
            if message is None:
                raise TransportError(f"{address} closed the connection during the handshake")
            handshake.receive(message)
            channel.send_bytes(handshake.data_to_send())
    except asyncio.TimeoutError:
        raise TransportError(f"{address} did not complete the handshake in {HANDSHAKE_TIMEOUT:.0f} s") from None
    except (ProtocolError, RemoteError) as exc:
        raise handshake_failure(address, exc) from None
    return handshake.welcome


async def server_handshake(channel: Channel, *, require_proof: bool, secret: bytes | None,
                           welcome: Welcome) -> Hello | None:
    """Receive `Hello` (and check the token proof); reply `Welcome`, or an `Error` and return None."""
    handshake = ServerHandshake(welcome, secret=secret if require_proof else None)

    def expire() -> None:  # a timer, not wait_for: no extra task on every new connection
        channel.send(protocol.error(ErrorCode.TIMEOUT, "handshake timed out"))
        channel.close()  # recv() below then sees the end of the stream

    timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, expire)
    try:
        while not handshake.done:
            handshake.receive(await channel.recv())
            channel.send_bytes(handshake.data_to_send())  # a Challenge, or the Welcome
    except ProtocolError as exc:
        channel.send(protocol.error(exc.code, str(exc)))
        return None
    finally:
        timer.cancel()
    channel.hello = handshake.hello
    channel.lift_guard()
    return handshake.hello


async def dial(address: Address | str, *, secret: bytes | None = None, hello: Hello | None = None,
               timeout: float = 10.0, then: Message | None = None,
               sock: socket.socket | None = None) -> tuple[Channel, Welcome]:
    """Connect to a Boxpark endpoint and complete the handshake (sending `then` right behind it).

    `sock`: a connection to `address` made already (a backend's dial); `address` then only names it."""
    if isinstance(address, str):
        address = parse_address(address)
    sock = sock if sock is not None else await dial_socket(address, timeout)
    channel = await Channel.from_socket(sock, str(address))
    try:
        welcome = await client_handshake(channel, address, secret, hello, then)
    except BaseException:
        channel.abort()
        raise
    return channel, welcome
