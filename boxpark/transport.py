"""Addresses and connections, shared by guest and host: one parser, one dialer, one listener, one handshake.

An address is `vsock:CID:PORT`, `unix:PATH` or `tcp:HOST:PORT`. TCP is reachable by other local users, so a
tcp connection always proves knowledge of the machine's secret (HMAC of a fresh nonce; the secret never
crosses the wire); unix sockets are created mode 0600 instead; vsock is reachable only by the VM's owner.

`Channel` carries framed messages (the `protocol` codec) over one asyncio connection and can hand the raw
socket over for an upgrade call. Nothing here knows what the messages mean beyond the handshake.

A listener bounds what a peer costs it before `Welcome`, whoever the peer is: frames of MAX_HANDSHAKE_FRAME,
no more of them than the handshake needs, MAX_PENDING_HANDSHAKES connections at once, HANDSHAKE_TIMEOUT; a
tcp listener may serve only given source addresses. Out of fds, it backs off rather than spin.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import hmac
import os
import re
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Collection, Generator, Literal

from . import protocol
from .protocol import (Challenge, Error, ErrorCode, FrameDecoder, Hello, Message, Proof, ProtocolError,
                       Welcome)

DEFAULT_PORT = 1024
"""The Guest API's vsock/tcp port inside the guest."""

HANDSHAKE_TIMEOUT = 10.0

MAX_PENDING_HANDSHAKES = 512
"""Connections a listener holds before their `Welcome`; more are closed at once. Each costs an fd and a few
KiB (frames are capped at MAX_HANDSHAKE_FRAME until `Welcome`), so the cap is set well above a legitimate
burst: without vsock, every Docker connection the host forwards comes through this handshake."""


class TransportError(Exception):
    """The address is wrong, or the peer is unreachable or failed the handshake. The message says which."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.UNAVAILABLE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Address:
    """A parsed address; `str()` gives it back in the `kind:...` form."""

    kind: Literal["vsock", "unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0
    cid: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "vsock":
            return f"vsock:{self.cid}:{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def needs_secret(self) -> bool:
        return self.kind == "tcp"


_TCP = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)$")


def parse_address(text: str) -> Address:
    """Parse `vsock:CID:PORT`, `unix:PATH` or `tcp:HOST:PORT`, or raise `TransportError` saying what is wrong."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise TransportError(f"bad address {text!r}: expected vsock:CID:PORT, unix:PATH or tcp:HOST:PORT",
                             ErrorCode.INVALID_ARGUMENT)
    if kind == "unix":
        if "\0" in rest:
            raise TransportError(f"bad address {text!r}: NUL in path", ErrorCode.INVALID_ARGUMENT)
        return Address("unix", path=rest)
    if kind == "vsock":
        cid, sep, port = rest.partition(":")
        if not (sep and cid.isdigit() and port.isdigit()):
            raise TransportError(f"bad address {text!r}: expected vsock:CID:PORT with numbers",
                                 ErrorCode.INVALID_ARGUMENT)
        return Address("vsock", cid=int(cid), port=_port(text, port, 0xFFFFFFFF))
    if kind == "tcp":
        match = _TCP.match(rest)
        if not match:
            raise TransportError(f"bad address {text!r}: expected tcp:HOST:PORT", ErrorCode.INVALID_ARGUMENT)
        return Address("tcp", host=match["v6"] or match["host"], port=_port(text, match["port"], 65535))
    raise TransportError(f"bad address {text!r}: unknown kind {kind!r} (vsock, unix or tcp)",
                         ErrorCode.INVALID_ARGUMENT)


def _port(text: str, port: str, limit: int) -> int:
    value = int(port)
    if not 0 <= value <= limit:
        raise TransportError(f"bad address {text!r}: port {value} out of range", ErrorCode.INVALID_ARGUMENT)
    return value


