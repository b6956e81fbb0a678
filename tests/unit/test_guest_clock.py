"""The guest clock's answer to a host push (`clock.correction`): nothing, a slew or a step."""

from __future__ import annotations

import pytest

from boxpark.guest.clock import SLEW_LIMIT_NS, correction

MS = 1_000_000


@pytest.mark.parametrize("offset", [0, 4 * MS, -5 * MS])
def test_within_the_threshold_nothing_happens(offset: int) -> None:
    assert correction(offset, 5 * MS, first=False) is None
    assert correction(offset, 5 * MS, first=True) is None


@pytest.mark.parametrize("offset", [6 * MS, -30 * MS, SLEW_LIMIT_NS, -SLEW_LIMIT_NS])
def test_a_later_push_a_little_off_slews(offset: int) -> None:
    assert correction(offset, 5 * MS, first=False) == "slew"


@pytest.mark.parametrize("offset", [6 * MS, -30 * MS])
def test_the_first_push_steps(offset: int) -> None:
    assert correction(offset, 5 * MS, first=True) == "step"


@pytest.mark.parametrize("offset", [SLEW_LIMIT_NS + 1, -SLEW_LIMIT_NS - 1, 60 * 10**9, -3600 * 10**9])
def test_far_off_steps(offset: int) -> None:
    # a paused VM, a host that slept: a slew of 0.5 ms/s would take hours
    assert correction(offset, 5 * MS, first=False) == "step"


def test_a_zero_threshold_still_slews_small_offsets_after_the_first() -> None:
    assert correction(1, 0, first=False) == "slew"
    assert correction(1, 0, first=True) == "step"
