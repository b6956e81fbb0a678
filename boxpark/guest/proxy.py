"""The connect call: a raw byte stream from the API connection to a unix socket or TCP port in the guest.

The handler dials the target first, so a missing or refusing target is an `Error` reply, never a hang.
Then it replies `Ok`, leaves framing (`Channel.take_socket`) and moves bytes both ways until both sides are
done. Each direction is one thread doing `splice(2)` socket → pipe → socket, so the bytes never enter
Python; when one side ends its stream only that direction is shut down (half-close: `docker run -i` and
`docker attach` depend on it). The threads come from a small pool that keeps idle ones for a while, so a
new connection does not pay for starting threads. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import queue
import socket
import threading
from typing import Callable

from .. import protocol
from ..protocol import ErrorCode
from ..transport import Channel
from .errors import GuestError

log = logging.getLogger("boxpark.guest.proxy")

PIPE_SIZE = 1024 * 1024  # the largest pipe an unprivileged process may ask for (fs.pipe-max-size)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_SPLICE_FLAGS = os.SPLICE_F_MOVE
_IDLE_SECONDS = 60.0


# ------------------------------------------------------------------------------------------ dialing


async def dial_target(message: protocol.Connect) -> socket.socket:
    """Connect to the call's target within its timeout; a blocking socket, or a GuestError saying why not."""
    if (message.path is None) == (message.port is None):
        raise GuestError(ErrorCode.INVALID_ARGUMENT, "connect: give either path or port")
    if not message.timeout > 0:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"connect: timeout {message.timeout} must be positive")
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

    relay = Relay(client, target, leftover, done)
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


class Relay:
    """Two sockets joined both ways by two pooled threads; `done` is called once both directions end."""

    def __init__(self, client: socket.socket, target: socket.socket, first: bytes,
                 done: Callable[[], None]) -> None:
        self.client = client
        self.target = target
        self.first = first  # bytes the client sent past its last frame: they go to the target first
        self.done = done
        self._left = 2
        self._lock = threading.Lock()

    def start(self) -> None:
        _POOL.submit(lambda: self._direction(self.client, self.target, self.first))
        _POOL.submit(lambda: self._direction(self.target, self.client, b""))

    def _direction(self, src: socket.socket, dst: socket.socket, first: bytes) -> None:
        failed = False
        try:
            if first:
                dst.sendall(first)
            pump(src.fileno(), dst.fileno())
        except OSError as exc:
            failed = True
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                log.warning("connect relay: %s", exc)
        finally:
            _shutdown(dst, socket.SHUT_WR)  # end of this direction only: the other goes on (half-close)
            if failed:
                _shutdown(src, socket.SHUT_RD)
            self._finished()

    def _finished(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.close_now()
            self.done()

    def abort(self) -> None:
        """Wake both threads (they see end of stream) so they finish and close everything."""
        _shutdown(self.client, socket.SHUT_RDWR)
        _shutdown(self.target, socket.SHUT_RDWR)

    def close_now(self) -> None:
        self.client.close()
        self.target.close()


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


class _Pipes(threading.local):
    """One pipe per relay thread, reused across connections (it is always empty between them)."""

    pair: tuple[int, int] | None = None


_pipes = _Pipes()


def _pipe() -> tuple[int, int]:
    if _pipes.pair is None:
        read, write = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(write, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe still works, with more system calls
        _pipes.pair = (read, write)
    return _pipes.pair


def pump(src: int, dst: int) -> int:
    """Move bytes from `src` to `dst` (blocking fds) until `src` ends; return how many moved.

    splice(2) through a pipe keeps the bytes in the kernel; an fd that cannot splice gets a plain copy.
    """
    read_end, write_end = _pipe()
    total = 0
    try:
        while True:
            try:
                moved = os.splice(src, write_end, PIPE_SIZE, flags=_SPLICE_FLAGS)
            except OSError as exc:
                if exc.errno == errno.EINVAL and total == 0:
                    return _copy(src, dst)
                raise
            if moved == 0:
                return total
            total += moved
            while moved:
                moved -= os.splice(read_end, dst, moved, flags=_SPLICE_FLAGS)
    except OSError:
        _drop_pipe()
        raise


def _drop_pipe() -> None:
    """After a failure mid-splice the pipe may still hold bytes for a dead peer: this thread gets a new one."""
    if _pipes.pair is not None:
        for fd in _pipes.pair:
            os.close(fd)
        _pipes.pair = None


def _copy(src: int, dst: int) -> int:
    buffer = bytearray(256 * 1024)
    view = memoryview(buffer)
    total = 0
    while True:
        got = os.readv(src, [buffer])
        if not got:
            return total
        total += got
        sent = 0
        while sent < got:
            sent += os.write(dst, view[sent:got])


# -------------------------------------------------------------------------------------- thread pool


class _Pool:
    """Threads that run relay directions; idle ones wait for the next job a while, then exit.

    Unlike a fixed-size executor it never queues a job behind a long-lived connection: when no thread is
    idle it starts one (a relay direction lives as long as its connection).
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                self._jobs.put(job)
                return
        threading.Thread(target=self._worker, args=(job,), name="connect-relay", daemon=True).start()

    def _worker(self, job: Callable[[], None]) -> None:
        while True:
            try:
                job()
            except Exception:  # a relay bug must not kill the thread silently
                log.exception("connect relay failed")
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    # a job may have been handed to us between the timeout and the lock
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        return


_POOL = _Pool()
