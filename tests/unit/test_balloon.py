"""The balloon policy as pure functions: memory figures in, a target and the next look's delay out."""

from __future__ import annotations

from boxpark.host.balloon import MiB, Decision, Figures, Policy, decide, needs_memory, reference, remember, wanted

GiB = 1024 * MiB
SIZE = 2 * GiB
REPORTING = Policy(SIZE, "reporting")
HOLD = Policy(SIZE, "hold")
RESERVED = 100 * MiB  # what the guest's kernel keeps out of MemTotal: `figures`' total with the balloon empty


def figures(used: int, free: int | None = None, total: int = SIZE - RESERVED, swapped: int = 0) -> Figures:
    """A guest using `used` bytes; what it neither uses nor has free is droppable cache."""
    available = total - used
    free = available if free is None else free
    return Figures(total=total, free=free, available=available, cached=available - free,
                   swap_total=GiB, swap_free=GiB - swapped)


def test_defaults_scale_with_the_machine() -> None:
    assert HOLD.headroom_bytes == 256 * MiB and HOLD.floor_bytes == 512 * MiB
    big = Policy(16 * GiB, "hold")
    assert big.headroom_bytes == 2 * GiB and big.floor_bytes == 4 * GiB
    assert Policy(200 * MiB, "hold").floor_bytes == 200 * MiB  # never above the machine


def test_wanted_is_use_plus_headroom_within_floor_and_size() -> None:
    assert wanted(figures(600 * MiB), HOLD) == 600 * MiB + 256 * MiB
    assert wanted(figures(10 * MiB), HOLD) == HOLD.floor_bytes
    assert wanted(figures(SIZE - 150 * MiB), HOLD) == SIZE


def test_targets_count_what_the_guests_kernel_reserved() -> None:
    """A target is the guest's logical size; MemTotal is that less what its kernel reserved at boot. A guest
    held at use + headroom must have the headroom in MemTotal, where its work can take it."""
    assert wanted(figures(600 * MiB), HOLD, RESERVED) == 600 * MiB + 256 * MiB + RESERVED
    held = figures(600 * MiB, total=wanted(figures(600 * MiB), HOLD, RESERVED) - RESERVED)
    assert held.available == HOLD.headroom_bytes


def test_first_look_never_shrinks() -> None:
    idle = figures(300 * MiB, free=200 * MiB)  # lots of cache: but nothing is known to be quiet yet
    assert decide(idle, None, SIZE, REPORTING).target == SIZE
    assert decide(idle, None, SIZE, HOLD).target == SIZE


def test_reporting_squeezes_a_quiet_guest_full_of_cache_then_empties() -> None:
    before = figures(300 * MiB, free=200 * MiB)  # 1.6 GiB of cache held by the host
    now = figures(310 * MiB, free=200 * MiB)
    squeeze = decide(now, before, SIZE, REPORTING, RESERVED)
    # to use + a quarter of the headroom: a squeeze is brief, and what it leaves cached the host keeps backing
    assert squeeze.target == 310 * MiB + 64 * MiB + RESERVED < SIZE
    assert squeeze.interval == REPORTING.active_interval
    # still inflating (MemTotal going down): keep the target
    going = figures(310 * MiB, free=50 * MiB, total=1200 * MiB)
    assert decide(going, now, squeeze.target, REPORTING, RESERVED).target == squeeze.target
    # got there: the balloon empties, the guest has its full size again
    there = figures(310 * MiB, free=40 * MiB, total=squeeze.target - RESERVED + 10 * MiB)
    done = decide(there, going, squeeze.target, REPORTING, RESERVED)
    assert done.target == SIZE and done.why.startswith("squeeze done")


def test_a_squeeze_is_there_when_the_guests_logical_size_is() -> None:
    """MemTotal at the target plus a step is still the reserved part short of it: looking on (ending there
    left the guest whatever it held at that look, up to 150 MiB more cache than the target on 3 GiB)."""
    start = figures(310 * MiB, free=200 * MiB)
    target = decide(start, start, SIZE, REPORTING, RESERVED).target
    short_of_it = figures(310 * MiB, free=100 * MiB, total=target + 30 * MiB - RESERVED)  # 130 MiB available
    assert short_of_it.total <= target  # what the old check called "reached"
    assert decide(short_of_it, start, target, REPORTING, RESERVED) == Decision(target, 5.0, "squeezing")


def test_reporting_empties_a_squeeze_that_stopped_getting_closer() -> None:
    stuck = figures(310 * MiB, free=150 * MiB, total=1500 * MiB)
    decision = decide(stuck, stuck, 600 * MiB, REPORTING, RESERVED)
    assert decision.target == SIZE and decision.why.startswith("squeeze stopped getting closer")


