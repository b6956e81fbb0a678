"""Container start: `docker run --rm --network none IMAGE true` through Boxpark (sandbox) against the host's own
dockerd, both running, runs interleaved.

The image is the tests' busybox (no registry here), imported into both beforehand. `--network none` on both
sides: the host's dockerd runs without a bridge (it must not touch the host's network), so neither side pays
for a network namespace's veth. Each side gets warm-up runs, then RUNS timed runs alternating with the
other's; figures are the median and p90 (the docker CLI's whole run, as a user sees it). Goal: median
≤ 1.1× the host's.
Run: `python -m bench container_start`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys

from bench._report import (figure, host_dockerd, load_test_image, machine_docker, p90, run_container,
                           sandbox_machine, say)

RUNS = 20
WARM_UP = 3


def timed_run(docker: list[str], image: str) -> float:
    import time

    start = time.perf_counter()
    run_container(docker, image)
    return time.perf_counter() - start


def main() -> None:
    if os.geteuid() != 0 or not shutil.which("docker") or not shutil.which("dockerd"):
        say("container_start: needs root, docker and dockerd: skipped")
        return
    with sandbox_machine() as machine, host_dockerd() as host:
        boxpark = machine_docker(machine)
        image = load_test_image(boxpark, machine.parent)
        load_test_image(host.docker, host.directory)
        via: list[float] = []
        ref: list[float] = []
        for _ in range(WARM_UP):
            timed_run(boxpark, image)
            timed_run(host.docker, image)
        for _ in range(RUNS):
            via.append(timed_run(boxpark, image))
            ref.append(timed_run(host.docker, image))
    say(f"through Boxpark: {', '.join(f'{t * 1000:.0f}' for t in via)} ms")
    say(f"host's dockerd:  {', '.join(f'{t * 1000:.0f}' for t in ref)} ms")
    figure("container_start_median", statistics.median(via) * 1000, "ms", statistics.median(ref) * 1000,
           "ratio <= 1.1 (sandbox)")
    figure("container_start_p90", p90(via) * 1000, "ms", p90(ref) * 1000, "informational (ratio <= 1.1 at the median)")


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.exit("run it as: python -m bench container_start")
    main()