def read_secret(path: str) -> bytes:
    """Read a machine secret from a file that only its owner may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TransportError(f"cannot read the secret file {path}: {exc.strerror}",
                             ErrorCode.INVALID_ARGUMENT) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise TransportError(f"the secret file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                                 f"chmod 600 it", ErrorCode.PERMISSION_DENIED)
        secret = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(secret) < 16:
        raise TransportError(f"the secret in {path} is too short (at least 16 bytes)", ErrorCode.INVALID_ARGUMENT)
    return secret


def write_secret(path: str) -> bytes:
    """Create a new random secret file, mode 0600, and return the secret."""
    secret = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret + b"\n")
    finally:
        os.close(fd)
    return secret


def proof(secret: bytes, nonce: bytes) -> bytes:
    """The token proof: HMAC-SHA256 of the server's nonce, keyed with the machine's secret."""
    return hmac.new(secret, b"boxpark-proof-v1\0" + nonce, hashlib.sha256).digest()


# ------------------------------------------------------------------------------------- sockets


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


# ------------------------------------------------------------------------------------- channel


class _FrameProtocol(asyncio.Protocol):
    """Feeds received bytes to a `FrameDecoder` and queues the decoded messages for `Channel.recv`.

    On a server's connection, until `lift_guard`, frames are capped at MAX_HANDSHAKE_FRAME and only the
    `handshake_frames` the handshake needs are decoded; then reading pauses, so whatever the peer sent
    behind them waits in the kernel until it has proved itself.
    """

    def __init__(self, handshake_frames: int | None = None) -> None:
        self.decoder = FrameDecoder()
        self.guard = handshake_frames  # frames still to decode before the guard holds; None: no guard
        self.held = False
        if handshake_frames is not None:
            self.decoder.set_max_frame(protocol.MAX_HANDSHAKE_FRAME)
        self.messages: collections.deque[Message | BaseException] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.eof = False
        self.eof_waiters: list[asyncio.Future[None]] = []  # Channel.wait_eof
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        self.write_paused = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.broken = False
        self.raw_sink: Callable[[bytes], None] | None = None
        self.fast_path: Callable[[Message], bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.raw_sink is not None:
            self.raw_sink(data)
            return
        if self.broken:
            return
        self.decoder.feed(data)
        self._decode()

    def _decode(self) -> None:
        try:
            while self.guard != 0 and (message := self.decoder.next_message()) is not None:
                if self.guard is not None:
                    self.guard -= 1
                # A quick call answered right here saves a task wake-up per call; only while the
                # connection's task is idle in recv(), so replies keep the order of the requests.
                if (self.fast_path is not None and self.waiter is not None and not self.messages
                        and self.fast_path(message)):
                    continue
                self.messages.append(message)
        except ProtocolError as exc:
            self.broken = True  # what is buffered stays: an upgrade call before it takes it as raw bytes
            self.messages.append(exc)
        if self.transport is not None and not self.paused and not self.held:
            if self.guard == 0:
                self.held = True
                self.transport.pause_reading()
            elif len(self.messages) > 64:
                self.paused = True
                self.transport.pause_reading()
        self._wake()

    def lift_guard(self) -> None:
        """The peer is authenticated: full-size frames from now on, and read on."""
        if self.guard is None:
            return
        self.guard = None
        self.decoder.set_max_frame(protocol.MAX_FRAME)
        if self.held:
            self.held = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        if not self.broken and self.raw_sink is None:
            self._decode()  # the frames that arrived behind the handshake

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # keep our writing side open: the peer half-closed

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()
        for waiter in self.drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for waiter in self.drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.drain_waiters.clear()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if self.eof and self.eof_waiters:
            for waiter in self.eof_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self.eof_waiters.clear()


class Channel:
    """Framed messages over one connection: `send`, `await recv()`, `await drain()`, `close()`."""

    def __init__(self, transport: asyncio.Transport, protocol_: _FrameProtocol, peer: str) -> None:
        self._transport = transport
        self._protocol = protocol_
        self.peer = peer
        self.hello: Hello | None = None

    @classmethod
    async def from_socket(cls, sock: socket.socket, peer: str = "", *,
                          handshake_frames: int | None = None) -> Channel:
        """A channel over a connected socket; `handshake_frames` guards a server's side until `Welcome`
        (small frames only, and no more than that many of them: see `_FrameProtocol`)."""
        loop = asyncio.get_running_loop()
        transport, proto = await loop.connect_accepted_socket(
            lambda: _FrameProtocol(handshake_frames), sock)
        return cls(transport, proto, peer)

    def lift_guard(self) -> None:
        """The peer has proved itself (the server's side, at `Welcome`): full-size frames from now on."""
        self._protocol.lift_guard()

    def set_fast_path(self, handler: Callable[[Message], bool] | None) -> None:
        """Let `handler(message)` answer a message as it arrives (return True) instead of queueing it."""
        self._protocol.fast_path = handler

    def set_send_buffer(self, size: int) -> None:
        """Let up to `size` bytes of sent frames wait in the kernel (SO_SNDBUF, within net.core.wmem_max) and
        as many in the write buffer before `drain()` waits: for a stream that must ride out a reader's pauses."""
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            except OSError:  # not every socket family takes it (vsock has its own buffer size)
                pass
        self._transport.set_write_buffer_limits(high=size)

    def send(self, message: Message) -> None:
        """Queue one message; call `drain()` now and then when sending many."""
        if not self._transport.is_closing():
            self._transport.write(protocol.encode(message))

    def send_bytes(self, data: bytes) -> None:
        """Queue already-encoded frames."""
        if not self._transport.is_closing():
            self._transport.write(data)

    async def drain(self) -> None:
        """Wait while the peer is slow to read (write-buffer flow control)."""
        proto = self._protocol
        if proto.write_paused and not self._transport.is_closing():
            waiter = asyncio.get_running_loop().create_future()
            proto.drain_waiters.append(waiter)
            await waiter

    async def recv(self) -> Message | None:
        """The next message, or None at end of stream; raises `ProtocolError` on a bad frame."""
        proto = self._protocol
        while not proto.messages:
            if proto.eof:
                return None
            proto.waiter = asyncio.get_running_loop().create_future()
            try:
                await proto.waiter
            finally:
                proto.waiter = None
        item = proto.messages.popleft()
        if proto.paused and len(proto.messages) < 16 and not proto.held:
            proto.paused = False
            self._transport.resume_reading()
        if isinstance(item, BaseException):
            raise item
        return item

    async def recv_expect(self, *types: type[Message]) -> Message:
        """The next message, which must be one of `types`; an `Error` reply is raised as `RemoteError`."""
        message = await self.recv()
        if message is None:
            raise TransportError(f"{self.peer or 'the peer'} closed the connection")
        if isinstance(message, Error) and Error not in types:
            raise RemoteError(message.code, message.message)
        if not isinstance(message, types):
            raise ProtocolError(f"expected {' or '.join(t.__name__ for t in types)}, got {type(message).__name__}",
                                ErrorCode.UNSUPPORTED)
        return message

    async def wait_eof(self) -> None:
        """Return once the peer has closed its side or the connection is lost, taking no message: how a
        long call notices that its client went away."""
        proto = self._protocol
        if not proto.eof:
            waiter = asyncio.get_running_loop().create_future()
            proto.eof_waiters.append(waiter)
            try:
                await waiter
            finally:  # a call that ended first: its waiter must not pile up on a long connection
                if waiter in proto.eof_waiters:
                    proto.eof_waiters.remove(waiter)

    @property
    def at_eof(self) -> bool:
        return self._protocol.eof and not self._protocol.messages

    def write_eof(self) -> None:
        if not self._transport.is_closing() and self._transport.can_write_eof():
            self._transport.write_eof()

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    async def wait_closed(self) -> None:
        await self._protocol.closed

    def take_socket(self) -> tuple[socket.socket, bytes]:
        """Leave framing: return a blocking duplicate of the socket and the bytes read past the last frame.

        The channel is closed; the connection lives on in the returned socket.
        """
        proto = self._protocol
        transport = self._transport
        transport.pause_reading()
        leftover = proto.decoder.detach()
        sock: socket.socket = transport.get_extra_info("socket")
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        proto.raw_sink = lambda data: None
        transport.abort()
        dup.setblocking(True)
        return dup, leftover


class RemoteError(Exception):
    """The other side answered a call with an `Error`: `code` says why, the text says what to do."""

    def __init__(self, code: ErrorCode | int, message: str) -> None:
        super().__init__(message)
        try:
            self.code = ErrorCode(code)
        except ValueError:
            self.code = ErrorCode.INTERNAL
        self.message = message

    def __str__(self) -> str:
        return self.message


# ------------------------------------------------------------------------------------ handshake


async def client_handshake(channel: Channel, address: Address, secret: bytes | None,
                           hello: Hello | None = None, then: Message | None = None) -> Welcome:
    """Send `Hello` (and the token proof on tcp); return the server's `Welcome` or raise.

    `then` is a first request sent without waiting for `Welcome` (saving a round trip on every new
    connection); its reply follows the `Welcome`.
    """
    if address.needs_secret and not secret:
        raise TransportError(f"{address} needs the machine's secret (a secret file) to connect",
                             ErrorCode.UNAUTHENTICATED)
    channel.send(hello or Hello())
    if then is not None and not secret:  # with a secret a Challenge may come first (also through a forward)
        channel.send(then)
        then = None
    try:
        reply = await asyncio.wait_for(channel.recv_expect(Welcome, Challenge), HANDSHAKE_TIMEOUT)
        if isinstance(reply, Challenge):
            if not secret:
                raise TransportError(f"{address} asks for a token proof and no secret was given",
                                     ErrorCode.UNAUTHENTICATED)
            channel.send(Proof(hmac=proof(secret, reply.nonce)))
            if then is not None:
                channel.send(then)
            reply = await asyncio.wait_for(channel.recv_expect(Welcome), HANDSHAKE_TIMEOUT)
    except RemoteError as exc:
        raise TransportError(f"{address} refused the connection: {exc.message}", exc.code) from None
    except asyncio.TimeoutError:
        raise TransportError(f"{address} did not complete the handshake in {HANDSHAKE_TIMEOUT:.0f} s") from None
    except ProtocolError as exc:
        raise TransportError(f"{address} is not a Boxpark endpoint: {exc}", ErrorCode.BAD_FRAME) from None
    assert isinstance(reply, Welcome)
    if reply.version != protocol.PROTOCOL_VERSION:
        raise TransportError(f"{address} speaks protocol {reply.version}, this side {protocol.PROTOCOL_VERSION}",
                             ErrorCode.VERSION_MISMATCH)
    return reply


async def server_handshake(channel: Channel, *, require_proof: bool, secret: bytes | None,
                           welcome: Welcome) -> Hello | None:
    """Receive `Hello` (and check the token proof); reply `Welcome`, or an `Error` and return None."""

    def expire() -> None:  # a timer, not wait_for: no extra task on every new connection
        channel.send(protocol.error(ErrorCode.TIMEOUT, "handshake timed out"))
        channel.close()  # recv() below then sees the end of the stream

    timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, expire)
    try:
        hello = await channel.recv()
        if not isinstance(hello, Hello):
            what = "nothing" if hello is None else type(hello).__name__
            channel.send(protocol.error(ErrorCode.BAD_FRAME, f"expected Hello first, got {what}"))
            return None
        if hello.version != protocol.PROTOCOL_VERSION:
            channel.send(protocol.error(ErrorCode.VERSION_MISMATCH,
                                        f"protocol {hello.version} is not supported; this guest speaks "
                                        f"{protocol.PROTOCOL_VERSION}"))
            return None
        if require_proof:
            assert secret is not None
            nonce = secrets.token_bytes(32)
            channel.send(Challenge(nonce=nonce))
            answer = await channel.recv()
            if not isinstance(answer, Proof) or not hmac.compare_digest(answer.hmac, proof(secret, nonce)):
                channel.send(protocol.error(ErrorCode.UNAUTHENTICATED, "wrong or missing token proof"))
                return None
    except ProtocolError as exc:
        channel.send(protocol.error(exc.code, str(exc)))
        return None
    finally:
        timer.cancel()
    channel.send(welcome)
    channel.hello = hello
    channel.lift_guard()
    return hello


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


