"""sd_notify sockets for the Guest API: `NotifyHub` binds them, keeps what services send, streams it.

A service (dockerd) finds its socket through NOTIFY_SOCKET and sends datagrams of newline-separated
`KEY=VALUE` lines (the systemd protocol). Each socket is a SOCK_DGRAM unix socket with SO_PASSCRED, so the
kernel tells us who sent each datagram. A socket belongs to the hub, which lives as long as the server: a
host that reconnects re-attaches by path and resumes from the last sequence number it saw, losing nothing
the ring still holds. `parse_notify` is the pure parser (bytes in, `NotifyMessage` out). File descriptors a
sender passes (FDSTORE, the barrier pipe of `systemd-notify`) are closed at once: we keep no fds for
anyone, and closing the barrier pipe is what lets a waiting sender go on.
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import os
import re
import socket
import stat
import struct
import time

from .. import protocol
from ..protocol import ErrorCode, NotifyMessage
from ..transport import Channel
from .errors import GuestError, from_oserror

log = logging.getLogger("boxpark.guest.notify")

RING_SIZE = 4096
"""Messages kept per socket; a listener further behind sees a gap in the sequence numbers."""

MAX_DATAGRAM = 64 * 1024  # systemd itself takes at most a pipe buffer's worth; longer ones are dropped
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(253 * 4)  # creds + SCM_MAX_FD fds
_KEY = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
_FLAGS = {"READY": "ready", "RELOADING": "reloading", "STOPPING": "stopping", "WATCHDOG": "watchdog"}
_NUMBERS = {"MAINPID": ("mainpid", 1), "ERRNO": ("errno", 0), "EXTEND_TIMEOUT_USEC": ("extend_timeout_usec", 0)}


def parse_notify(datagram: bytes, *, seq: int = 0, pid: int = 0, uid: int = 0, gid: int = 0,
                 time_ns: int = 0) -> NotifyMessage:
    """Parse one sd_notify datagram; malformed lines are skipped, never an error.

    `fields` keeps every well-formed line raw (the first of a repeated key wins, as in systemd); the flags
    are set by `KEY=1` lines. `watchdog` is the keep-alive `WATCHDOG=1`; `WATCHDOG=trigger` (the service
    asks to be treated as hung) stays in `fields` for the host to act on. Numbers that do not parse are
    left None (and stay in `fields`).
    """
    fields: dict[str, str] = {}
    parsed: dict[str, object] = {}
    for line in datagram.split(b"\n"):
        key, sep, value = line.partition(b"=")
        if not sep or not _KEY.fullmatch(key) or b"\0" in value:
            continue
        try:
            name, text = key.decode("ascii"), value.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if name in _FLAGS and text == "1":
            parsed[_FLAGS[name]] = True
        if name in fields:
            continue
        fields[name] = text
        if name == "STATUS":
            parsed["status"] = text
        elif name in _NUMBERS:
            attribute, least = _NUMBERS[name]
            if text.isascii() and text.isdigit() and int(text) >= least:
                parsed[attribute] = int(text)
    return NotifyMessage(seq=seq, pid=pid, uid=uid, gid=gid, time_ns=time_ns, fields=fields,
                         **parsed)  # type: ignore[arg-type]


class _NotifySocket:
    """One bound socket, its ring of messages and the listeners waiting for more."""

    def __init__(self, path: str, sock: socket.socket, ring_size: int) -> None:
        self.path = path
        self.sock = sock
        self.ring: collections.deque[NotifyMessage] = collections.deque(maxlen=ring_size)
        self.seq = 0
        self.waiters: set[asyncio.Future[None]] = set()
        self.closed = False

    def since(self, seq: int) -> list[NotifyMessage]:
        return [message for message in self.ring if message.seq > seq]

    def wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()

    def on_readable(self) -> None:
        got = False
        while True:
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(MAX_DATAGRAM, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("notify socket %s: %s", self.path, exc)
                break
            pid = uid = gid = 0
            for level, kind, payload in ancillary:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    pid, uid, gid = _UCRED.unpack_from(payload)
                elif kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
            if flags & socket.MSG_TRUNC:
                log.warning("notify socket %s: a datagram over %d bytes from pid %d was dropped",
                            self.path, MAX_DATAGRAM, pid)
                continue
            message = parse_notify(data, seq=self.seq + 1, pid=pid, uid=uid, gid=gid, time_ns=time.time_ns())
            if not message.fields or list(message.fields) == ["BARRIER"]:
                continue  # nothing we understood, or only a barrier (its pipe is already closed)
            self.seq += 1
            self.ring.append(message)
            got = True
        if got:
            self.wake()


class NotifyHub:
    """Every sd_notify socket the server has bound, by path; they live until `close()`."""

    def __init__(self, ring_size: int = RING_SIZE) -> None:
        self._ring_size = ring_size
        self._sockets: dict[str, _NotifySocket] = {}

    def socket_for(self, path: str) -> _NotifySocket:
        """The socket at `path`, bound now if this hub has none there yet."""
        entry = self._sockets.get(path)
        if entry is None:
            entry = self._bind(path)
            self._sockets[path] = entry
        return entry

    def _bind(self, path: str) -> _NotifySocket:
        encoded = os.fsencode(path)
        if not path.startswith("/") or b"\0" in encoded or len(encoded) > 107:
            raise GuestError(ErrorCode.INVALID_ARGUMENT,
                             f"notify_listen {path!r}: need an absolute path of at most 107 bytes")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            try:
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    raise GuestError(ErrorCode.ALREADY_EXISTS,
                                     f"notify_listen {path}: a file that is not a socket is in the way")
                os.unlink(path)  # a socket left by an earlier server: this hub owns the path now
            except FileNotFoundError:
                pass
            sock.bind(path)
            os.chmod(path, 0o666)  # services that run as other users must be able to send
        except OSError as exc:
            sock.close()
            raise from_oserror(exc, f"notify_listen {path}") from None
        except BaseException:
            sock.close()
            raise
        entry = _NotifySocket(path, sock, self._ring_size)
        asyncio.get_running_loop().add_reader(sock.fileno(), entry.on_readable)
        return entry

    async def listen(self, channel: Channel, message: protocol.NotifyListen) -> None:
        """The `NotifyListen` call: `Ok`, then every message after `since`, following until the client goes.

        A `since` past this socket's last number comes from an earlier server: the stream starts at 1.
        """
        entry = self.socket_for(message.path)
        channel.send(protocol.Ok())
        since = message.since
        if since > entry.seq:
            # numbers from before this server (the guest rebooted, the server restarted): this socket's
            # messages are all new to that client
            since = 0
        peer = asyncio.ensure_future(channel.recv())  # anything from the client, or its EOF, ends the stream
        loop = asyncio.get_running_loop()
        try:
            while not entry.closed:
                for notify in entry.since(since):
                    channel.send(notify)
                    since = notify.seq
                await channel.drain()
                waiter: asyncio.Future[None] = loop.create_future()
                entry.waiters.add(waiter)
                try:
                    await asyncio.wait({waiter, peer}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    entry.waiters.discard(waiter)
                if peer.done():
                    return None
        finally:
            if peer.done() and not peer.cancelled():
                peer.exception()  # a client that talks out of turn just ends its stream
            peer.cancel()
        return None

    def close(self) -> None:
        """Close every socket, remove its path and end the streams."""
        for entry in self._sockets.values():
            entry.closed = True
            try:
                asyncio.get_running_loop().remove_reader(entry.sock.fileno())
            except (RuntimeError, ValueError):
                pass
            entry.sock.close()
            try:
                os.unlink(entry.path)
            except OSError:
                pass
            entry.wake()
        self._sockets.clear()
