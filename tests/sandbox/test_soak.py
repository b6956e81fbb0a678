"""The soak's short run (`bench/soak.py` for 75 s of load: one agent kill and `up`, one dockerd kill):
what must hold whatever the machine's speed. Docker works at the end; no log line is lost within the
ring's bounds; the agent's and the guest init's fds and threads come back to their warm-up figures once
the load ends (the soak waits for that with a deadline); the `info` probe never went unanswered outside
the agent-kill window; every load got through at least once after the second `up`. Latency is the
benchmark's business (`python -m bench soak`), never asserted here.
"""

from __future__ import annotations

import os
import shutil

import pytest

from bench import soak

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("docker") is None,
                                 reason="needs root, unshare and the docker CLI")]


def test_a_short_soak_leaves_the_machine_as_it_found_it() -> None:
    result = soak.run(75, tolerance=0.05, slack=2)
    context = result.summary()
    assert result.docker_working, context
    assert result.lines > 0 and result.lost == 0, context
    assert result.settled, context
    assert result.probe_ms and not result.probe_failures, context
    assert all(tally.since_up > 0 for tally in result.tallies.values()), context