def _raw_call(address: Address, request: Message, secret: bytes | None,
              hello: Hello | None) -> Generator[bytes | int, bytes, None]:
    """The client side of one upgrade call, without I/O: yields bytes to send, or a count of bytes to read
    (and is sent them back); returns once the call's `Ok` is read. Frames are read exactly (header, then
    body), so no byte of the raw stream that follows is ever taken."""

    def next_message() -> Generator[bytes | int, bytes, Message]:
        (length,) = protocol.HEADER.unpack((yield 4))
        if length > protocol.MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes is over the limit")
        return protocol.decode_body((yield length))

    first = protocol.encode(hello or Hello())
    if not secret:
        first += protocol.encode(request)  # no proof can be asked for: the request rides with the Hello
    yield first
    reply = yield from next_message()
    if isinstance(reply, Challenge):
        if not secret:
            raise TransportError(f"{address} asks for a token proof and no secret was given",
                                 ErrorCode.UNAUTHENTICATED)
        yield protocol.encode(Proof(hmac=proof(secret, reply.nonce))) + protocol.encode(request)
        reply = yield from next_message()
    if isinstance(reply, Error):
        raise TransportError(f"{address} refused the connection: {reply.message}", reply.code)
    if not isinstance(reply, Welcome):
        raise TransportError(f"{address} is not a Boxpark endpoint (got {type(reply).__name__})",
                             ErrorCode.BAD_FRAME)
    reply = yield from next_message()
    if isinstance(reply, Error):
        raise RemoteError(reply.code, reply.message)
    if not isinstance(reply, protocol.Ok):
        raise TransportError(f"{address} answered {type(reply).__name__} instead of Ok", ErrorCode.BAD_FRAME)


