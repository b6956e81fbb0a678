"""The data disk gives space back to the host: what docker deletes in the guest leaves the image's allocated
blocks (QEMU passes the guest's discards down as holes; the guest mounts the disk with `discard`).

One machine for the module: the guest sees discard on its data disk, then a container writes 1 GiB there
and docker deletes it, and data.img's allocated blocks on the host come back within a generous deadline.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.upmachine import IMAGE, UpMachine, load_busybox

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None,
                                 reason="needs root and qemu-system-x86"),
              pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker CLI")]

MiB = 1024 * 1024
GiB = 1024 * MiB
SLACK = 128 * MiB  # what may stay allocated after the delete: metadata, the journal, logs
DEADLINE = 90.0  # ext4 trims at each journal commit (every 5 s): generous under TCG and a loaded host


@pytest.fixture(scope="module")
def machine(request: pytest.FixtureRequest) -> Iterator[UpMachine]:
    with UpMachine("qemu", 'memory = "1GiB"\n[disk]\nsize = "4GiB"\n[swap]\nsize = "0"\n').running(request) as m:
        yield m


def guest(m: UpMachine, *argv: str) -> str:
    result = m.cli("exec", "--", *argv)
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout


def allocated(m: UpMachine) -> int:
    """data.img's allocated bytes on the host, after the guest has written out what it holds."""
    guest(m, "sync")
    return os.stat(m.dir / "data.img").st_blocks * 512


def test_the_guest_sees_discard_on_its_data_disk_and_mounts_it_to_trim(machine: UpMachine) -> None:
    device = guest(machine, "findmnt", "-n", "-o", "SOURCE", "/var/lib/boxpark").strip()
    assert device.startswith("/dev/vd"), device
    name = Path(device).name
    assert int(guest(machine, "cat", f"/sys/block/{name}/queue/discard_max_bytes")) > 0
    assert "discard" in guest(machine, "findmnt", "-n", "-o", "OPTIONS", "/var/lib/boxpark").strip().split(",")
    assert machine.status()["disk_discard"] is True
    assert "cannot give space back" not in machine.cli("status").stdout


def test_a_deleted_gigabyte_is_given_back_to_the_host(machine: UpMachine, tmp_path: Path) -> None:
    load_busybox(machine, tmp_path)
    before = allocated(machine)
    # Not zeroes: QEMU would store those as holes (detect-zeroes=unmap) and the test could not fail.
    wrote = machine.docker("run", "--name", "big", IMAGE, "sh", "-c",
                           f"busybox yes boxpark | head -c {GiB} > /big && sync", timeout=900)
    assert wrote.returncode == 0, wrote.stderr
    full = allocated(machine)
    assert full >= before + GiB - SLACK, f"the write never reached data.img: {before >> 20} -> {full >> 20} MiB"
    removed = machine.docker("rm", "big")  # docker deletes the container's layer, the file with it
    assert removed.returncode == 0, removed.stderr
    deadline = time.monotonic() + DEADLINE
    while (now := allocated(machine)) >= before + SLACK and time.monotonic() < deadline:
        time.sleep(2)
    assert now < before + SLACK, (f"data.img still holds {now >> 20} MiB {DEADLINE:g} s after the delete "
                                  f"(before the write: {before >> 20} MiB, after it: {full >> 20} MiB)")
    assert machine.docker("run", "--rm", IMAGE, "echo", "ok").stdout.strip() == "ok"  # docker still works
