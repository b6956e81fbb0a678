"""The guest's event log: numbered events kept in a ring, streamed to the host however it connects.

Two ways out: the host calls `Events(since)` on the Guest API, or the guest dials the host's event stream
(`stream_to_host`, retrying until the host answers) and the host says with `Resume` what it has seen.
Either way a host that reconnects gets every event it missed that the ring still holds.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from .. import __version__, protocol
from ..protocol import Event, EventFrame
from ..transport import Address, Channel, TransportError, dial

log = logging.getLogger("boxpark.guest.events")


class EventLog:
    """A bounded ring of numbered events with waiters for new ones."""

    def __init__(self, boot_id: str = "", size: int = 4096) -> None:
        self.boot_id = boot_id
        self._ring: collections.deque[EventFrame] = collections.deque(maxlen=size)
        self._seq = 0
        self._changed = asyncio.Condition() if _has_loop() else None
        self._loop = asyncio.get_running_loop() if _has_loop() else None

    @property
    def last_seq(self) -> int:
        return self._seq

    def emit(self, event: Event) -> EventFrame | None:
        """Record an event and wake the streams; from another thread it is handed to the loop's thread."""
        loop = self._loop
        if loop is not None and not _on(loop):
            loop.call_soon_threadsafe(self.emit, event)
            return None
        self._seq += 1
        frame = EventFrame(seq=self._seq, time_ns=time.time_ns(), event=event)
        self._ring.append(frame)
        if self._changed is not None:
            asyncio.get_running_loop().create_task(self._notify())
        return frame

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    def since(self, seq: int) -> list[EventFrame]:
        return [frame for frame in self._ring if frame.seq > seq]

    async def wait_after(self, seq: int) -> None:
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            await self._changed.wait_for(lambda: self._seq > seq)

    async def follow(self, channel: Channel, since: int) -> None:
        """Send every event after `since`, then each new one, until the peer closes or talks out of turn."""
        peer = asyncio.ensure_future(channel.recv())
        try:
            while True:
                for frame in self.since(since):
                    channel.send(frame)
                    since = frame.seq
                await channel.drain()
                waiter = asyncio.ensure_future(self.wait_after(since))
                done, _ = await asyncio.wait({waiter, peer}, return_when=asyncio.FIRST_COMPLETED)
                if peer in done:
                    waiter.cancel()
                    return
        finally:
            peer.cancel()

    async def stream(self, channel: Channel, message: protocol.Events) -> None:
        """The `Events` call: `Ok`, then the events after `message.since`, following."""
        channel.send(protocol.Ok())
        await self.follow(channel, message.since)
        return None


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def stream_to_host(log_: EventLog, address: Address, secret: bytes | None, *,
                         retry: float = 0.05, retry_max: float = 1.0,
                         on_connected: asyncio.Event | None = None) -> None:
    """Dial the host's event stream and keep it fed; redial (with backoff) whenever it drops."""
    delay = retry
    warned = False
    while True:
        try:
            channel, _ = await dial(address, secret=secret,
                                    hello=protocol.Hello(client=f"boxpark-guest {__version__}",
                                                         boot_id=log_.boot_id))
        except TransportError as exc:
            if not warned:
                log.info("the host's event stream is not answering yet (%s); retrying", exc)
                warned = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry_max)
            continue
        delay = retry
        warned = False
        try:
            resume = await channel.recv_expect(protocol.Resume)
            assert isinstance(resume, protocol.Resume)
            if on_connected is not None:
                on_connected.set()
            await log_.follow(channel, resume.since)
        except (TransportError, protocol.ProtocolError, ConnectionError) as exc:
            log.info("the host's event stream dropped (%s); redialing", exc)
        finally:
            channel.close()
        await asyncio.sleep(delay)
