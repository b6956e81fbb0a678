"""The data disk and swap through `boxpark up` on QEMU run the way VZ behaves: no disk grows under a
running guest (BOXPARK_QEMU_BLOCK_RESIZE=0), so a grown disk costs the agent a file growth and a guest reboot.

One machine for the module, brought down and up again by the tests in file order (a TCG boot costs
~10-25 s, dockerd more): first up (mounts, swap), a resize through a reboot, a resize whose agent is
killed between the reboot and the resize and finished by the next `up` with a smaller disk.size (never
shrunk). The disks are small (256-512 MiB): the sizes matter, not the space. The online path (QMP
block_resize) is tests/vm/test_up.py's killed-agent test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest

from tests import upchecks
from tests.bootchecks import boot_mounts
from tests.upmachine import UpMachine

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None,
                                 reason="needs root and qemu-system-x86")]

MiB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")  # the guest's page size too (x86_64)
REBOOTING = "rebooting the guest"  # the agent's progress line before it reboots the guest for a grown disk


def config(disk: int, swap: int) -> str:
    return f'memory = "1GiB"\n[disk]\nsize = "{disk >> 20}MiB"\n[swap]\nsize = "{swap >> 20}MiB"\n'


@pytest.fixture(scope="module")
def machine(request: pytest.FixtureRequest) -> Iterator[UpMachine]:
    before = os.environ.get("BOXPARK_QEMU_BLOCK_RESIZE")
    os.environ["BOXPARK_QEMU_BLOCK_RESIZE"] = "0"  # the agent `up` starts inherits it
    try:
        with UpMachine("qemu", config(256 * MiB, 32 * MiB)).running(request) as m:
            yield m
    finally:
        if before is None:
            os.environ.pop("BOXPARK_QEMU_BLOCK_RESIZE", None)
        else:
            os.environ["BOXPARK_QEMU_BLOCK_RESIZE"] = before


def guest(m: UpMachine, *argv: str) -> str:
    result = m.cli("exec", "--", *argv)
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout


def assert_swap(m: UpMachine, size: int) -> None:
    """The data disk's swap file is `size` bytes and in use as all the guest's swap, as /proc/swaps has it
    (the kernel leaves out the header page and may drop a few more where the file's extents end)."""
    lines = [line.split() for line in guest(m, "cat", "/proc/swaps").splitlines()[1:]]
    assert [fields[0] for fields in lines] == ["/var/lib/boxpark/swapfile"], lines
    assert size - MiB < int(lines[0][2]) * 1024 <= size - PAGE, lines
    assert int(guest(m, "stat", "-c", "%s", "/var/lib/boxpark/swapfile")) == size


def filesystem_bytes(m: UpMachine) -> int:
    return int(guest(m, "df", "-B1", "--output=size", "/var/lib/boxpark").split()[-1])


def up_with(m: UpMachine, disk: int, swap: int) -> subprocess.CompletedProcess[str]:
    assert m.down().returncode == 0
    m.config.write_text(f'backend = "qemu"\n{config(disk, swap)}')
    result = m.up()
    assert result.returncode == 0, result.stderr + m.logs()
    return result


def test_the_guest_boots_with_its_mounts_data_disk_and_swap(machine: UpMachine) -> None:
    # the VM's own devtmpfs: its disks are the VM's; the root disk (the overlay's lower) is the squashfs
    mounts = boot_mounts(guest(machine, "cat", "/proc/self/mountinfo"), dev="devtmpfs")
    assert guest(machine, "head", "-c", "4", "/dev/vda") == "hsqs"
    assert "root=/dev/vda" in guest(machine, "cat", "/proc/cmdline").split()
    assert mounts["/var/lib/boxpark"][0] == "ext4"
    assert_swap(machine, 32 * MiB)
    # QEMU's data disk discards, so swap was turned on with SWAP_FLAG_DISCARD: the kernel's "D" flag
    added = [line for line in guest(machine, "dmesg").splitlines() if "swap on /var/lib/boxpark/swapfile" in line]
    assert added and re.search(r"across:\d+k \S*D", added[-1]), added
    assert 200 * MiB < filesystem_bytes(machine) <= 256 * MiB
    guest(machine, "sh", "-c", "echo precious > /var/lib/boxpark/keep")


def test_a_grown_disk_reboots_the_guest_once_and_a_new_swap_size_applies(machine: UpMachine) -> None:
    first_boot = machine.status()["boot"]["boot_id"]
    result = up_with(machine, 384 * MiB, 48 * MiB)
    assert result.stderr.count(REBOOTING) == 1, result.stderr
    status = machine.status()
    # the guest came back with a new boot id, and the agent went on with the new boot
    assert status["boot"]["boot_id"] != first_boot
    assert guest(machine, "cat", "/proc/sys/kernel/random/boot_id").strip() == status["boot"]["boot_id"]
    assert f"after its reboot (boot {status['boot']['boot_id']})" in result.stderr, result.stderr
    assert (machine.dir / "data.img").stat().st_size == 384 * MiB
    assert 330 * MiB < filesystem_bytes(machine) <= 384 * MiB
    assert not (machine.dir / "pending-resize.json").exists()
    assert_swap(machine, 48 * MiB)
    assert guest(machine, "cat", "/var/lib/boxpark/keep") == "precious\n"


def test_an_agent_killed_between_the_reboot_and_the_resize(machine: UpMachine) -> None:
    """Killed as it reboots the guest for 512 MiB; the next `up`, with disk.size lowered to 256 MiB, finishes
    the 512 MiB resize (a disk never shrinks) and needs no reboot: the guest boots with the grown image."""
    assert machine.down().returncode == 0
    machine.config.write_text(f'backend = "qemu"\n{config(512 * MiB, 48 * MiB)}')
    env = {**os.environ, "BOXPARK_HOME": str(machine.home)}
    up = subprocess.Popen([sys.executable, "-m", "boxpark", "up", "--name", machine.name, "--config",
                           str(machine.config), "--no-context"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        assert up.stderr is not None
        for line in up.stderr:
            seen.append(line)
            if REBOOTING in line:
                pid = machine.agent_pid()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                break
        else:
            pytest.fail("the agent never rebooted the guest:\n" + "".join(seen) + machine.logs())
        up.wait(120)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    pending = json.loads((machine.dir / "pending-resize.json").read_text())
    assert pending["size"] == 512 * MiB  # the resize was not finished: the record says what is left to do
    assert (machine.dir / "data.img").stat().st_size == 512 * MiB  # grown before the reboot
    deadline = time.monotonic() + 60  # QEMU dies with its agent (PR_SET_PDEATHSIG)
    while any("qemu" in p for p in machine.leftovers()):
        assert time.monotonic() < deadline, machine.leftovers()
        time.sleep(0.5)

    machine.config.write_text(f'backend = "qemu"\n{config(256 * MiB, 48 * MiB)}')
    result = machine.up()
    assert result.returncode == 0, result.stderr + machine.logs()
    assert "the data disk stays at 512 MiB: disk.size is 256 MiB, and a disk is never shrunk" in result.stderr
    assert REBOOTING not in result.stderr, result.stderr
    assert not (machine.dir / "pending-resize.json").exists()
    assert 450 * MiB < filesystem_bytes(machine) <= 512 * MiB
    assert (machine.dir / "data.img").stat().st_size == 512 * MiB
    assert guest(machine, "cat", "/var/lib/boxpark/keep") == "precious\n"
    assert_swap(machine, 48 * MiB)


def test_down_leaves_nothing(machine: UpMachine) -> None:
    upchecks.down_leaves_nothing(machine)
