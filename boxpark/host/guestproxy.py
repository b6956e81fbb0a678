"""The Guest Proxy: a host socket whose every connection is joined to its own stream into the guest.

For Docker, the host socket is `<state>/docker.sock` (mode 0600) and each connection opens a `connect` to
the guest's /var/run/docker.sock. While dockerd is not ready the proxy answers each connection itself with
an HTTP 503 whose JSON message says why (the docker CLI prints it), instead of hanging. A guest side that
dies closes the host side at once (the relay shuts both down). The same class serves other forwards
(the API socket, published TCP ports on an already-bound `listener`) with a different `open_target`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import threading
from typing import Callable

from ..relay import Handoff, Relay, submit
from ..transport import RemoteError, TransportError, listen_socket, parse_address

log = logging.getLogger("boxpark.agent.proxy")

REFUSAL_WAIT = 1.0  # seconds a refused connection is given to send its request, then to close after the answer


def raise_nofile(wanted: int = 65536) -> int:
    """Raise RLIMIT_NOFILE's soft limit toward `wanted` (a proxy holds three fds per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


def http_unavailable(reason: str) -> bytes:
    body = json.dumps({"message": reason}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


class GuestProxy:
    """Accepts on a host socket; joins each connection to a fresh stream from `open_target()`.

    `open_target` blocks: it runs in the pooled relay thread that goes on to move the client's bytes, so a
    new connection costs no trip through the event loop (measured ~0.3 ms less than opening it there).
    With `handoff`, that thread hands both sockets to a relay process of the proxy's own (`relay.Handoff`)
    instead: the bytes never wait for this process's GIL.
    """

    def __init__(self, path: str, open_target: Callable[[], socket.socket], *,
                 unavailable: Callable[[], str | None] = lambda: None,
                 refusal: Callable[[str], bytes] = http_unavailable,
                 listener: socket.socket | None = None, handoff: bool = False) -> None:
        self.path = path  # the unix socket to listen on, or only a name when `listener` is given (TCP)
        self._listener = listener
        self._open_target = open_target
        self._unavailable = unavailable
        self._refusal = refusal
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refusals: set[_Refusal] = set()
        self._relays: set[Relay] = set()
        self._lock = threading.Lock()  # _relays and the counters are touched by relay threads too
        self._closed = False
        self._unix = True
        self._handoff: Handoff | None = None
        self._wants_handoff = handoff  # relays in a process of their own (`relay.Handoff`)
        self.accepted = 0
        self.failed = 0

    async def start(self) -> None:
        raise_nofile()
        self._loop = asyncio.get_running_loop()
        if self._wants_handoff:
            try:
                self._handoff = Handoff()
            except OSError as exc:  # the relays stay in this process: slower under load, still correct
                log.warning("proxy %s relays in the agent: no relay process (%s)", self.path, exc)
        if self._listener is not None:
            self._sock, self._listener = self._listener, None
            self._sock.setblocking(False)
            self._unix = False
        else:
            self._sock = listen_socket(parse_address(f"unix:{self.path}"), backlog=4096)
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(128):
            try:
                client, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE: leave it in the backlog for the next wakeup
                log.warning("proxy %s cannot accept: %s", self.path, exc.strerror)
                return
            with self._lock:
                self.accepted += 1
            reason = self._unavailable()
            if reason is not None:
                self._refuse_soon(client, reason)
            else:
                client.setblocking(True)
                submit(lambda client=client: self._join(client))  # type: ignore[misc]

    def _join(self, client: socket.socket) -> None:
        """In a relay thread: open the guest's side, then move bytes (this thread one way, another back)."""
        if client.family != socket.AF_UNIX:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            target = self._open_target()
        except (TransportError, RemoteError, OSError) as exc:
            reason = f"Boxpark cannot reach the guest's service: {exc}"
            try:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._refuse_soon, client, reason)
            except RuntimeError:  # the loop is gone: the proxy is closed
                client.close()
            return
        if self._handoff is not None:
            try:
                self._handoff.relay(client, target)
                return
            except OSError as exc:  # the relay process is gone: relay here
                log.warning("proxy %s: relay process gone (%s); relaying in the agent", self.path, exc)
                self._handoff = None
        relay = Relay(client, target, b"", lambda: self._forget(relay))
        with self._lock:
            if self._closed:
                relay.close_now()
                return
            self._relays.add(relay)
        relay.run_here()

    def _forget(self, relay: Relay) -> None:
        with self._lock:
            self._relays.discard(relay)

    def _refuse_soon(self, client: socket.socket, reason: str) -> None:
        with self._lock:
            self.failed += 1
        if self._closed:
            client.close()
            return
        refusal = _Refusal(client, self._refusal(reason), self._refusals)
        self._refusals.add(refusal)

    def close(self) -> None:
        if self._sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            if self._unix:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
        with self._lock:
            self._closed = True
            relays = list(self._relays)
        for relay in relays:
            relay.abort()
        if self._handoff is not None:
            self._handoff.close()  # its relays end with it
            self._handoff = None
        for refusal in list(self._refusals):
            refusal.finish()


class _Refusal:
    """One refused connection, on the loop by callbacks (no task: a burst of 500 refusals while dockerd
    restarts costs few objects): read the request (at most REFUSAL_WAIT) so that closing does not reset
    it, answer, shut down our side, wait (at most REFUSAL_WAIT) for the client to close, close."""

    __slots__ = ("client", "answer", "owner", "loop", "timer", "answered")

    def __init__(self, client: socket.socket, answer: bytes, owner: set[_Refusal]) -> None:
        self.client = client
        self.answer = answer
        self.owner = owner
        self.answered = False
        self.loop = asyncio.get_running_loop()
        client.setblocking(False)
        self.loop.add_reader(client.fileno(), self._readable)
        self.timer = self.loop.call_later(REFUSAL_WAIT, self._waited)

    def _readable(self) -> None:
        try:
            data = self.client.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not self.answered:
            self._answer()
        elif not data:  # the client closed after the answer
            self.finish()

    def _waited(self) -> None:
        if self.answered:
            self.finish()
        else:
            self._answer()

    def _answer(self) -> None:
        self.answered = True
        self.timer.cancel()
        try:
            sent = self.client.send(self.answer) if self.answer else 0
            if sent < len(self.answer):  # a few hundred bytes to a fresh socket: not expected to happen
                raise BlockingIOError
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            self.finish()
            return
        self.timer = self.loop.call_later(REFUSAL_WAIT, self._waited)

    def finish(self) -> None:
        if self.client.fileno() < 0:
            return
        self.timer.cancel()
        self.loop.remove_reader(self.client.fileno())
        self.client.close()
        self.owner.discard(self)
