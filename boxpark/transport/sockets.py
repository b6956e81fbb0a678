"""Sockets: listen on an address, and dial one from asyncio or from a thread. No framing, no handshake.

A listening unix socket is mode 0600 from its bind on and replaces a stale one, never a live one. A dial
either returns a connected socket or raises a `TransportError` naming the address and why; a unix listener
whose backlog is full is retried until the dial's deadline rather than failed at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time

from ..protocol import ErrorCode
from .address import Address, TransportError


def listen_socket(address: Address, backlog: int = 1024) -> socket.socket:
    """A listening, non-blocking socket for `address`; a unix socket is mode 0600 and replaces a stale one."""
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.fchmod(sock.fileno(), 0o600)  # Linux takes the inode mode at bind time: no window
            _remove_stale_socket(address.path)
            sock.bind(address.path)
            os.chmod(address.path, 0o600)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on {address}: {exc.strerror}") from None
    elif address.kind == "tcp":
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host, address.port))
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on {address}: {exc.strerror}") from None
    else:
        sock = _vsock_socket(address)
        try:
            sock.bind((address.cid, address.port))
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on {address}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _vsock_socket(address: Address) -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise TransportError(f"{address}: this platform has no AF_VSOCK", ErrorCode.UNSUPPORTED)
    try:
        return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as exc:
        raise TransportError(f"{address}: vsock is not available here ({exc.strerror})",
                             ErrorCode.UNSUPPORTED) from None


def _remove_stale_socket(path: str) -> None:
    """Unlink a leftover socket nobody listens on; refuse to replace a live one or a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(17, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(98, "another server is listening there")
    finally:
        probe.close()


def _blocking_socket(address: Address) -> socket.socket:
    """An unconnected socket of the address's kind (TCP without Nagle: the protocol's frames are small)."""
    if address.kind == "unix":
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    if address.kind == "tcp":
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    return _vsock_socket(address)


def _target(address: Address) -> object:
    if address.kind == "unix":
        return address.path
    if address.kind == "tcp":
        return (address.host, address.port)
    return (address.cid, address.port)


# A non-blocking connect to a unix socket whose listener's backlog is full fails with EAGAIN at once (there
# is no "in progress" for it to wait on): it is retried, at a growing interval, until the dial's deadline.
_BACKLOG_RETRY_FIRST = 0.002
_BACKLOG_RETRY_MAX = 0.1


class _BacklogFull(Exception):
    pass


def _dial_failure(address: Address, exc: BaseException) -> TransportError:
    if isinstance(exc, _BacklogFull):
        reason = "timed out (its backlog stayed full)"
    elif isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        reason = "timed out"
    else:
        assert isinstance(exc, OSError)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
    code = ErrorCode.NOT_FOUND if isinstance(exc, FileNotFoundError) else ErrorCode.UNAVAILABLE
    return TransportError(f"cannot connect to {address}: {reason}", code)


def dial_blocking(address: Address, timeout: float = 10.0) -> socket.socket:
    """`dial_socket` for a thread: a connected blocking socket, or `TransportError` naming it and why."""
    deadline = time.monotonic() + timeout
    sock = _blocking_socket(address)
    sock.settimeout(timeout)
    delay = _BACKLOG_RETRY_FIRST
    try:
        while True:
            try:
                sock.connect(_target(address))
                break
            except BlockingIOError:
                if address.kind != "unix":
                    raise
                if time.monotonic() + delay > deadline:
                    raise _BacklogFull() from None
                time.sleep(delay)
                delay = min(delay * 2, _BACKLOG_RETRY_MAX)
    except (OSError, _BacklogFull) as exc:
        sock.close()
        raise _dial_failure(address, exc) from None
    sock.settimeout(None)
    return sock


async def dial_socket(address: Address, timeout: float = 10.0) -> socket.socket:
    """Connect a non-blocking socket to `address`, or raise `TransportError` naming it and why."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sock = _blocking_socket(address)
    sock.setblocking(False)
    try:
        if address.kind == "unix":  # not loop.sock_connect: it takes EAGAIN for "in progress"
            delay = _BACKLOG_RETRY_FIRST
            while True:
                try:
                    sock.connect(address.path)
                    break
                except BlockingIOError:
                    if loop.time() + delay > deadline:
                        raise _BacklogFull() from None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKLOG_RETRY_MAX)
        else:
            await asyncio.wait_for(loop.sock_connect(sock, _target(address)), timeout)
    except (OSError, asyncio.TimeoutError, _BacklogFull) as exc:
        sock.close()
        raise _dial_failure(address, exc) from None
    except BaseException:
        sock.close()
        raise
    return sock
