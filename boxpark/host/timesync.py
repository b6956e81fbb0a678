"""Keeping the guest's clock right from the host: a push after Ready, every interval, and after a gap.

VZ's Linux boot gives the guest no RTC and a paused VM or a sleeping host leaves the guest's clock behind,
so the host is the time source that wins. A push is one `SetTime` call; the guest does nothing when it is
within the threshold, slews a later push's offset up to 128 ms (guest/clock.py: never backwards, no event),
and otherwise steps and reports the step as a `ClockStepped` event. The pusher notices a gap —
it was not scheduled for far longer than it asked (host sleep) — and pushes at once; `poke()` lets
anything else that knows better (a macOS did-wake notification, a QEMU RESUME event) ask for a push.
At idle it wakes only every `TICK` (a gap is noticed within a tick of the host waking) and at each push:
an idle machine must cost the host nothing it can avoid (issue 12).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from ..transport import RemoteError, TransportError
from .client import GuestClient

log = logging.getLogger("boxpark.agent.time")

THRESHOLD_NS = 5_000_000  # 5 ms: below that, stepping the clock does more harm than good
GAP = 2.0  # seconds of unexplained delay that mean the host slept or stalled
TICK = 10.0  # s between looks for a gap: a few wake-ups a minute, and the did-wake notification is sooner


class TimePusher:
    def __init__(self, dial: Callable[[], Awaitable[GuestClient]], interval: float = 60.0) -> None:
        self._dial = dial
        self.interval = interval
        self._poke = asyncio.Event()
        self.pushes = 0
        self.last_offset_ns: int | None = None

    def poke(self) -> None:
        """Push now (thread-unsafe: call from the loop; use loop.call_soon_threadsafe elsewhere)."""
        self._poke.set()

    async def push(self, client: GuestClient) -> int:
        """One push of the host's time as the call leaves (the guest sees it half a round trip late, ~0.5 ms
        here: within the threshold); returns the guest's offset before it."""
        start = time.monotonic_ns()
        result = await client.set_time(time.time_ns(), THRESHOLD_NS)
        rtt = time.monotonic_ns() - start
        self.pushes += 1
        self.last_offset_ns = result.offset_ns
        if result.stepped:  # a slew is not logged: it is the routine case
            log.info("guest clock was %+.3f ms off: stepped (round trip %.2f ms)", result.offset_ns / 1e6, rtt / 1e6)
        return result.offset_ns

    async def run(self) -> None:
        client: GuestClient | None = None
        due = 0.0  # monotonic time of the next periodic push
        while True:
            if time.monotonic() >= due or self._poke.is_set():
                self._poke.clear()
                try:
                    if client is None:
                        client = await self._dial()
                    await self.push(client)
                except (TransportError, RemoteError, ConnectionError) as exc:
                    log.warning("time push failed: %s", exc)
                    if client is not None:
                        await client.close()
                    client = None
                due = time.monotonic() + self.interval
            # Tick now and then: CLOCK_MONOTONIC stops while the host sleeps, the wall clock does not, so a
            # jump between the two is a sleep (or a stall) that the guest did not see either.
            tick = min(TICK, max(due - time.monotonic(), 0.0))
            wall, mono = time.time(), time.monotonic()
            try:
                await asyncio.wait_for(self._poke.wait(), tick)
            except asyncio.TimeoutError:
                pass
            if self._poke.is_set():
                continue
            gap = (time.time() - wall) - tick
            stall = (time.monotonic() - mono) - tick
            if max(gap, stall) > GAP:
                log.info("the host slept or stalled for %.1f s: pushing the time", max(gap, stall))
                self._poke.set()