def _raw_failure(address: Address, exc: BaseException, expired: bool, timeout: float) -> BaseException:
    """What a failed raw call raises: a TransportError naming the address and why, or `exc` itself."""
    if expired and isinstance(exc, (TransportError, OSError)):
        return TransportError(f"{address} did not answer within {timeout:g} s", ErrorCode.TIMEOUT)
    if isinstance(exc, ProtocolError):
        return TransportError(f"{address} sent a bad frame: {exc}", ErrorCode.BAD_FRAME)
    if isinstance(exc, OSError):
        return TransportError(f"{address}: {exc}")
    return exc


async def open_raw(address: Address | str, request: Message, *, secret: bytes | None = None,
                   hello: Hello | None = None, timeout: float = 10.0,
                   sock: socket.socket | None = None) -> socket.socket:
    """One connection that makes one upgrade call (e.g. `Connect`) and returns the raw socket after its `Ok`.

    The lean path for asyncio code: no channel or protocol objects, the request right behind the handshake.
    """
    if isinstance(address, str):
        address = parse_address(address)
    loop = asyncio.get_running_loop()
    sock = sock if sock is not None else await dial_socket(address, timeout)  # `sock`: as for `dial`
    sock.setblocking(False)
    expired = False

    def expire() -> None:  # a timer, not wait_for: no extra task per call
        nonlocal expired
        expired = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # the pending recv sees the end of the stream

    timer = loop.call_later(timeout, expire)
    try:
        call = _raw_call(address, request, secret, hello)
        step = next(call)
        while True:
            if isinstance(step, bytes):
                await loop.sock_sendall(sock, step)
                step = next(call)
            else:
                data = b""
                while len(data) < step:
                    chunk = await loop.sock_recv(sock, step - len(data))
                    if not chunk:
                        raise TransportError(f"{address} closed the connection during the call")
                    data += chunk
                step = call.send(data)
    except StopIteration:
        return sock
    except BaseException as exc:
        sock.close()
        raise _raw_failure(address, exc, expired, timeout) from None
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
    deadline = time.monotonic() + timeout
    sock = sock if sock is not None else dial_blocking(address, timeout)  # `sock`: as for `dial`
    try:
        call = _raw_call(address, request, secret, hello)
        step = next(call)
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            if isinstance(step, bytes):
                sock.sendall(step)
                step = next(call)
            else:
                data = b""
                while len(data) < step:
                    chunk = sock.recv(step - len(data))
                    if not chunk:
                        raise TransportError(f"{address} closed the connection during the call")
                    data += chunk
                step = call.send(data)
    except StopIteration:
        sock.settimeout(None)
        return sock
    except BaseException as exc:
        sock.close()
        raise _raw_failure(address, exc, isinstance(exc, TimeoutError), timeout) from None


