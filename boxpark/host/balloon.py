"""Memory back to the host: the balloon policy (pure functions) and the agent's task that applies it.

A VM's memory, once the guest touched it, stays with the VM's process unless the guest gives it back. Two
ways exist, and the backend says which it has (`Backend.balloon`):

- "reporting" (QEMU): virtio-balloon with free page reporting. The guest's kernel reports the pages it frees
  and QEMU drops them, with nobody's help. What it never frees is the page cache: a build that read 1 GiB
  keeps 1 GiB of the host's memory cached. So when the guest has been quiet and holds more than it needs,
  the policy *squeezes*: the balloon's target goes down to what the guest uses plus some headroom, the guest's
  reclaim drops its coldest cache to inflate it (QEMU drops each page it gets), and once the guest got there
  (or stopped getting closer) the target goes back to the full size. Deflating hands the guest pages that
  the host no longer backs, so the memory stays with the host until the guest really uses it again, and
  the guest keeps its whole size the rest of the time (no OOM risk outside a squeeze of a few seconds).
  Reclaim picks the coldest pages; `drop_caches` would drop the hot ones too (dockerd's own binaries).
- "hold" (VZ): only a traditional balloon, a target size (no statistics, no reporting, no deflate on OOM).
  Memory is back with the host only while the balloon stays inflated, so the target *follows* the guest:
  down to what it uses plus headroom when it has been quiet, up to the full size the moment it needs
  memory (MemAvailable below half the headroom, or swap being used more), up to use plus headroom as use
  grows.

Never an OOM: a held target never goes below what the guest uses plus headroom, nor below a floor (a quarter
of the machine, at least 256 MiB); a squeeze, which lasts seconds, goes to use plus a quarter of the headroom
(`squeeze_target`: what the guest keeps cached after it is what the host keeps backing) and ends the moment
the guest is short (under an eighth of the headroom available), swaps, or its use grows by a step; the
guest's balloon driver inflates with allocations that fail rather than reclaim hard or call the OOM killer;
a guest short of memory gets the full size back at the next look. "Uses" is MemTotal - MemAvailable:
MemTotal shrinks as the balloon inflates, and MemAvailable counts the cache reclaim can drop, so the figure
is what the guest's work holds.

Two sizes: a target is the guest's logical memory (the machine's size less what the balloon holds), and
MemTotal is that less what the guest's kernel reserved at boot (its code, the page structures: about 150
MiB of 3 GiB, the same all the guest's life). So every target is the MemTotal wanted plus `reserved` (the
size less the largest MemTotal seen), and a squeeze has reached its target when MemTotal plus `reserved`
has. Compared directly, a squeeze "got there" with the balloon still 150 MiB short and ended wherever
the look happened to fall: 60 s after a 1 GiB read, QEMU held from 0.96 to 1.24 times its idle RSS.

Where the figures come from: a backend whose balloon reports the guest kernel's own statistics
(`Backend.balloon_stats`: QEMU's virtio-balloon stats queue, which the guest's driver answers in the kernel)
is read through it, which costs the guest's init nothing; otherwise (VZ) the task calls the guest's
`MemoryStats` on the Guest API, a wake-up of the init each look.

Quiet at idle, quick after a burst: the task looks every `idle_interval` while the balloon is empty and
nothing changes, `active_interval` after a look that saw the guest's memory move (so the look that finds it
quiet again, and starts the squeeze, comes seconds after the burst ends), every `watch_interval` while it
is inflated; quick looks are compared with one at least `watch_interval` old (`reference`), so "quiet" and
"stuck" mean the same whatever the pace. Over the Guest API these are 30, 5 and 5 s (each look wakes the init); from the
kernel's statistics 10, 2 and 5 s (`KERNEL_STATS`: a look is one QMP command, the init sleeps through it).
Nothing here may block the agent's loop: a look is one quick call, a target one QMP command or VZ call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from .. import protocol
from ..transport import RemoteError, TransportError
from .backends.base import Backend, BackendError
from .client import GuestClient

log = logging.getLogger("boxpark.agent.balloon")

MiB = 1024 * 1024
PAGE = 4096  # the unit of the balloon statistics' swap counters (pages)
# How often the guest's kernel refreshes its balloon statistics (QEMU's guest-stats-polling-interval), and the
# agent's idle, active and watch intervals when it reads those (see the module's text).
STATS_REFRESH = 2
KERNEL_STATS = {"idle_interval": 10.0, "active_interval": 2.0, "watch_interval": 5.0}


@dataclass(frozen=True)
class Figures:
    """The guest's memory, in bytes, as its /proc/meminfo says (`protocol.MemoryStatsReply`)."""

    total: int  # MemTotal: without what the balloon holds
    free: int
    available: int
    cached: int = 0
    shmem: int = 0
    swap_total: int = 0
    swap_free: int = 0

    @classmethod
    def of(cls, reply: protocol.MemoryStatsReply) -> Figures:
        return cls(reply.total, reply.free, reply.available, reply.cached, reply.shmem, reply.swap_total,
                   reply.swap_free)

    @classmethod
    def of_balloon_stats(cls, stats: Mapping[str, int]) -> Figures | None:
        """From the guest kernel's balloon statistics (QEMU's `guest-stats`: "stat-total-memory" and the like,
        bytes, -1 where the guest reports nothing); None without total, free and available. The statistics
        count swap traffic, not swap space: `swapped` becomes the pages swapped out since boot, so "swaps more
        than it did" (`needs_memory`) reads the same."""
        total, free, available = (stats.get(f"stat-{name}", -1) for name in ("total-memory", "free-memory",
                                                                              "available-memory"))
        if min(total, free, available) < 0:
            return None
        swapped_out = max(0, stats.get("stat-swap-out", 0)) * PAGE
        return cls(total, free, available, max(0, stats.get("stat-disk-caches", 0)), 0, swapped_out, 0)

    @property
    def used(self) -> int:
        """What the guest's work holds: all but what it can have at once (free and droppable cache)."""
        return max(0, self.total - self.available)

    @property
    def swapped(self) -> int:
        return max(0, self.swap_total - self.swap_free)

    @property
    def resident(self) -> int:
        """What the guest keeps in pages (cache included): about what the host backs, under free page reporting."""
        return max(0, self.total - self.free)


