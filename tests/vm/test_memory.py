"""Memory back to the host on QEMU (TCG): after a container's burst, the VM process shrinks again by itself.

One `boxpark up` of a 2 GiB guest (the user's defaults otherwise): free page reporting returns what the
burst freed, the agent's balloon task runs as it does for users, docker still works and the guest's kernel
killed nothing for memory.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.upmachine import IMAGE, UpMachine, load_busybox

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None
                                 or shutil.which("docker") is None,
                                 reason="needs root, qemu-system-x86 and the docker CLI")]

MiB = 1024 * 1024
CONFIG = """
memory = "2GiB"
[disk]
size = "4GiB"
"""


@pytest.fixture(scope="module")
def machine(request: pytest.FixtureRequest):
    with UpMachine("qemu", CONFIG).running(request) as m:
        yield m


def qemu_pid(m: UpMachine) -> int:
    record = json.loads((m.dir / "backend" / "machine.json").read_text())
    (pid,) = record["pids"]
    return int(pid)


def rss(pid: int) -> int:
    """The process's resident memory (anonymous, file and shared: a memfd-backed guest's RAM is shared)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def guest_ram_rss(pid: int, size: int = 2048 * MiB) -> int:
    """The resident part of the guest's RAM mapping (the one mapping of the machine's size): the rest of the
    RSS is QEMU's own (under TCG mostly its translation cache, up to 1 GiB of 64 MiB regions)."""
    total, mapping_size = 0, 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and ":" not in first:
            start, end = (int(x, 16) for x in first.split("-"))
            mapping_size = end - start
        elif first == "Rss:" and mapping_size >= size:
            total += int(line.split()[1]) * 1024
    return total


def settled_rss(pid: int, deadline: float = 120.0) -> int:
    """RSS once it stops moving by more than 16 MiB over 10 s (boot and dockerd's start still touch pages)."""
    end = time.monotonic() + deadline
    last = rss(pid)
    while time.monotonic() < end:
        time.sleep(10)
        now = rss(pid)
        if abs(now - last) < 16 * MiB:
            return now
        last = now
    return last


class PeakRss:
    """The highest RSS of `pid` seen while the block runs (sampled by a thread: the guest may give pages back
    before the block ends)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.value = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.25):
            self.value = max(self.value, rss(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.value = max(self.value, rss(self.pid))


def oom_kills(m: UpMachine) -> int:
    vmstat = m.cli("exec", "--", "cat", "/proc/vmstat")
    assert vmstat.returncode == 0, vmstat.stderr
    return next(int(line.split()[1]) for line in vmstat.stdout.splitlines() if line.startswith("oom_kill "))


def test_memory_goes_back_after_a_burst(machine: UpMachine, tmp_path: Path) -> None:
    load_busybox(machine, tmp_path)
    warm = machine.docker("run", "--rm", IMAGE, "echo", "warm")  # the runtime's first start, before the baseline
    assert warm.returncode == 0, warm.stderr
    pid = qemu_pid(machine)
    idle = settled_rss(pid)
    idle_ram = guest_ram_rss(pid)
    kills = oom_kills(machine)
    # busybox dd reads /dev/zero into one 1.5 GiB buffer: every page of it touched, anonymous, then freed
    with PeakRss(pid) as peak:
        burst = machine.docker("run", "--rm", IMAGE, "/bin/busybox", "dd", "if=/dev/zero", "of=/dev/null",
                               "bs=1536M", "count=1", timeout=600)
    assert burst.returncode == 0, burst.stderr
    deadline = time.monotonic() + 90
    now = rss(pid)
    while now >= idle + 400 * MiB and time.monotonic() < deadline:
        time.sleep(2)
        now = rss(pid)
    ram = guest_ram_rss(pid)
    print(f"QEMU RSS: idle {idle // MiB} MiB (guest RAM {idle_ram // MiB}), peak {peak.value // MiB} MiB, "
          f"then {now // MiB} MiB (guest RAM {ram // MiB})")
    assert peak.value > idle + 400 * MiB, "the burst never reached the VM's memory: the test would prove nothing"
    assert now < idle + 400 * MiB, (f"QEMU kept {(now - idle) // MiB} MiB of the burst after 90 s: guest RAM "
                                    f"{(ram - idle_ram) // MiB} MiB more, QEMU's own {(now - ram - idle + idle_ram) // MiB}")
    after = machine.docker("run", "--rm", IMAGE, "echo", "still here")
    assert after.returncode == 0 and after.stdout == "still here\n", after.stderr
    assert oom_kills(machine) == kills, "the guest's kernel killed a process for memory"
    dmesg = machine.cli("exec", "--", "dmesg")
    if dmesg.returncode == 0:
        assert "Out of memory" not in dmesg.stdout and "oom-kill" not in dmesg.stdout, dmesg.stdout[-2000:]


def test_the_page_cache_is_squeezed_back_when_quiet(machine: UpMachine) -> None:
    """Free page reporting never returns the page cache: the agent's balloon squeezes it out once the guest
    is quiet (host/balloon.py), and the guest keeps its whole size afterwards."""
    pid = qemu_pid(machine)
    before, before_ram = settled_rss(pid), guest_ram_rss(pid)
    read = machine.cli("exec", "--", "sh", "-c", "dd if=/dev/zero of=/var/lib/boxpark/cached bs=1M count=768 "
                       "&& sync && cat /var/lib/boxpark/cached > /dev/null", timeout=900)
    assert read.returncode == 0, read.stderr
    held = guest_ram_rss(pid)
    assert held > before_ram + 512 * MiB, "the file's pages never reached the VM's memory: nothing to give back"
    deadline = time.monotonic() + 180
    while guest_ram_rss(pid) >= before_ram + 256 * MiB and time.monotonic() < deadline:
        time.sleep(3)
    after = guest_ram_rss(pid)
    print(f"guest RAM: {before_ram // MiB} MiB, {held // MiB} MiB with 768 MiB cached, then {after // MiB} MiB; "
          f"QEMU RSS {before // MiB} -> {rss(pid) // MiB} MiB")
    assert after < before_ram + 256 * MiB, f"the guest still holds {(after - before_ram) // MiB} MiB of cache"
    log = (machine.dir / "agent.log").read_text()
    assert "squeezing the page cache" in log
    assert "over the Guest API" not in log, "the balloon asked the guest's init: QEMU's statistics were not read"
    memory = machine.cli("exec", "--", "cat", "/proc/meminfo")
    total_kib = int(memory.stdout.split()[1])
    deadline = time.monotonic() + 60  # the balloon empties once the guest got to its target
    while total_kib < 1800 * 1024 and time.monotonic() < deadline:
        time.sleep(3)
        total_kib = int(machine.cli("exec", "--", "cat", "/proc/meminfo").stdout.split()[1])
    assert total_kib >= 1800 * 1024, f"the guest was left with {total_kib // 1024} MiB after the squeeze"
    machine.cli("exec", "--", "rm", "-f", "/var/lib/boxpark/cached")
    after_docker = machine.docker("run", "--rm", IMAGE, "echo", "still here")
    assert after_docker.returncode == 0 and after_docker.stdout == "still here\n", after_docker.stderr
