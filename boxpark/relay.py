"""Joining two sockets both ways: the data path of the guest's `connect` and the host's proxies.

Shared by guest and host (like `protocol` and `transport`). Each direction is one thread doing splice(2)
socket → pipe → socket, so the bytes never enter Python (measured 0.5–0.7× a direct copy here; asyncio's
non-blocking splice 0.3–0.55×); where there is no splice (macOS) a plain copy. When one side ends its
stream only that direction is shut down: half-close, which `docker run -i` and `docker attach` rely on.
Threads come from a pool that keeps a few idle ones a while, so a new connection does not pay for starting
one; a thread owns its splice pipe and closes it when it exits, so what a burst leaves behind is at most
`MAX_IDLE` threads and their pipes, and nothing once they have been idle `IDLE_SECONDS`. A new thread is
started without waiting for it to run (`_thread`, not `threading.Thread.start`, which blocks its caller,
often an event loop, until the thread is scheduled: 500 starts held a loop ~1 s under load here).
`DatagramRelay` carries a UDP socket's datagrams over a stream, each behind a 2-byte length (`DATAGRAM`).
`Handoff` relays in a process of its own (`python -m boxpark.relay`): a latency-sensitive forward (the
agent's api.sock) whose relay threads would otherwise wait for the GIL behind a burst's hundreds.
"""

from __future__ import annotations

import _thread
import errno
import fcntl
import logging
import os
import socket
import signal
import struct
import sys
import threading
from typing import Callable

log = logging.getLogger("boxpark.relay")

PIPE_SIZE = 1024 * 1024  # the largest pipe an unprivileged process may ask for (fs.pipe-max-size)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_HAS_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0)
IDLE_SECONDS = 60.0  # an idle pooled thread exits after this long without a job
MAX_IDLE = 16  # idle threads kept beyond this exit at once: a burst of 500 connections leaves 16, not 1,000


