"""Boot to the first container: from `boxpark up` with no agent running to the first
`docker run --rm --network none IMAGE true` exiting 0, per backend, against the host's own dockerd from
its start to the same `docker run` exiting.

The image (the tests' busybox) is imported beforehand on both sides: the sandbox keeps dockerd's data on a
tmpfs, so its machine here mounts a host directory on /var/lib/docker (the qemu backend keeps it on its
data disk anyway); the host's dockerd keeps its private data root between starts. One warm-up of each
side (which imports the image), then SAMPLES samples, alternating sides; figures are medians. The host's
dockerd runs without a bridge or iptables (it must not touch the host's network), hence `--network none`
on both sides.

The Boxpark figure is split into phases by the agent's log (its timestamps, to the millisecond): up → the
agent's first event (the CLI and the agent's own start), prepare, boot (backend start → the guest's Ready),
init phase (Ready → dockerd launched), dockerd → READY=1, proxy (READY=1 → the Docker socket served), up's
return (the CLI noticing), and the first `docker run`. Each is a JSON line of its own ("share").

The sandbox always runs; qemu (TCG here: minutes) only with BOXPARK_BENCH_QEMU=1.
Run: `python -m bench first_container`.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._report import (HostDockerd, down, figure, load_test_image, machine_docker, machine_home,
                           run_container, say, up)

SAMPLES = 5
QEMU_SAMPLES = 2
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ \w+ (.*)$")
# (phase key, what it is, the agent log's message that ends it); each starts where the one before ends
MARKS = [
    ("cli_and_agent_start", "up -> the agent's first event", r"\[prepare\] preparing"),
    ("prepare", "prepare", r"\[boot\] booting"),
    ("boot", "boot (backend start -> Ready)", r"\[boot\] guest ready"),
    ("init_phase", "init phase (Ready -> dockerd launched)", r"\[service\] starting dockerd"),
    ("dockerd_ready", "dockerd -> READY=1", r"dockerd: READY=1"),
    ("proxy", "proxy (READY=1 -> Docker socket served)", r"\[running\] docker is ready"),
]
AFTER = [("up_returns", "up returns (the CLI notices)"), ("first_run", "the first docker run")]


def agent_marks(log: Path) -> list[float]:
    """The wall-clock time of each mark in MARKS, from the agent's log (the last bring-up in it)."""
    lines = log.read_text(errors="replace").splitlines()
    start = max((i for i, line in enumerate(lines) if re.search(MARKS[0][2], line)), default=0)
    found: list[float] = []
    for _, _, pattern in MARKS:
        for line in lines[start:]:
            match = LOG_LINE.match(line)
            if match and re.search(pattern, match[3]):
                found.append(time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S")) + int(match[2]) / 1000)
                break
        else:
            raise RuntimeError(f"no {pattern!r} in {log}")
    return found


def boxpark_sample(home: Path, image: str) -> tuple[float, dict[str, float]]:
    """One `up` (no agent running) → first run, and its phases; the machine is brought down after it."""
    machine = home / "b"
    try:
        began_wall, began = time.time(), time.perf_counter()
        up(home)
        upped_wall = time.time()
        run_started = time.perf_counter()
        run_container(machine_docker(machine), image)
        ended = time.perf_counter()
        marks = agent_marks(machine / "agent.log")
    finally:
        down(home)
    phases: dict[str, float] = {}
    previous = began_wall
    for (key, _, _), mark in zip(MARKS, marks):
        phases[key] = mark - previous
        previous = mark
    phases["up_returns"] = upped_wall - previous
    phases["first_run"] = ended - run_started
    return ended - began, phases


def host_sample(dockerd: HostDockerd, image: str) -> tuple[float, float]:
    """One start of the host's dockerd → first run: (total, start → /_ping answered); stopped after it."""
    try:
        ready = dockerd.start()
        run_container(dockerd.docker, image)
        total = time.monotonic() - dockerd.started_at
    finally:
        dockerd.stop()
    return total, ready


def measure(backend: str, samples: int, dockerd: HostDockerd, image: str, config: str) -> None:
    home = machine_home(backend, config)
    try:
        up(home)  # warm-up: builds or checks the image, imports the test image into the kept data
        load_test_image(machine_docker(home / "b"), home)
        down(home)
        host_sample(dockerd, image)
        runs: list[tuple[float, dict[str, float]]] = []
        refs: list[tuple[float, float]] = []
        for _ in range(samples):  # alternating, so a busy moment of the machine hurts both alike
            runs.append(boxpark_sample(home, image))
            refs.append(host_sample(dockerd, image))
    finally:
        down(home)
        shutil.rmtree(home, ignore_errors=True)
    totals = [t for t, _ in runs]
    say(f"{backend}: up -> first run: {', '.join(f'{t:.2f}' for t in totals)} s; "
        f"host's dockerd: {', '.join(f'{t:.2f}' for t, _ in refs)} s")
    total = statistics.median(totals)
    reference = statistics.median(t for t, _ in refs)
    figure(f"first_container_{backend}", total, "s", reference,
           "informational (Docker VMs on a Mac: 0.77-8.9 s, OrbStack 1.5 s)")
    for key, label in [(key, label) for key, label, _ in MARKS] + AFTER:
        share = statistics.median(p[key] for _, p in runs)
        figure(f"first_container_{backend}_phase_{key}", share, "s", total, f"share: {label}",
               reference_is="share")
    figure(f"first_container_{backend}_reference_dockerd_start_to_ping", statistics.median(r for _, r in refs),
           "s", reference, "share of the reference: the host's dockerd's start to its first answer",
           reference_is="share")


def main() -> None:
    if os.geteuid() != 0 or not shutil.which("docker") or not shutil.which("dockerd"):
        say("first_container: needs root, docker and dockerd: skipped")
        return
    with tempfile.TemporaryDirectory(prefix="bphd", dir="/tmp") as tmp:
        work = Path(tmp)
        dockerd = HostDockerd(work)
        try:
            dockerd.start()
            image = load_test_image(dockerd.docker, work)
        finally:
            dockerd.stop()
        with tempfile.TemporaryDirectory(prefix="bench-docker-data-", dir="/var/tmp") as data:
            measure("sandbox", SAMPLES, dockerd, image,
                    f'[[mounts]]\nsource = "{data}"\ntarget = "/var/lib/docker"\n')
        if os.environ.get("BOXPARK_BENCH_QEMU") == "1":
            measure("qemu", QEMU_SAMPLES, dockerd, image, "")
        else:
            say("qemu: skipped (TCG takes minutes here; BOXPARK_BENCH_QEMU=1 runs it)")
        dockerd.stop()


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.exit("run it as: python -m bench first_container")
    main()
