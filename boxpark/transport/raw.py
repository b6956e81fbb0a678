"""Raw calls: one connection that makes one upgrade call (e.g. `Connect`) and is returned as a bare socket.

The lean path for relays: no channel or asyncio protocol objects, the request right behind the handshake.
`protocol.RawCall` is the state machine; this module drives it from asyncio (`open_raw`) or from a thread
(`open_raw_blocking`), reading no more than it asks for so the raw stream that follows stays in the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from ..protocol import ErrorCode, Hello, Message, ProtocolError, RawCall, RemoteError
from .address import Address, TransportError, parse_address
from .handshake import handshake_failure
from .sockets import dial_blocking, dial_socket


def _raw_failure(address: Address, call: RawCall, exc: BaseException, expired: bool,
                 timeout: float) -> BaseException:
    """What a failed raw call raises: a TransportError naming the address and why, or the guest's `RemoteError`."""
    if expired and isinstance(exc, (TransportError, OSError)):
        return TransportError(f"{address} did not answer within {timeout:g} s", ErrorCode.TIMEOUT)
    if isinstance(exc, (ProtocolError, RemoteError)):
        if not call.handshake.done:
            return handshake_failure(address, exc)
        if isinstance(exc, RemoteError):
            return exc  # the call itself failed (e.g. nothing listens at the path): the guest's own sentence
        return TransportError(f"{address} broke the call: {exc}", ErrorCode.BAD_FRAME)
    if isinstance(exc, OSError):
        return TransportError(f"{address}: {exc}")
    return exc


def _closed(address: Address) -> TransportError:
    return TransportError(f"{address} closed the connection during the call")


async def open_raw(address: Address | str, request: Message, *, secret: bytes | None = None,
                   hello: Hello | None = None, timeout: float = 10.0,
                   sock: socket.socket | None = None) -> socket.socket:
    """Make the upgrade call `request` on a connection of its own; return the socket after its go-ahead.

    `sock`: a connection to `address` made already (a backend's dial); `address` then only names it."""
    if isinstance(address, str):
        address = parse_address(address)
    loop = asyncio.get_running_loop()
    call = RawCall(request, hello=hello, secret=secret)
    sock = sock if sock is not None else await dial_socket(address, timeout)
    sock.setblocking(False)
    expired = False

    def expire() -> None:  # a timer, not wait_for: no extra task per call
        nonlocal expired
        expired = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # the pending recv sees the end of the stream

    timer = loop.call_later(timeout, expire)
    try:
        while True:
            if data := call.data_to_send():
                await loop.sock_sendall(sock, data)
            if call.done:
                return sock
            chunk = await loop.sock_recv(sock, call.wanted())
            if not chunk:
                raise _closed(address)
            call.receive_data(chunk)
    except BaseException as exc:
        sock.close()
        raise _raw_failure(address, call, exc, expired, timeout) from None
    finally:
        timer.cancel()


def open_raw_blocking(address: Address | str, request: Message, *, secret: bytes | None = None,
                      hello: Hello | None = None, timeout: float = 10.0,
                      sock: socket.socket | None = None) -> socket.socket:
    """`open_raw` for a thread: the same call with blocking sockets, returning a blocking socket.

    What the proxies use: a pooled relay thread opens the guest's side itself and goes straight on to move
    bytes, with no hop through the event loop.
    """
    if isinstance(address, str):
        address = parse_address(address)
    call = RawCall(request, hello=hello, secret=secret)
    deadline = time.monotonic() + timeout
    sock = sock if sock is not None else dial_blocking(address, timeout)  # `sock`: as for `open_raw`
    try:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            if data := call.data_to_send():
                sock.sendall(data)
            if call.done:
                sock.settimeout(None)
                return sock
            chunk = sock.recv(call.wanted())
            if not chunk:
                raise _closed(address)
            call.receive_data(chunk)
    except BaseException as exc:
        sock.close()
        raise _raw_failure(address, call, exc, isinstance(exc, TimeoutError), timeout) from None
