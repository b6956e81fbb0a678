"""The accept loop: `serve(address, handler)` hands each connection, once its handshake is done, to `handler`.

A listener bounds what a peer costs it before `Welcome`, whoever the peer is: frames of MAX_HANDSHAKE_FRAME,
no more of them than the handshake needs, MAX_PENDING_HANDSHAKES connections at once, HANDSHAKE_TIMEOUT; a
tcp listener may serve only given source addresses. Out of fds, it backs off rather than spin.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Awaitable, Callable, Collection

from ..protocol import ErrorCode, ServerHandshake, Welcome
from .address import Address, TransportError
from .channel import Channel
from .handshake import server_handshake
from .sockets import listen_socket

MAX_PENDING_HANDSHAKES = 512
"""Connections a listener holds before their `Welcome`; more are closed at once. Each costs an fd and a few
KiB (frames are capped at MAX_HANDSHAKE_FRAME until `Welcome`), so the cap is set well above a legitimate
burst: without vsock, every Docker connection the host forwards comes through this handshake."""


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
    handshake_frames = ServerHandshake.frames(proof=address.needs_secret)

    async def on_connection(client: socket.socket) -> None:
        nonlocal pending
        try:
            channel = await Channel.from_socket(client, str(address), handshake_frames=handshake_frames)
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
