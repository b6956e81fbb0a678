"""The listen call: a unix socket in the guest whose connections the host takes, one raw stream each.

The reverse of `connect` (a host service, such as the host's SSH agent, seen as a socket in the guest),
without the guest ever dialing the host: `Listen(path)` binds the socket and streams `Accepted(id)` for each
connection to it; the host answers with a `TakeConnection(id)` call of its own, which this module joins to
the waiting connection through the shared `relay`. Everything is bounded here, not by the host: listeners,
connections waiting per listener (the oldest is closed beyond `MAX_PENDING`), and how long one waits
(`TAKE_WITHIN`). The socket file, its listener and its waiting connections go when the `Listen` stream's
client does. Every socket on the loop is non-blocking: nothing here waits on a guest process or the host.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import socket
import stat

from .. import protocol
from ..protocol import ErrorCode
from .proxy import relay_call
from ..transport import Channel
from .errors import GuestError

log = logging.getLogger("boxpark.guest.listen")

MAX_LISTENERS = 16  # host services: the SSH agent and a few more, never one per client
MAX_PENDING = 32  # connections accepted and not yet taken, per listener; beyond it the oldest is closed
TAKE_WITHIN = 30.0  # seconds an accepted connection waits for its `TakeConnection` before it is closed
BACKLOG = 16


class _Listener:
    """One bound socket, its stream's channel and the connections it accepted that the host has not taken."""

    def __init__(self, path: str, sock: socket.socket, channel: Channel) -> None:
        self.path = path
        self.sock = sock
        self.channel = channel
        self.pending: collections.OrderedDict[int, tuple[socket.socket, asyncio.TimerHandle]] = (
            collections.OrderedDict())
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.identity = os.stat(path).st_ino  # so closing never unlinks a socket someone else bound since