Handler = Callable[[Channel], Awaitable[None]]


async def serve(address: Address, handler: Handler, *, secret: bytes | None = None,
                welcome: Callable[[], Welcome] = Welcome, sock: socket.socket | None = None,
                peers: Collection[str] | None = None,
                max_pending: int = MAX_PENDING_HANDSHAKES) -> asyncio.AbstractServer:
    """Accept connections on `address`; each completes the handshake, then `handler(channel)` owns it.

    `peers` (tcp only): the only source addresses served; any other connection is closed before a byte of
    it is read. At most `max_pending` connections wait for their `Welcome`; more are closed at once.
    """
    if address.needs_secret and not secret:
        raise TransportError(f"listening on {address} needs a machine secret", ErrorCode.INVALID_ARGUMENT)
    if peers is not None and address.kind != "tcp":
        raise TransportError(f"only a tcp listener can be limited to peers, not {address}",
                             ErrorCode.INVALID_ARGUMENT)
    allowed = None if peers is None else {_canonical_ip(peer) for peer in peers}
    listener = sock if sock is not None else listen_socket(address)
    pending = 0
    proof_frames = 2 if address.needs_secret else 1  # Hello, and Proof when one is asked for

    async def on_connection(client: socket.socket) -> None:
        nonlocal pending
        try:
            channel = await Channel.from_socket(client, str(address), handshake_frames=proof_frames)
        except BaseException:
            pending -= 1
            client.close()
            raise
        try:
            try:
                hello = await server_handshake(channel, require_proof=address.needs_secret, secret=secret,
                                               welcome=welcome())
            finally:
                pending -= 1
            if hello is None:
                channel.close()
                return
            await handler(channel)
        finally:
            channel.close()

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def accept(client: socket.socket) -> None:
        nonlocal pending
        if pending >= max_pending:
            client.close()
            return
        if address.kind == "tcp":
            if allowed is not None:
                try:
                    peer = _canonical_ip(client.getpeername()[0])
                except OSError:  # already gone
                    peer = ""
                if peer not in allowed:
                    client.close()
                    return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending += 1
        task = loop.create_task(on_connection(client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return await _AcceptLoop.start(listener, accept, tasks)


def _canonical_ip(text: str) -> str:
    """One spelling per address, so `::ffff:10.0.2.2` (a v4 peer on a v6 socket) matches `10.0.2.2`."""
    if text.lower().startswith("::ffff:") and "." in text:
        return text[7:]
    if ":" in text:
        try:
            return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
        except OSError:
            return text
    return text


# accept(2) reports some failures of the one connection it was taking; the next one may be fine
_ONE_CONNECTION_FAILED = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                                    errno.ENETUNREACH, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENONET,
                                    errno.ENOPROTOOPT, errno.EOPNOTSUPP})