def test_a_squeeze_ends_when_the_guest_is_short_or_its_use_grows() -> None:
    start = figures(310 * MiB, free=200 * MiB)
    target = decide(start, start, SIZE, REPORTING, RESERVED).target
    # half the headroom or less available is what a squeeze to a quarter leaves: not short yet
    going = figures(310 * MiB, free=20 * MiB, total=410 * MiB)
    assert going.available < REPORTING.headroom_bytes // 2
    assert decide(going, start, target, REPORTING, RESERVED).target == target
    # under an eighth: short (a process took what the squeeze left)
    short = figures(470 * MiB, free=10 * MiB, total=500 * MiB)
    assert short.available < REPORTING.headroom_bytes // 8
    assert decide(short, None, target, REPORTING, RESERVED).target == SIZE
    # use grew by a step since the reference: work started, it gets everything back before it is short
    busy = figures(390 * MiB, free=200 * MiB, total=900 * MiB)
    decision = decide(busy, start, target, REPORTING, RESERVED)
    assert decision.target == SIZE and "use grew" in decision.why


def test_reporting_leaves_a_guest_whose_free_memory_went_back_by_itself() -> None:
    idle = figures(300 * MiB)  # everything not used is free: free page reporting returned it already
    decision = decide(idle, idle, SIZE, REPORTING)
    assert decision == Decision(SIZE, REPORTING.idle_interval, "")


def test_a_busy_guest_is_watched_not_squeezed() -> None:
    before = figures(300 * MiB, free=200 * MiB)
    busy = figures(900 * MiB, free=100 * MiB)
    for policy in (REPORTING, HOLD):
        decision = decide(busy, before, SIZE, policy)
        assert decision.target == SIZE and decision.interval == policy.watch_interval


def test_a_guest_filling_its_cache_is_not_quiet() -> None:
    before = figures(300 * MiB, free=1000 * MiB)
    reading = figures(300 * MiB, free=600 * MiB)  # use unchanged, 400 MiB more cached: a build reading files
    assert decide(reading, before, SIZE, REPORTING).target == SIZE
    assert decide(reading, before, SIZE, HOLD).target == SIZE
    assert decide(reading, reading, SIZE, REPORTING).target < SIZE  # once it stops, the squeeze comes


def test_hold_follows_a_quiet_guest_down_and_stays_watched() -> None:
    idle = figures(300 * MiB, free=1400 * MiB)
    down = decide(idle, idle, SIZE, HOLD)
    assert down.target == wanted(idle, HOLD) == 556 * MiB and down.interval == HOLD.watch_interval
    inflated = figures(300 * MiB, total=down.target - 50 * MiB)
    steady = decide(inflated, inflated, down.target, HOLD)
    assert steady.target == down.target and steady.interval == HOLD.watch_interval  # held: keep looking


def test_hold_gives_everything_back_the_moment_the_guest_needs_it() -> None:
    short = figures(440 * MiB, total=556 * MiB)  # 116 MiB available: under half the headroom
    assert needs_memory(short, None, HOLD)
    decision = decide(short, figures(300 * MiB, total=556 * MiB), 556 * MiB, HOLD)
    assert decision.target == SIZE and decision.interval == HOLD.watch_interval


def test_swapping_more_is_needing_memory() -> None:
    before = figures(300 * MiB, total=800 * MiB)
    swapping = figures(300 * MiB, total=800 * MiB, swapped=200 * MiB)
    assert decide(swapping, before, 800 * MiB, HOLD).target == SIZE
    assert decide(swapping, before, SIZE, REPORTING).target == SIZE


def test_hold_grows_with_use_before_the_guest_is_short() -> None:
    before = figures(300 * MiB, total=700 * MiB)
    growing = figures(480 * MiB, total=700 * MiB)  # 220 MiB available: not short, but less than the headroom
    assert not needs_memory(growing, before, HOLD)
    decision = decide(growing, before, 700 * MiB, HOLD)
    assert decision.target == 480 * MiB + HOLD.headroom_bytes and decision.interval == HOLD.watch_interval


def test_small_moves_are_noise() -> None:
    idle = figures(300 * MiB, total=600 * MiB)
    current = wanted(idle, HOLD) + 32 * MiB  # within a step of what it would ask for
    assert decide(idle, idle, current, HOLD).target == current