class Listeners:
    """Every `Listen` socket of the server, and the connections they hold for the host."""

    def __init__(self, max_listeners: int = MAX_LISTENERS, max_pending: int = MAX_PENDING,
                 take_within: float = TAKE_WITHIN) -> None:
        self.max_listeners = max_listeners
        self.max_pending = max_pending
        self.take_within = take_within
        self._listeners: dict[str, _Listener] = {}
        self._owner: dict[int, _Listener] = {}  # a waiting connection's id → its listener
        self._ids = itertools.count(1)

    async def listen(self, channel: Channel, message: protocol.Listen) -> None:
        """The `Listen` call: bind, `Ok`, an `Accepted` per connection, until the client goes away."""
        path = _check_path(message.path)
        if not 0 <= message.mode <= 0o777:
            raise GuestError(ErrorCode.INVALID_ARGUMENT, f"listen: mode {message.mode:o} is not a permission mode")
        previous = self._listeners.get(path)
        if previous is not None:  # the host came back (its old stream may not have noticed yet): take over
            self._close(previous)
        elif len(self._listeners) >= self.max_listeners:
            raise GuestError(ErrorCode.UNAVAILABLE,
                             f"listen {path}: this guest already has {self.max_listeners} listening sockets")
        sock = _bind(path, message.mode)
        listener = _Listener(path, sock, channel)
        self._listeners[path] = listener
        try:
            channel.send(protocol.Ok())
            acceptor = asyncio.ensure_future(self._accepting(listener))
            peer = asyncio.ensure_future(channel.recv())  # anything from the client, or its EOF, ends it
            try:
                await asyncio.wait({peer, acceptor, listener.ended}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (peer, acceptor):
                    if task.done() and not task.cancelled():
                        task.exception()  # a client that talks out of turn just ends its stream
                    task.cancel()
        finally:
            self._close(listener)
        return None

    async def take(self, channel: Channel, message: protocol.TakeConnection) -> None:
        """The `TakeConnection` call: `Ok`, then the waiting connection's bytes both ways until both are done."""
        listener = self._owner.pop(message.id, None)
        entry = listener.pending.pop(message.id, None) if listener is not None else None
        if entry is None:
            raise GuestError(ErrorCode.NOT_FOUND,
                             f"take connection {message.id}: no such connection waits (taken, timed out or closed)")
        conn, timer = entry
        timer.cancel()
        conn.setblocking(True)
        await relay_call(channel, conn)

    def close(self) -> None:
        for listener in list(self._listeners.values()):
            self._close(listener)

    def status(self) -> dict[str, int]:
        """Listening sockets and waiting connections (what the tests check comes back to nothing)."""
        return {"listeners": len(self._listeners), "pending": len(self._owner)}

    # ------------------------------------------------------------------------------------------ inside

    async def _accepting(self, listener: _Listener) -> None:
        """Accept (non-blocking) and announce each connection; while the host is slow to read its `Accepted`s,
        stop accepting, so what waits for it is bounded by the socket's backlog, not by a growing buffer."""
        loop = asyncio.get_running_loop()
        fd = listener.sock.fileno()
        while True:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
            try:
                await readable
            finally:
                if listener.sock.fileno() >= 0:  # else `_close` removed it: the number may be another's now
                    loop.remove_reader(fd)
            for _ in range(BACKLOG):
                try:
                    conn, _ = listener.sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # EMFILE and the like: close the listener rather than spin on it
                    log.warning("listen %s: accept failed: %s", listener.path, exc)
                    return
                self._announce(listener, conn)
            await listener.channel.drain()

    def _announce(self, listener: _Listener, conn: socket.socket) -> None:
        conn.setblocking(False)
        if len(listener.pending) >= self.max_pending:
            oldest, (old, timer) = listener.pending.popitem(last=False)
            self._owner.pop(oldest, None)
            timer.cancel()
            old.close()
        ident = next(self._ids)
        timer = asyncio.get_running_loop().call_later(self.take_within, self._expire, listener, ident)
        listener.pending[ident] = (conn, timer)
        self._owner[ident] = listener
        listener.channel.send(protocol.Accepted(id=ident))

    def _expire(self, listener: _Listener, ident: int) -> None:
        entry = listener.pending.pop(ident, None)
        self._owner.pop(ident, None)
        if entry is not None:
            entry[0].close()

    def _end(self, listener: _Listener) -> None:
        if not listener.ended.done():
            listener.ended.set_result(None)

    def _close(self, listener: _Listener) -> None:
        """Unbind, remove the socket file (if it is still ours) and close what waits; end the stream."""
        self._end(listener)
        if self._listeners.get(listener.path) is listener:
            del self._listeners[listener.path]
        if listener.sock.fileno() >= 0:
            with contextlib.suppress(RuntimeError):  # before the close: the acceptor's cancel runs later
                asyncio.get_running_loop().remove_reader(listener.sock.fileno())
            with contextlib.suppress(OSError):
                if os.stat(listener.path).st_ino == listener.identity:
                    os.unlink(listener.path)
            listener.sock.close()
        for ident, (conn, timer) in listener.pending.items():
            self._owner.pop(ident, None)
            timer.cancel()
            conn.close()
        listener.pending.clear()


def _check_path(path: str) -> str:
    encoded = os.fsencode(path)
    if not encoded.startswith(b"/") or b"\0" in encoded or len(encoded) > 107:
        raise GuestError(ErrorCode.INVALID_ARGUMENT,
                         f"listen: {path!r} is not an absolute unix socket path (at most 107 bytes)")
    return os.path.normpath(path)


def _bind(path: str, mode: int) -> socket.socket:
    """A non-blocking listening socket at `path`: its directory made, a stale socket (never a file) replaced."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise GuestError(ErrorCode.ALREADY_EXISTS, f"listen {path}: something other than a socket is there")
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        sock.bind(path)
        os.chmod(path, mode)  # after bind: the umask must not narrow who may use it
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock
