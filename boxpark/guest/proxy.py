"""The connect call: a raw byte stream from the API connection to a unix socket or TCP port in the guest.

A UDP port (`udp`) gets a connected UDP socket and a `DatagramRelay`: datagrams framed on the stream.
The handler dials the target first, so a missing or refusing target is an `Error` reply, never a hang.
Then it replies `Ok`, leaves framing (`Channel.take_socket`) and moves bytes both ways until both sides are
done, through the shared `relay` (splice threads, half-close) that the host's proxies use too. Nothing
here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import socket

from .. import protocol
from ..protocol import ErrorCode
from ..relay import DatagramRelay, Relay
from ..transport import Channel
from .errors import GuestError


# ------------------------------------------------------------------------------------------ dialing


async def dial_target(message: protocol.Connect) -> socket.socket:
    """Connect to the call's target within its timeout; a blocking socket, or a GuestError saying why not."""
    if (message.path is None) == (message.port is None):
        raise GuestError(ErrorCode.INVALID_ARGUMENT, "connect: give either path or port")
    if not 0 < message.timeout < math.inf:  # NaN too: an endless connect would hold its socket forever
        raise GuestError(ErrorCode.INVALID_ARGUMENT,
                         f"connect: timeout {message.timeout} must be a positive, finite number of seconds")
    if message.path is not None:
        encoded = os.fsencode(message.path)
        if not encoded or b"\0" in encoded or len(encoded) > 107:
            raise GuestError(ErrorCode.INVALID_ARGUMENT,
                             f"connect: {message.path!r} is not a unix socket path (at most 107 bytes)")
        targets: list[tuple[int, object]] = [(socket.AF_UNIX, message.path)]
        name = message.path
    else:
        port = message.port
        assert port is not None
        if not 1 <= port <= 65535:
            raise GuestError(ErrorCode.INVALID_ARGUMENT, f"connect: port {port} is out of range")
        name = f"{message.host}:{port}"
        targets = await _resolve(message.host, port, message.timeout)
    if message.udp:
        if message.path is not None:
            raise GuestError(ErrorCode.INVALID_ARGUMENT, "connect: udp needs a port, not a path")
        return _udp_socket(targets, name)
    loop = asyncio.get_running_loop()
    failure: OSError | None = None
    deadline = loop.time() + message.timeout
    for family, address in targets:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            try:  # a unix socket, or a listener in this guest, usually answers at once: no task, no timer
                sock.connect(address)
            except (BlockingIOError, InterruptedError):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError from None
                await asyncio.wait_for(_connected(sock, address), remaining)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
                raise GuestError(ErrorCode.TIMEOUT,
                                 f"connect {name}: no answer within {message.timeout:g} s") from None
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(True)
        return sock
    assert failure is not None
    raise _dial_error(failure, name, message.path is not None)


def _udp_socket(targets: list[tuple[int, object]], name: str) -> socket.socket:
    """A blocking UDP socket connected to the first target that takes it (a connect sends nothing)."""
    failure: OSError | None = None
    for family, address in targets:
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
    assert failure is not None
    raise _dial_error(failure, name, False)


async def _connected(sock: socket.socket, address: object) -> None:
    """Finish a non-blocking connect that is in progress (TCP), or retry one whose backlog was full (unix)."""
    loop = asyncio.get_running_loop()
    while True:
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_writer(sock.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_writer(sock.fileno())
        if sock.family == socket.AF_UNIX:
            try:
                sock.connect(address)
                return
            except (BlockingIOError, InterruptedError):
                await asyncio.sleep(0.005)  # a full backlog does not signal when it drains
                continue
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        return


async def _resolve(host: str, port: int, timeout: float) -> list[tuple[int, object]]:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
    except OSError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise GuestError(ErrorCode.NOT_FOUND, f"connect {host}:{port}: cannot resolve {host}: {exc}") from None
    return [(family, address) for family, _, _, _, address in infos]


def _dial_error(exc: OSError, name: str, unix: bool) -> GuestError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.ENOENT:
        return GuestError(ErrorCode.NOT_FOUND, f"connect {name}: no socket there")
    if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET):
        what = "nothing listens on that socket" if unix else "connection refused"
        if exc.errno != errno.ECONNREFUSED:
            what = reason
        return GuestError(ErrorCode.UNAVAILABLE, f"connect {name}: {what}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return GuestError(ErrorCode.PERMISSION_DENIED, f"connect {name}: {reason}")
    if exc.errno in (errno.ENOTSOCK, errno.EPROTOTYPE):
        return GuestError(ErrorCode.INVALID_ARGUMENT, f"connect {name}: not a stream socket ({reason})")
    return GuestError(ErrorCode.FAILED, f"connect {name}: {reason}")


# ------------------------------------------------------------------------------------------ the call


async def connect(channel: Channel, message: protocol.Connect) -> None:
    """The `Connect` call: dial, reply `Ok`, then relay raw bytes until both directions are done."""
    target = await dial_target(message)
    await relay_call(channel, target, DatagramRelay if message.udp else Relay)


async def relay_call(channel: Channel, target: socket.socket,
                     kind: type[Relay] | type[DatagramRelay] = Relay) -> None:
    """A raw call's end: take the channel's socket, reply `Ok`, relay it with `target` (a blocking socket, now
    the relay's) in threads until both directions are done; the loop only waits for that."""
    try:
        client, leftover = channel.take_socket()
    except BaseException:
        target.close()
        raise
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        try:
            loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))
        except RuntimeError:  # the loop is gone (server shut down): nobody waits any more
            pass

    relay = kind(client, target, leftover, done)
    try:
        client.sendall(protocol.encode(protocol.Ok()))
    except OSError:
        relay.close_now()
        return None
    relay.start()
    try:
        await finished
    except asyncio.CancelledError:
        relay.abort()  # the server is closing: end both directions; the threads close the sockets
        raise
    return None