def test_never_below_the_floor_nor_use_plus_headroom() -> None:
    for used in (0, 100 * MiB, 700 * MiB, 1500 * MiB, 1900 * MiB):
        idle = figures(used, free=50 * MiB if used < 1800 * MiB else 10 * MiB)
        held = decide(idle, idle, SIZE, HOLD).target
        assert held >= HOLD.floor_bytes and held >= min(SIZE, used + HOLD.headroom_bytes)
        squeezed = decide(idle, idle, SIZE, REPORTING, RESERVED).target  # seconds long, ended when short
        assert squeezed >= 256 * MiB and squeezed >= min(SIZE, used + REPORTING.headroom_bytes // 4 + RESERVED)


def test_the_kernels_balloon_statistics_are_figures() -> None:
    stats = {"stat-total-memory": 1900 * MiB, "stat-free-memory": 1200 * MiB, "stat-available-memory": 1500 * MiB,
             "stat-disk-caches": 250 * MiB, "stat-swap-out": 1000, "stat-swap-in": 5, "stat-htlb-pgalloc": 0}
    figures_ = Figures.of_balloon_stats(stats)
    assert figures_ is not None
    assert (figures_.total, figures_.free, figures_.available, figures_.cached) == (
        1900 * MiB, 1200 * MiB, 1500 * MiB, 250 * MiB)
    assert figures_.used == 400 * MiB and figures_.resident == 700 * MiB
    assert figures_.swapped == 1000 * 4096  # pages swapped out since boot: more of them is "swapping more"
    # QEMU says -1 for what the guest has not reported (before its first answer, or an old driver)
    assert Figures.of_balloon_stats({**stats, "stat-available-memory": -1}) is None
    assert Figures.of_balloon_stats({}) is None


def test_a_guest_whose_memory_moved_is_looked_at_again_soon() -> None:
    quick = Policy(SIZE, "reporting", idle_interval=10, active_interval=2, watch_interval=5)
    before = figures(300 * MiB, free=1000 * MiB)
    reading = figures(300 * MiB, free=600 * MiB)
    assert decide(reading, before, SIZE, quick).interval == 2  # the look that finds it quiet comes soon
    squeeze = decide(reading, reading, SIZE, quick)  # ... and squeezes at once
    assert squeeze.target < SIZE and squeeze.interval == 2  # a squeeze is watched closely: it ends when short
    done = figures(300 * MiB, free=100 * MiB, total=squeeze.target)
    assert decide(done, reading, squeeze.target, quick).target == SIZE
    short = figures(400 * MiB, free=0, total=squeeze.target + 70 * MiB)  # the guest took memory mid-squeeze
    assert short.available < quick.headroom_bytes // 2
    assert decide(short, reading, squeeze.target, quick).target == SIZE
    there_and_short = figures(400 * MiB, free=0, total=squeeze.target)  # a squeeze's end: half the headroom left
    ended = decide(there_and_short, reading, squeeze.target, quick)
    assert ended.target == SIZE and ended.why.startswith("squeeze done")
    assert decide(figures(300 * MiB), figures(300 * MiB), SIZE, quick).interval == 10  # idle: the long look


def test_quick_looks_are_judged_over_the_watch_interval() -> None:
    a, b, c, d = (figures(used * MiB) for used in (100, 200, 300, 400))
    looks = remember([], 0.0, a, 5.0)
    assert looks == [(0.0, a)] and reference(looks, 0.0, 5.0) is None  # a first look: nothing to compare with
    looks = remember(looks, 2.0, b, 5.0)
    assert looks == [(0.0, a), (2.0, b)] and reference(looks, 2.0, 5.0) is None  # none 5 s old yet
    looks = remember(looks, 4.0, c, 5.0)
    looks = remember(looks, 6.0, d, 5.0)
    assert looks == [(0.0, a), (2.0, b), (4.0, c), (6.0, d)] and reference(looks, 6.0, 5.0) == a
    looks = remember(looks, 8.0, d, 5.0)
    assert looks[0] == (2.0, b) and len(looks) == 4 and reference(looks, 8.0, 5.0) == b  # older ones go
    idle = remember([(0.0, a)], 10.0, a, 5.0)
    assert idle == [(0.0, a), (10.0, a)] and reference(idle, 10.0, 5.0) == a  # at idle, the look before


def test_a_squeeze_two_seconds_old_is_not_stuck() -> None:
    """Quick looks during a squeeze: no reference 5 s old yet (the agent forgot its looks when the target
    moved), so only "reached" or "short" end it; from 5 s on, under a quarter step closer is stuck."""
    quick = Policy(SIZE, "reporting", idle_interval=10, active_interval=2, watch_interval=5)
    start = figures(300 * MiB, free=600 * MiB)
    target = decide(start, start, SIZE, quick).target
    looks = [(0.0, start)]
    barely = figures(300 * MiB, free=580 * MiB, total=start.total - 20 * MiB)  # 2 s in: 20 MiB inflated
    looks = remember(looks, 2.0, barely, 5.0)
    assert decide(barely, reference(looks, 2.0, 5.0), target, quick) == Decision(target, 2, "squeezing")
    looks = remember(looks, 6.0, barely, 5.0)  # 6 s in, 20 MiB closer: slow (TCG), not stuck
    assert decide(barely, reference(looks, 6.0, 5.0), target, quick).target == target
    stopped = figures(300 * MiB, free=575 * MiB, total=start.total - 25 * MiB)  # 5 MiB more in 6 s: stuck
    looks = remember(looks, 12.0, stopped, 5.0)
    assert decide(stopped, reference(looks, 12.0, 5.0), target, quick).target == SIZE
