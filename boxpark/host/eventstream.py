"""The host end of the guest's event stream: listen, answer the guest's dial, collect its events.

The guest dials the host (docs/boot.md, "What the host gets"): `Hello(boot_id)`, then, after the
handshake (`transport.serve` does it; on tcp with the machine's secret), the host says with
`Resume(since=N)` what it has already seen and the guest sends the `EventFrame`s after N. This module keeps
the last sequence number per boot, so a redial — the guest's or ours after a restart of the listener —
resumes with no gap and no duplicate; a new boot id starts the count again (and forgets the old boot's
frames). A boot has one Ready: a replayed one (a redial that resumes too early, a second Ready frame) is
dropped, so nothing keyed on Ready runs twice. Whatever a peer sends — garbage, frames of another boot —
costs it its connection at worst, never the listener. It never dials anything and knows nothing of
backends: `wait_ready` only waits, and a backend races it against the machine's exit. A backend whose
guest's dials arrive as sockets, not on a listener of ours (VZ's listener delegate), hands each to `take`:
the same handshake and stream, with no relay in between, and at most MAX_TAKEN of them at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from typing import Callable, TypeVar

from .. import __version__, protocol
from ..protocol import EventFrame, Ready
from ..transport import Address, Channel, parse_address, serve, server_handshake

log = logging.getLogger("boxpark.host.events")

E = TypeVar("E")
MAX_TAKEN = 8  # connections handed in by `take` at once: the guest keeps one, a redial overlaps it briefly


class EventStreamError(TimeoutError):
    """The guest did not send what was awaited in time; the message says where to look.

    A `TimeoutError` (= `asyncio.TimeoutError`), so callers that only mind the timeout can catch that.
    """


class EventStream:
    """Listens at `address` for the guest's event stream: `async with EventStream(address) as events:`.

    `sock` is a listening socket made beforehand (so the address is taken before the guest starts);
    otherwise `start()` makes one. `logs` is the sentence that says where the guest's logs are, for errors.
    """

    def __init__(self, address: Address | str, *, secret: bytes | None = None,
                 sock: socket.socket | None = None, logs: str = "", keep: int = 10_000) -> None:
        self.address = parse_address(address) if isinstance(address, str) else address
        self.secret = secret
        self.logs = logs
        self.boot_id = ""
        self.last_seq = 0
        self.ready: Ready | None = None
        self.ready_at: float | None = None  # time.monotonic() on this host when Ready arrived
        self.frames: collections.deque[EventFrame] = collections.deque(maxlen=keep)
        self.connections = 0  # handshakes completed, over the stream's life
        self._sock = sock
        self._server: asyncio.AbstractServer | None = None
        self._changed: asyncio.Future[None] | None = None
        self._taken: set[asyncio.Task[None]] = set()
        self._closed = False

    # ------------------------------------------------------------------------------- lifecycle

    async def start(self) -> EventStream:
        """Start answering (again, after `close`: on the same address, resuming where it stopped)."""
        if self._server is not None:
            return self
        self._closed = False
        self._server = await serve(self.address, self._handle, secret=self.secret, sock=self._sock,
                                   welcome=self._welcome)
        self._sock = None  # the server owns it now; a restart makes a new one
        return self

    @staticmethod
    def _welcome() -> protocol.Welcome:
        return protocol.Welcome(server=f"boxpark-host {__version__}")

    def take(self, sock: socket.socket) -> None:
        """Serve a guest's connection that a backend accepted itself (non-blocking), as if accepted here."""
        if self._closed or len(self._taken) >= MAX_TAKEN:
            log.warning("event stream: a connection handed in %s; closed",
                        "after the stream closed" if self._closed else f"beyond {MAX_TAKEN} at once")
            sock.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve_taken(sock))
        self._taken.add(task)
        task.add_done_callback(self._taken.discard)

    async def _serve_taken(self, sock: socket.socket) -> None:
        proof = self.address.needs_secret
        try:
            channel = await Channel.from_socket(sock, str(self.address), handshake_frames=2 if proof else 1)
        except BaseException:
            sock.close()
            raise
        try:
            if await server_handshake(channel, require_proof=proof, secret=self.secret,
                                      welcome=self._welcome()) is not None:
                await self._handle(channel)
        finally:
            channel.close()

    async def close(self) -> None:
        """Stop listening and drop the guest's connections (the guest redials until we are back)."""
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
            server.close_clients()
        for task in list(self._taken):
            task.cancel()

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def __aenter__(self) -> EventStream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------------------- the stream

    async def _handle(self, channel: Channel) -> None:
        hello = channel.hello
        boot_id = hello.boot_id if hello is not None else ""
        if not boot_id:  # every guest names its boot; this is something else, and must not reset the count
            log.warning("event stream: a connection without a boot id; dropped")
            return
        if boot_id != self.boot_id:
            if self.boot_id:
                log.info("the guest booted again (boot id %s, was %s)", boot_id, self.boot_id)
            self.boot_id, self.last_seq, self.ready, self.ready_at = boot_id, 0, None, None
            self.frames.clear()  # since() must never hand out the old boot's frames as this one's
        channel.send(protocol.Resume(since=self.last_seq))
        self.connections += 1
        self._wake()
        log.debug("event stream: the guest connected (boot %s), resuming after %d", boot_id, self.last_seq)
        while True:
            try:
                message = await channel.recv()
            except protocol.ProtocolError as exc:
                log.warning("event stream: bad frame from the guest (%s); dropping the connection", exc)
                return
            if message is None:
                return
            if not isinstance(message, EventFrame):
                log.warning("event stream: the guest sent %s, not an event; ignored", type(message).__name__)
                continue
            if boot_id != self.boot_id or message.seq <= self.last_seq:
                continue  # a connection of an older boot, or a frame a redial already brought
            self.last_seq = message.seq
            self.frames.append(message)
            if isinstance(message.event, Ready):
                if self.ready is not None or message.event.boot_id != boot_id:
                    log.warning("event stream: a second Ready for boot %s (boot id %r in it); ignored",
                                boot_id, message.event.boot_id)
                    continue
                self.ready = message.event
                self.ready_at = time.monotonic()
            elif isinstance(message.event, protocol.Log):
                log.log(logging.ERROR if message.event.level == "error" else logging.WARNING,
                        "guest: %s", message.event.message)
            self._wake()

    def _wake(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def _changed_or_timeout(self, deadline: float) -> bool:
        """Wait for the next change; False when the deadline passed first."""
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(self._changed), remaining)
        except asyncio.TimeoutError:
            return False
        return True

    def since(self, seq: int) -> list[EventFrame]:
        """The frames of this boot with a sequence number above `seq`, oldest first."""
        return [frame for frame in self.frames if frame.seq > seq]

    # ------------------------------------------------------------------------------- waiting

    async def wait_ready(self, timeout: float) -> Ready:
        """The `Ready` of the current boot, once it arrives; `EventStreamError` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.ready is None:
            if not await self._changed_or_timeout(deadline):
                raise EventStreamError(self._timeout_message(f"did not report Ready within {timeout:g} s"))
        return self.ready

    async def wait_rebooted(self, boot_id: str) -> Ready:
        """The `Ready` of a boot other than `boot_id`, once one arrives (no timeout: cancel it)."""
        while self.ready is None or self.boot_id == boot_id:
            await self._changed_or_timeout(time.monotonic() + 3600)
        return self.ready

    async def wait_for(self, kind: type[E], timeout: float, *, after: int = 0,
                       where: Callable[[E], bool] | None = None) -> E:
        """The first event of type `kind` (matching `where`) with a sequence number above `after`."""
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.since(after):
                event = frame.event
                if isinstance(event, kind) and (where is None or where(event)):
                    return event
                after = frame.seq
            if not await self._changed_or_timeout(deadline):
                raise EventStreamError(self._timeout_message(
                    f"sent no {kind.__name__} event within {timeout:g} s"))

    def _timeout_message(self, what: str) -> str:
        if not self.connections:
            how = f"it never connected to the event stream at {self.address}"
        else:
            how = f"it connected {self.connections} time(s); last event #{self.last_seq}"
        where = f"; see {self.logs}" if self.logs else ""
        return f"the guest {what} ({how}){where}"
