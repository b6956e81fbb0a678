"""The time pusher's spacing: pushes space out while the guest's clock keeps time, and come back to the
configured interval as soon as one has to step it."""

from __future__ import annotations

from boxpark.host.timesync import MAX_SPACING, next_interval


def test_pushes_space_out_while_the_clock_keeps_time_and_come_back_after_a_step() -> None:
    every, seen = 60.0, []
    for _ in range(6):
        every = next_interval(every, 60.0, stepped=False)
        seen.append(every)
    assert seen == [120.0, 240.0, 480.0, 480.0, 480.0, 480.0] and MAX_SPACING * 60.0 == 480.0
    assert next_interval(480.0, 60.0, stepped=True) == 60.0
    assert next_interval(60.0, 5.0, stepped=False) == 40.0  # never beyond MAX_SPACING times the interval
