"""Boot time: sandbox spawn → Ready, and QEMU (TCG) start → Ready, each with its shares and a reference.

No other program does a Boxpark guest's work, so the references of the two boot figures are floors, measured
in the same run, alternating with the boots after a warm-up of each, and marked `"reference_is": "floor"`:
- sandbox: the median of several boots, against the same fresh namespaces (with --cgroup) mounting the
  image's root squashfs from its loop device and starting the image's `python3 -S -I -c pass` in it
  (the floor of "unshare + the image's Python": what any init in this image pays); goal ≤ 150 ms. Its
  shares: namespaces, pre-init and the init's Python start (measured from the spawn: in the sandbox the
  guest's monotonic clock is the host's), then the init's steps. Also the image's Python started cold
  from a fresh squashfs mount against the same start warm: the sandbox pays the cold one on every boot.
  And the CPU time the sandbox used up to Ready (its cgroup's usage_usec: the pre-init, the init, the
  kernel's work on their behalf, squashfs decompression included; plus the pre-init's own CPU, whose
  Python starts before the host has moved it into the cgroup) against the floor's (its process tree's
  rusage): on a shared 2-core host the wall times mostly measure the wait for a CPU, this does not.
- qemu: start (spawn of QEMU) → Ready under TCG, goal ≤ 5 s, against QEMU booting the same kernel,
  initramfs and root to the init's first log line (the floor: all a boot does before the init runs);
  shares from the guest's clock; and `-cpu max` A/B against QEMU's default CPU model (the same work).

Needs root and the built image (`boxpark image build`). Skips what this host cannot run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._report import figure, say

SANDBOX_RUNS = 5
QEMU_RUNS = 5


def image() -> Path:
    from boxpark.image.build import build_image, default_image_dir

    return Path(build_image(default_image_dir("amd64" if os.uname().machine == "x86_64" else "arm64", True)))


async def sandbox_boot(image_dir: Path) -> tuple[float, dict[str, float], float]:
    """One boot: (spawn → Ready seconds, the shares by label, with "spawn → the init's first line", CPU
    seconds of the sandbox's cgroup at Ready)."""
    from boxpark.host.backends import get_backend
    from boxpark.host.boot import boot_shares
    from boxpark.host.spec import spec_from_image

    state = tempfile.mkdtemp(prefix="bp-bench-", dir="/tmp")
    try:
        spec = spec_from_image(image_dir, state, kernel=None, initrd=None)
        backend = get_backend("sandbox")
        async with backend:
            await backend.start(spec)
            ready = await backend.wait_ready(180)
            assert backend.cgroup is not None and backend.unshare is not None
            # the pre-init's Python starts before the host has moved it into the cgroup: its CPU is added
            # (its own, to Ready: its part after the move, unshare and fork, <1 ms, is counted twice)
            cpu = _cgroup_cpu(backend.cgroup.path) + _task_cpu(backend.unshare.pid)
            total, shares = boot_shares(backend, ready)
            first = _stamp(spec.init_log, r"boxpark-init: \[\s*([\d.]+)\] started")
            exec_init = _stamp(spec.console_log, r"boxpark-preinit: \[\s*([\d.]+)\]")
            assert backend.spawned_at is not None
        result = {share.label: share.seconds for share in shares}
        # the logs' stamps are CLOCK_MONOTONIC: in the sandbox, the host's
        if exec_init is not None:
            result["spawn -> exec of the init (the pre-init: namespaces, root)"] = exec_init - backend.spawned_at
        if first is not None:
            result["spawn -> the init's first log line"] = first - backend.spawned_at
        return total, result, cpu
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _cgroup_cpu(path: str) -> float:
    """CPU seconds (user + system) used by the processes of a cgroup2 directory and its descendants."""
    with open(f"{path}/cpu.stat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
    raise RuntimeError(f"{path}/cpu.stat has no usage_usec")


def _task_cpu(pid: int) -> float:
    """CPU seconds a single-threaded process has run (/proc/PID/schedstat: nanoseconds, not clock ticks)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stamp(path: str, pattern: str) -> float | None:
    import re

    match = re.search(pattern, Path(path).read_text(errors="replace"))
    return float(match[1]) if match else None


async def qemu_boot(image_dir: Path, cpu: str | None, fast_boot: bool = True) -> tuple[float, dict[str, float]]:
    from boxpark.host.backends.qemu import QemuBackend
    from boxpark.host.boot import boot_shares
    from boxpark.host.spec import spec_from_image

    state = tempfile.mkdtemp(prefix="bp-bench-", dir="/tmp")
    try:
        spec = spec_from_image(image_dir, state, memory=1024)
        backend = QemuBackend(cpu=cpu, fast_boot=fast_boot)
        async with backend:
            await backend.start(spec)
            ready = await backend.wait_ready(180)
            total, shares = boot_shares(backend, ready)
            first = _stamp(spec.init_log, r"boxpark-init: \[\s*([\d.]+)\] started")
        result = {share.label: share.seconds for share in shares}
        if first is not None:  # the guest's CLOCK_MONOTONIC: 0 is (about) the kernel's start
            result["kernel -> the init's first log line"] = first
            result["the init's first log line -> Ready"] = ready.monotonic_ns / 1e9 - first
        return total, result
    finally:
        shutil.rmtree(state, ignore_errors=True)


def image_python_in_namespaces(image_dir: Path) -> tuple[float, float]:
    """Seconds from spawning the sandbox's unshare to the exit of the image's `python3 -S -I -c pass`, run
    on the image's root squashfs freshly mounted in those namespaces (the loop device attached before the
    spawn, as the sandbox backend does); and the CPU seconds of that process tree."""
    from boxpark.host.backends.sandbox import _unshare, loop_device

    script = 'mount -t squashfs -o ro "$1" "$2" && exec chroot "$2" /usr/bin/python3 -S -I -c pass'
    with tempfile.TemporaryDirectory(prefix="bp-bench-") as mnt, loop_device(str(image_dir / "root.squashfs")) as dev:
        argv = [*_unshare(), "sh", "-c", script, "sh", dev, mnt]
        cpu = _children_cpu()
        began = time.monotonic()
        subprocess.run(argv, check=True)
        return time.monotonic() - began, _children_cpu() - cpu


def image_python_cold_and_warm(image_dir: Path) -> tuple[float, float]:
    """The image's `python3 -SI -c pass`: first start on a fresh squashfs mount, and a second (warm) one."""
    from boxpark.host.backends.sandbox import loop_device

    script = ('set -e; root=$2; mount -t squashfs -o ro "$1" "$root"; '
              't() { s=$(date +%s%N); chroot "$root" /usr/bin/python3 -SI -c pass; e=$(date +%s%N); '
              'echo $(( e - s )); }; t; t')
    with tempfile.TemporaryDirectory(prefix="bp-bench-") as mnt, loop_device(str(image_dir / "root.squashfs")) as dev:
        out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", dev, mnt],
                             check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]) / 1e9, int(out[1]) / 1e9