@dataclass(frozen=True)
class Policy:
    """The knobs. `size`: the guest's memory with the balloon empty; `mode`: the backend's `balloon`."""

    size: int
    mode: str  # "reporting" or "hold"
    headroom: int = 0  # what the guest may take at once beyond its use; 0: an eighth of size, at least 256 MiB
    floor: int = 0  # the least the guest is ever left; 0: a quarter of size, at least 256 MiB
    step: int = 64 * MiB  # changes smaller than this are noise: no target moves for them
    idle_interval: float = 30.0  # the balloon empty, nothing moving
    watch_interval: float = 5.0  # the balloon inflated (a squeeze going on, a guest held smaller)
    active_interval: float = 5.0  # the last look saw the guest's memory move: the next finds it quiet again

    @property
    def headroom_bytes(self) -> int:
        return self.headroom or max(256 * MiB, self.size // 8)

    @property
    def floor_bytes(self) -> int:
        return min(self.size, self.floor or max(256 * MiB, self.size // 4))


@dataclass(frozen=True)
class Decision:
    target: int  # the guest's memory size to ask for (== policy.size: the balloon empty)
    interval: float  # seconds to the next look
    why: str


def wanted(figures: Figures, policy: Policy, reserved: int = 0) -> int:
    """The target that gives the guest its use plus headroom (`reserved`: see the module's text), between the
    floor and the full size."""
    return max(policy.floor_bytes, min(policy.size, figures.used + policy.headroom_bytes + reserved))


def squeeze_target(figures: Figures, policy: Policy, reserved: int = 0) -> int:
    """Where a squeeze (reporting) takes the guest: its use plus a quarter of the headroom, never under 256 MiB
    nor over the full size. Lower than a held balloon's `wanted` (no quarter-of-the-machine floor): a
    squeeze lasts seconds, is watched every `active_interval` and ends the moment the guest is short
    (`needs_memory`) or its use grows, and what it leaves is what the host keeps backing afterwards."""
    return max(min(policy.size, 256 * MiB), min(policy.size, figures.used + policy.headroom_bytes // 4 + reserved))


def needs_memory(figures: Figures, previous: Figures | None, policy: Policy, squeezing: bool = False) -> bool:
    """The guest is short now: under half the headroom available (an eighth in a squeeze, which leaves it a
    quarter), or it swaps more than it did."""
    if figures.available < policy.headroom_bytes // (8 if squeezing else 2):
        return True
    return previous is not None and figures.swapped > previous.swapped + policy.step


def quiet(figures: Figures, previous: Figures | None, policy: Policy) -> bool:
    """Neither use nor what the guest keeps in pages (its cache: a build reading files) moved by a step since
    the last look (the first look is never quiet)."""
    return (previous is not None and abs(figures.used - previous.used) < policy.step
            and abs(figures.resident - previous.resident) < policy.step)


def decide(figures: Figures, previous: Figures | None, current: int, policy: Policy,
           reserved: int = 0) -> Decision:
    """The next balloon target and when to look again, from the figures now and at an earlier look (`previous`:
    the `reference` look, at least `watch_interval` old; None when there is none yet).

    `current` is the target in force (policy.size when the balloon is empty); `reserved` is what the guest's
    kernel keeps out of MemTotal (see the module's text; 0 while unknown: targets come out lower, and a
    squeeze ends when the guest is short instead of when it reached its target).
    """
    size, idle, watch = policy.size, policy.idle_interval, policy.watch_interval
    still = quiet(figures, previous, policy)
    want = wanted(figures, policy, reserved)
    squeezing = policy.mode == "reporting" and current < size
    at = f"at {(figures.total + reserved) // MiB} MiB, {figures.resident // MiB} MiB resident"
    if squeezing and figures.total + reserved <= current + policy.step // 4:  # (short there too: same)
        return Decision(size, watch, f"squeeze done {at}: balloon emptied (reclaimed pages stay with the host)")
    if needs_memory(figures, previous, policy, squeezing):
        return Decision(size, watch, f"the guest needs memory ({figures.available // MiB} MiB available): "
                                     f"balloon emptied")
    if squeezing:
        if previous is not None and figures.used > previous.used + policy.step:
            return Decision(size, watch, f"the guest's use grew to {figures.used // MiB} MiB: squeeze ended {at}")
        # stuck: under a quarter step closer since the reference (at least watch_interval): a TCG guest's
        # balloon can inflate at ~10 MiB/s as reclaim starts, under a step in that time but not stuck
        if previous is not None and previous.total - figures.total < policy.step // 4:
            return Decision(size, watch, f"squeeze stopped getting closer {at}: balloon emptied (reclaimed pages "
                                         f"stay with the host)")
        return Decision(current, policy.active_interval, "squeezing")
    if policy.mode == "reporting":
        target = squeeze_target(figures, policy, reserved)
        if still and figures.resident + reserved > target + policy.step and target < size - policy.step:
            return Decision(target, policy.active_interval, f"quiet with {figures.resident // MiB} MiB resident, "
                                                            f"using {figures.used // MiB} MiB: squeezing the page "
                                                            f"cache")
        return Decision(size, idle if still else policy.active_interval, "")
    if want > current:
        return Decision(want, watch, f"use grew to {figures.used // MiB} MiB: balloon deflated")
    if still and want < current - policy.step:
        return Decision(want, watch, f"quiet using {figures.used // MiB} MiB: balloon inflated")
    if current == size:
        return Decision(current, idle if still else policy.active_interval, "")
    return Decision(current, watch, "")


def remember(looks: list[tuple[float, Figures]], now: float, figures: Figures,
             span: float) -> list[tuple[float, Figures]]:
    """The looks to keep, (time, figures) oldest first, with this one added: from the newest look at least
    `span` seconds old (or the oldest, none being that old yet) on."""
    looks = [*looks, (now, figures)]
    old = [i for i, (at, _) in enumerate(looks[:-1]) if at <= now - span]
    return looks[old[-1] if old else 0:]


def reference(looks: list[tuple[float, Figures]], now: float, span: float) -> Figures | None:
    """The look `decide` compares the newest (the last of `looks`) with: the oldest kept, if it is at least
    `span` (`watch_interval`) old; else None, as on a first look. So looks closer together than `span`
    (`active_interval`) are still judged over `span`: "quiet" is under a step per `span` whatever the pace of
    looking (a slow build is not taken for an idle guest), and a squeeze is "stuck" only when it got less
    than a step closer in `span`. The agent forgets its looks when the target moves, so the seconds after a
    squeeze starts or ends are judged from that moment on."""
    return looks[0][1] if len(looks) > 1 and looks[0][0] <= now - span else None


class Balloon:
    """The agent's task: look at the guest's figures, move the backend's balloon as `decide` says."""

    def __init__(self, dial: Callable[[], Awaitable[GuestClient]], backend: Backend, policy: Policy) -> None:
        self._dial = dial
        self._backend = backend
        self.policy = policy
        self.target = policy.size
        self.figures: Figures | None = None  # the last look (for `status`)
        self._looks: list[tuple[float, Figures]] = []  # (monotonic time, figures): see `remember`, `reference`
        self._full = 0  # the largest MemTotal seen: the size less what the guest's kernel reserved

    @property
    def reserved(self) -> int:
        """What the guest's kernel keeps out of MemTotal (see the module's text); 0 before the first look."""
        return max(0, self.policy.size - self._full) if self._full else 0

    async def run(self) -> None:
        client: GuestClient | None = None
        kernel = True  # the backend's balloon statistics, until it says it has none
        last_update, unanswered = None, 0
        while True:
            interval = self.policy.idle_interval
            try:
                figures = None
                if kernel:
                    stats = await self._kernel_stats()
                    if stats is None:
                        kernel = False
                    else:
                        if self.policy.idle_interval == Policy.idle_interval:  # the defaults: this source's
                            self.policy = dataclasses.replace(self.policy, **KERNEL_STATS)
                        interval = self.policy.active_interval
                        figures = Figures.of_balloon_stats(stats.get("stats", {}))
                        if figures is None or not stats.get("last-update"):  # the guest has not answered yet
                            unanswered += 1
                            if unanswered * interval > 60:
                                log.info("balloon: the guest's kernel reports no memory statistics: its figures "
                                         "come over the Guest API")
                                kernel = False
                            figures = None
                        elif stats.get("last-update") == last_update:  # not refreshed since: no new look
                            figures = None
                        last_update = stats.get("last-update")
                if not kernel:
                    if client is None:
                        client = await self._dial()
                    figures = Figures.of(await client.memory_stats())
                if figures is not None:
                    now = asyncio.get_running_loop().time()
                    self._looks = remember(self._looks, now, figures, self.policy.watch_interval)
                    self._full = max(self._full, figures.total)
                    decision = decide(figures, reference(self._looks, now, self.policy.watch_interval),
                                      self.target, self.policy, self.reserved)
                    self.figures, interval = figures, decision.interval
                    if decision.target != self.target:
                        self._looks = [(now, figures)]  # judged from here on (see `reference`)
                        await self._backend.set_balloon(decision.target)
                        log.info("%s (target %d MiB)", decision.why, decision.target // MiB)
                        self.target = decision.target
            except (TransportError, RemoteError, ConnectionError) as exc:
                log.warning("balloon: no memory figures from the guest: %s", exc)
                if client is not None:
                    await client.close()
                client = None
            except BackendError as exc:
                log.warning("balloon: %s", exc)
            except Exception as exc:  # noqa: BLE001 - QMP refusing `balloon` must not end the agent
                log.warning("balloon: the backend refused the target: %s", exc)
            await asyncio.sleep(interval)

    async def _kernel_stats(self) -> dict[str, Any] | None:
        """The backend's balloon statistics; None where it has none (or refuses them: then never again)."""
        try:
            return await self._backend.balloon_stats(STATS_REFRESH)
        except Exception as exc:  # noqa: BLE001 - any refusal: the Guest API has the figures too
            log.info("balloon: no statistics from the backend (%s): the guest's figures come over the Guest API",
                     exc)
            return None
