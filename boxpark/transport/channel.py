"""`Channel`: framed messages (the `protocol` codec) over one asyncio connection.

It can hand the raw socket over for an upgrade call (`take_socket`). On a server's side, until the peer has
proved itself (`lift_guard`), it decodes only the few small frames the handshake needs and then stops
reading, so an unauthenticated peer cannot make it hold more. Nothing here knows what messages mean.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import threading
from typing import Callable

from .. import protocol
from ..protocol import Error, ErrorCode, FrameDecoder, Hello, Message, ProtocolError, RemoteError
from .address import TransportError


_READ_SIZE = 256 * 1024
_read_buffers = threading.local()


def _read_buffer() -> memoryview:
    """This thread's buffer that every channel's transport reads into (see `_FrameProtocol.get_buffer`)."""
    view: memoryview | None = getattr(_read_buffers, "view", None)
    if view is None:
        view = _read_buffers.view = memoryview(bytearray(_READ_SIZE))
    return view


class _FrameProtocol(asyncio.BufferedProtocol):
    """Feeds received bytes to a `FrameDecoder` and queues the decoded messages for `Channel.recv`.

    The transport reads into one buffer per thread, which is consumed before the read returns: a plain
    `Protocol` would get a new bytes object of the transport's read size (256 KiB) for every read, which
    the C library maps and unmaps each time (three system calls and a page fault, per message).

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
        self.broken = False
        self.raw_sink: Callable[[bytes], None] | None = None
        self.fast_path: Callable[[Message], bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        data = _read_buffer()[:nbytes]
        if self.raw_sink is not None:
            self.raw_sink(bytes(data))
            return
        if self.broken:
            return
        self.decoder.feed(data)  # copied out of the shared buffer here
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
        if self.messages:  # not for what the fast path answered: the task would wake to find nothing
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
        self.fast_path = None  # its closure holds the channel, which holds us: no cycle left for the GC
        self._wake()
        for waiter in self.drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

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

    def write_eof(self) -> None:
        if not self._transport.is_closing() and self._transport.can_write_eof():
            self._transport.write_eof()

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

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
