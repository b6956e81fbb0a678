"""Keeping the guest's clock right from the host: a push after Ready, every interval, and after a gap.

VZ's Linux boot gives the guest no RTC and a paused VM or a sleeping host leaves the guest's clock behind,
so the host is the time source that wins. A push is one `SetTime` call; the guest steps only when it is
off by more than the threshold and reports the step as a `ClockStepped` event. The pusher notices a gap —
it was not scheduled for far longer than it asked (host sleep) — and pushes at once; `poke()` lets
anything else that knows better (a macOS did-wake notification, a QEMU RESUME event) ask for a push.
At idle it wakes only every `TICK` (a gap is noticed within a tick of the host waking) and at each push,
and while the guest's clock keeps time the pushes space out (`next_interval`: doubling after each push
that did not step, up to `MAX_SPACING` times the interval; back to the interval after a step, a gap or a
failure): an idle machine must cost the host and the guest nothing they can avoid (issue 12).
A push sends the host's time plus half the round trip (what the request spends on its way: the shortest of
the last `RTT_KEPT` pushes', so one slow trip — a loaded host, a paused VM — changes nothing) and asks for a
step only beyond the threshold or that round trip, whichever is larger: below it the offset the guest sees
is the trip's noise, not its clock's error.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Awaitable, Callable

from ..transport import RemoteError, TransportError
from .client import GuestClient

log = logging.getLogger("boxpark.agent.time")

THRESHOLD_NS = 5_000_000  # 5 ms: below that, stepping the clock does more harm than good
GAP = 2.0  # seconds of unexplained delay that mean the host slept or stalled
TICK = 10.0  # s between looks for a gap: a few wake-ups a minute, and the did-wake notification is sooner
RTT_KEPT = 8  # round trips remembered; their shortest is the trip's estimate
MAX_SPACING = 8  # a clock that keeps time is pushed at most this many intervals apart (8 min by default)


def next_interval(current: float, base: float, stepped: bool) -> float:
    """The wait before the next push, after one: `base` again when it stepped the clock, else twice
    `current`, up to `MAX_SPACING` times `base`."""
    return base if stepped else min(current * 2, base * MAX_SPACING)


class TimePusher:
    def __init__(self, dial: Callable[[], Awaitable[GuestClient]], interval: float = 60.0) -> None:
        self._dial = dial
        self.interval = interval
        self.every = interval  # the current spacing of pushes (`next_interval`)
        self._poke = asyncio.Event()
        self.pushes = 0
        self.last_offset_ns: int | None = None
        self.last_stepped = False
        self._rtts: collections.deque[int] = collections.deque(maxlen=RTT_KEPT)  # the last pushes' round trips

    def poke(self) -> None:
        """Push now (thread-unsafe: call from the loop; use loop.call_soon_threadsafe elsewhere)."""
        self._poke.set()

    async def push(self, client: GuestClient) -> int:
        """One push, compensating half the round trip; returns the guest's offset before it."""
        trip = min(self._rtts, default=0)
        start = time.monotonic_ns()
        result = await client.set_time(time.time_ns() + trip // 2, max(THRESHOLD_NS, trip))
        rtt = time.monotonic_ns() - start
        self._rtts.append(rtt)
        self.pushes += 1
        self.last_offset_ns = result.offset_ns
        self.last_stepped = result.stepped
        if result.stepped:
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
                    self.every = next_interval(self.every, self.interval, self.last_stepped)
                except (TransportError, RemoteError, ConnectionError) as exc:
                    log.warning("time push failed: %s", exc)
                    if client is not None:
                        await client.close()
                    client = None
                    self.every = self.interval
                due = time.monotonic() + self.every
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
                self.every = self.interval
                self._poke.set()
