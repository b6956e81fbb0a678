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
size = "2GiB"
"""


@pytest.fixture(scope="module")
def machine(request: pytest.FixtureRequest):
    m = UpMachine("qemu", CONFIG)
    result = m.up()
    if result.returncode != 0:
        logs = m.logs()
        m.destroy()
        pytest.fail(f"boxpark up failed:\n{result.stderr}\n{logs}")
    yield m
    if request.session.testsfailed:
        print(m.logs())
    m.destroy()


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
    print(f"QEMU RSS: idle {idle // MiB} MiB, peak {peak.value // MiB} MiB, then {now // MiB} MiB")
    assert peak.value > idle + 400 * MiB, "the burst never reached the VM's memory: the test would prove nothing"
    assert now < idle + 400 * MiB, f"QEMU kept {(now - idle) // MiB} MiB of the burst after 90 s"
    after = machine.docker("run", "--rm", IMAGE, "echo", "still here")
    assert after.returncode == 0 and after.stdout == "still here\n", after.stderr
    assert oom_kills(machine) == kills, "the guest's kernel killed a process for memory"
    dmesg = machine.cli("exec", "--", "dmesg")
    if dmesg.returncode == 0:
        assert "Out of memory" not in dmesg.stdout and "oom-kill" not in dmesg.stdout, dmesg.stdout[-2000:]