def sandbox(image_dir: Path) -> None:
    asyncio.run(sandbox_boot(image_dir))  # warm-up of both: page cache, loop driver, Python's own caches
    image_python_in_namespaces(image_dir)
    runs: list[tuple[float, dict[str, float]]] = []
    references: list[float] = []
    cpus: list[float] = []
    reference_cpus: list[float] = []
    for _ in range(SANDBOX_RUNS):  # interleaved, so a busy moment of the host hurts both alike
        total, shares, cpu = asyncio.run(sandbox_boot(image_dir))
        runs.append((total, shares))
        cpus.append(cpu)
        wall, cpu = image_python_in_namespaces(image_dir)
        references.append(wall)
        reference_cpus.append(cpu)
    say(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    totals = [total for total, _ in runs]
    median = statistics.median(totals)
    say(f"sandbox spawn -> Ready: {', '.join(f'{t * 1000:.0f}' for t in totals)} ms; floor (namespaces, "
        f"squashfs mount, the image's Python): {', '.join(f'{t * 1000:.0f}' for t in references)} ms")
    figure("boot_sandbox_spawn_to_ready", median * 1000, "ms", statistics.median(references) * 1000, "<= 150 ms",
           reference_is="floor")
    say(f"sandbox CPU to Ready: {', '.join(f'{t * 1000:.0f}' for t in cpus)} ms; the floor's: "
        f"{', '.join(f'{t * 1000:.0f}' for t in reference_cpus)} ms")
    figure("boot_sandbox_cpu_to_ready", statistics.median(cpus) * 1000, "ms",
           statistics.median(reference_cpus) * 1000, "informational: the work, without the wait for a CPU",
           reference_is="floor")
    for label in runs[0][1]:
        share = statistics.median(shares[label] for _, shares in runs)
        say(f"  {label}: {share * 1000:.0f} ms ({share / median:.0%})")
    first = runs[0][1]
    before = statistics.median(shares[next(iter(first))] for _, shares in runs)
    figure("boot_sandbox_before_init_steps", before * 1000, "ms", median * 1000, "share (informational)",
           reference_is="share")
    for key, name, goal in (
            ("spawn -> exec of the init (the pre-init: namespaces, root)", "boot_sandbox_spawn_to_exec_init",
             "share: the host's part (the pre-init: namespaces, root)"),
            ("spawn -> the init's first log line", "boot_sandbox_spawn_to_init_first_line",
             "share: + the image's Python and the init's first imports")):
        if all(key in shares for _, shares in runs):
            part = statistics.median(shares[key] for _, shares in runs)
            figure(name, part * 1000, "ms", median * 1000, goal, reference_is="share")
    cold, warm = image_python_cold_and_warm(image_dir)
    figure("boot_sandbox_image_python_cold_start", cold * 1000, "ms", warm * 1000, "informational: paid every boot")


def qemu(image_dir: Path) -> None:
    from boxpark.host.backends.qemu import kvm_usable

    if shutil.which("qemu-system-x86_64") is None:
        say("no qemu-system-x86_64: skipped")
        return
    use_kvm, why = kvm_usable("amd64")
    accel = "kvm" if use_kvm else "tcg"
    say(f"qemu: {accel} ({why}); load average {_load()}")
    from bench.image_build import boot as boot_to_init

    kinds = {  # name -> (cpu, fast_boot)
        "default": (None, True),  # what `boxpark up` does: qboot, the PVH kernel, cryptomgr.notests
        "main": (None, False),  # the boot path before: SeaBIOS and the bzImage (BOXPARK_QEMU_FAST_BOOT=0)
        "max": ("max" if accel == "tcg" else "host", True),
    }
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {kind: [] for kind in kinds}
    floor: list[float] = []
    loads = [_load()]
    with tempfile.TemporaryDirectory(prefix="bp-bench-") as work:
        for cpu, fast in kinds.values():  # warm-up of each: the page cache, the PVH kernel's cache entry
            asyncio.run(qemu_boot(image_dir, cpu, fast))
        boot_to_init(image_dir, Path(work), accel=accel)
        for _ in range(QEMU_RUNS):  # interleaved, so a busy moment of the host hurts all alike
            for kind, (cpu, fast) in kinds.items():
                runs[kind].append(asyncio.run(qemu_boot(image_dir, cpu, fast)))
            floor.append(boot_to_init(image_dir, Path(work), accel=accel)[1])
            loads.append(_load())
    default = runs["default"]
    total = statistics.median(t for t, _ in default)
    main_total = statistics.median(t for t, _ in runs["main"])
    for kind, label in (("default", "default"), ("main", "SeaBIOS + bzImage, as before"), ("max", "-cpu max")):
        say(f"qemu start -> Ready ({label}): {', '.join(f'{t:.2f}' for t, _ in runs[kind])} s")
    say(f"floor (QEMU to the init's first line, SeaBIOS + bzImage, 1 CPU): {', '.join(f'{t:.2f}' for t in floor)} s; "
        f"load average {', '.join(loads)}")
    labels = [label for label in default[0][1] if all(label in s for _, s in default)]
    shares = {label: statistics.median(s[label] for _, s in default) for label in labels}
    for label, seconds in shares.items():
        say(f"  {label}: {seconds:.2f} s ({seconds / total:.0%})")
    kernel = shares["kernel, initramfs, the init's start"]
    init = shares["init steps"]
    figure(f"boot_qemu_{accel}_start_to_ready", total, "s", main_total, "<= 5 s")
    figure(f"boot_qemu_{accel}_floor_to_init_first_line", statistics.median(floor), "s", total,
           "informational: QEMU as bench/image_build boots it, to the init's first line", reference_is="floor")
    figure(f"boot_qemu_{accel}_kernel_share", kernel, "s", total, "share (informational)", reference_is="share")
    figure(f"boot_qemu_{accel}_init_steps_share", init, "s", total, "share (informational)", reference_is="share")
    if "kernel -> the init's first log line" in shares:
        figure(f"boot_qemu_{accel}_kernel_to_init_first_line", shares["kernel -> the init's first log line"], "s",
               total, "share: kernel, initramfs, the image's Python start and the init's first imports",
               reference_is="share")
        figure(f"boot_qemu_{accel}_init_first_line_to_ready", shares["the init's first log line -> Ready"], "s",
               total, "share: the init, from its first line to Ready", reference_is="share")
    figure(f"boot_qemu_{accel}_cpu_max", statistics.median(t for t, _ in runs["max"]), "s", total,
           "ratio < 1 would make max the default")


def _load() -> str:
    return open("/proc/loadavg").read().split()[0]


def main() -> None:
    if os.geteuid() != 0:
        say("needs root (loop devices, namespaces): skipped")
        return
    image_dir = image()
    sandbox(image_dir)
    qemu(image_dir)


if __name__ == "__main__":
    main()