class _AcceptLoop(asyncio.AbstractServer):
    """A minimal server over a listening socket we made ourselves (so unix mode and vsock are ours).

    Out of fds (or memory), `accept` fails while the listener stays readable: watching it would spin the
    loop at full CPU. It stops watching instead, for a delay that doubles while the shortage lasts, and
    leaves the waiting connections in the kernel's backlog.
    """

    BACKOFF_FIRST = 0.05
    BACKOFF_MAX = 2.0

    def __init__(self, sock: socket.socket, accept: Callable[[socket.socket], None],
                 tasks: set[asyncio.Task[None]]) -> None:
        self._sock = sock
        self._accept = accept
        self._tasks = tasks
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        self._watching = False
        self._backoff = self.BACKOFF_FIRST
        self._retry: asyncio.TimerHandle | None = None

    @classmethod
    async def start(cls, sock: socket.socket, accept: Callable[[socket.socket], None],
                    tasks: set[asyncio.Task[None]]) -> _AcceptLoop:
        server = cls(sock, accept, tasks)
        server._watch()
        return server

    def _watch(self) -> None:
        self._retry = None
        if self._sock.fileno() >= 0 and not self._watching:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._watching = True

    def _on_readable(self) -> None:
        for _ in range(64):
            try:
                client, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ONE_CONNECTION_FAILED:
                    continue
                self._back_off()  # EMFILE, ENFILE, ENOBUFS, ENOMEM, or worse: the listener stays readable
                return
            self._backoff = self.BACKOFF_FIRST
            client.setblocking(False)
            self._accept(client)

    def _back_off(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._sock.fileno())
            self._watching = False
        self._retry = self._loop.call_later(self._backoff, self._watch)
        self._backoff = min(self._backoff * 2, self.BACKOFF_MAX)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._sock.fileno() >= 0:
            if self._watching:
                self._loop.remove_reader(self._sock.fileno())
                self._watching = False
            if self._sock.family == socket.AF_UNIX:
                path = self._sock.getsockname()
                if isinstance(path, str) and path:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
            self._sock.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._sock.fileno() >= 0

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        await self._closed

    async def wait_closed(self) -> None:
        await self._closed

    def close_clients(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def abort_clients(self) -> None:
        self.close_clients()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)