class _Joined:
    """Two sockets joined by two pooled threads; `done` is called once, after both have finished."""

    __slots__ = ("client", "target", "first", "done", "_left", "_lock", "__weakref__")

    def __init__(self, client: socket.socket, target: socket.socket, first: bytes,
                 done: Callable[[], None]) -> None:
        self.client = client
        self.target = target
        self.first = first  # bytes the client sent past its last frame: they go to the target first
        self.done = done
        self._left = 2
        self._lock = threading.Lock()

    def _finished(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.close_now()
            # `done` often closes over this relay (to forget it): dropped, it leaves no cycle, so a burst's
            # relays and sockets are freed now, not at the next full collection (the soak's RSS growth)
            done, self.done = self.done, _nothing
            done()

    def abort(self) -> None:
        """Wake both threads (they see end of stream) so they finish and close everything."""
        _shutdown(self.client, socket.SHUT_RDWR)
        _shutdown(self.target, socket.SHUT_RDWR)

    def close_now(self) -> None:
        self.client.close()
        self.target.close()


class Relay(_Joined):
    """Two stream sockets joined both ways, each direction by splice in its own pooled thread."""

    __slots__ = ()

    def start(self) -> None:
        _POOL.submit(lambda: self._direction(self.client, self.target, self.first))
        _POOL.submit(lambda: self._direction(self.target, self.client, b""))

    def run_here(self) -> None:
        """From a pooled thread: the way back on another, the way there in this one (one wake-up fewer)."""
        _POOL.submit(lambda: self._direction(self.target, self.client, b""))
        self._direction(self.client, self.target, self.first)

    def _direction(self, src: socket.socket, dst: socket.socket, first: bytes) -> None:
        failed = False
        try:
            if first:
                dst.sendall(first)
            pump(src.fileno(), dst.fileno())
        except OSError as exc:
            failed = True
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                log.warning("relay: %s", exc)
        finally:
            _shutdown(dst, socket.SHUT_WR)  # end of this direction only: the other goes on (half-close)
            if failed:
                _shutdown(src, socket.SHUT_RD)
            self._finished()


DATAGRAM = struct.Struct("!H")  # the length in front of each datagram on a stream
MAX_DATAGRAM = 65535


def frame_datagram(data: bytes) -> bytes:
    return DATAGRAM.pack(len(data)) + data


class DatagramRelay(_Joined):
    """A stream of framed datagrams (`client`) joined to a connected UDP socket (`target`).

    The stream's end (the peer's flow closed) ends both; a refused datagram (ICMP port unreachable: nothing
    listens yet) is dropped as UDP would, and the flow goes on.
    """

    __slots__ = ()

    def start(self) -> None:
        _POOL.submit(self._to_udp)
        _POOL.submit(self._to_stream)

    def _to_udp(self) -> None:
        buffer = bytearray(self.first)
        try:
            while True:
                while len(buffer) >= DATAGRAM.size:
                    (length,) = DATAGRAM.unpack_from(buffer)
                    if len(buffer) < DATAGRAM.size + length:
                        break
                    try:
                        self.target.send(buffer[DATAGRAM.size:DATAGRAM.size + length])
                    except (ConnectionRefusedError, BlockingIOError):
                        pass
                    del buffer[:DATAGRAM.size + length]
                chunk = self.client.recv(256 * 1024)
                if not chunk:
                    return
                buffer += chunk
        except OSError:
            pass
        finally:
            _shutdown(self.target, socket.SHUT_RDWR)  # wakes the other thread's recv
            self._finished()

    def _to_stream(self) -> None:
        try:
            while True:
                try:
                    data = self.target.recv(MAX_DATAGRAM)
                except ConnectionRefusedError:
                    continue
                if not data:  # shut down: the stream side has ended
                    return
                self.client.sendall(frame_datagram(data))
        except OSError:
            pass
        finally:
            _shutdown(self.client, socket.SHUT_RDWR)
            self._finished()


def _nothing() -> None:
    pass


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
    if not _HAS_SPLICE:
        return _copy(src, dst)
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
    """Close this thread's pipe: after a failure mid-splice (it may still hold bytes for a dead peer: the
    next job gets a new one) and when the thread exits (a thread-local's fds are not closed with it)."""
    pair, _pipes.pair = _pipes.pair, None
    if pair is not None:
        for fd in pair:
            os.close(fd)


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


class _Idle:
    """Where an idle thread waits for its next job."""

    __slots__ = ("job", "ready")

    def __init__(self) -> None:
        self.job: Callable[[], None] | None = None
        self.ready = threading.Event()


class _Pool:
    """Threads that run relay directions; up to `max_idle` idle ones wait for the next job `idle_seconds`,
    then exit, closing their pipe.

    Unlike a fixed-size executor it never queues a job behind a long-lived connection: when no thread is
    idle it starts one (a relay direction lives as long as its connection; bounding connections is the
    listeners' job). The thread idle the shortest takes the next job, so under a trickle of connections
    one thread does the work and the rest of a burst's threads time out (with a shared queue any of them
    could take each job and none would ever be idle long enough to exit).
    """

    def __init__(self, idle_seconds: float = IDLE_SECONDS, max_idle: int = MAX_IDLE) -> None:
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        self.threads = 0  # alive, busy or idle
        self._idle: list[_Idle] = []  # a stack
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                slot = self._idle.pop()
                slot.job = job
                slot.ready.set()
                return
            self.threads += 1
        try:  # like a daemon thread: never waited for at exit
            _thread.start_new_thread(self._worker, (job,))
        except BaseException:
            with self._lock:
                self.threads -= 1
            raise

    def _worker(self, job: Callable[[], None]) -> None:
        slot = _Idle()
        try:
            while True:
                try:
                    job()
                except Exception:  # a relay bug must not kill the thread silently
                    log.exception("relay failed")
                job = None  # an idle thread must not keep its last relay (and its sockets) alive
                with self._lock:
                    if len(self._idle) >= self.max_idle:
                        return
                    slot.job = None
                    slot.ready.clear()
                    self._idle.append(slot)
                if not slot.ready.wait(self.idle_seconds):
                    with self._lock:
                        if slot in self._idle:  # else a job was handed over between the timeout and the lock
                            self._idle.remove(slot)
                            return
                assert slot.job is not None
                job = slot.job
        finally:
            _drop_pipe()
            with self._lock:
                self.threads -= 1


_POOL = _Pool()


def submit(job: Callable[[], None]) -> None:
    """Run `job` on a pooled relay thread (a blocking open, then `Relay.run_here`)."""
    _POOL.submit(job)


# ------------------------------------------------------------------------------ relays in a process of their own


class Handoff:
    """A child process that relays the socket pairs handed to it (SCM_RIGHTS over a socketpair).

    Its threads share a GIL only with each other: a forward that hands its connections here is not slowed
    by the rest of the process's relays (the agent's api.sock probe under bursts of 500 connections to a
    published port: see bench/soak.py). The child ends every relay and exits when the parent's end of the
    socketpair closes: `close`, or the parent dying.
    """

    def __init__(self) -> None:
        import subprocess  # here: the guest imports this module too, and never hands off

        parent, child = socket.socketpair()
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package, os.environ.get("PYTHONPATH")]))}
        try:  # -S: it needs nothing of site-packages but this package (0.8 MB less, a quicker start)
            self._process = subprocess.Popen([sys.executable, "-S", "-m", "boxpark.relay", str(child.fileno())],
                                             pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=env,
                                             cwd="/")
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._sock = parent
        self._lock = threading.Lock()

    def relay(self, client: socket.socket, target: socket.socket) -> None:
        """Hand both sockets over (blocking; from a relay thread) and close them here. OSError: the child is
        gone; the sockets are left open for the caller to relay or close."""
        with self._lock:
            socket.send_fds(self._sock, [b"j"], [client.fileno(), target.fileno()])
        client.close()
        target.close()

    def close(self, timeout: float = 2.0) -> None:
        """End the child's relays and the child."""
        import subprocess

        self._sock.close()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _serve_handoffs(fd: int) -> None:
    """The child of `Handoff`: relay each pair handed over until the parent's end closes, then end them all.
    A Ctrl-C or hang-up meant for the agent's terminal is the agent's to act on: the end comes as EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    control = socket.socket(fileno=fd)
    relays: set[Relay] = set()
    lock = threading.Lock()

    def forget(relay: Relay) -> None:
        with lock:
            relays.discard(relay)

    while True:
        try:
            data, fds, _, _ = socket.recv_fds(control, 1, 2)
        except OSError:
            break
        if not data:
            break
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        client, target = socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])
        client.setblocking(True)
        target.setblocking(True)
        relay = Relay(client, target, b"", lambda: None)
        relay.done = lambda relay=relay: forget(relay)  # type: ignore[misc]
        with lock:
            relays.add(relay)
        relay.start()
    with lock:
        left = list(relays)
    for relay in left:
        relay.abort()


if __name__ == "__main__":
    _serve_handoffs(int(sys.argv[1]))
