"""`boxpark up` end to end on QEMU (TCG): the real CLI, agent, VM, dockerd, docker CLI, Guest Proxy.

One machine for the module (booting under TCG takes ~10 s and dockerd ~15 s more); the tests run in file
order and the last ones take it down, grow its disk and bring it up again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests import upchecks
from tests.upmachine import UpMachine

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None
                                 or shutil.which("docker") is None,
                                 reason="needs root, qemu-system-x86 and the docker CLI")]

SHARE = Path("/tmp/boxpark-vm-share")


def config(disk: str) -> str:
    return f"""
memory = "1GiB"
[disk]
size = "{disk}"
[swap]
size = "64MiB"
[time]
push_interval = 5
[[mounts]]
source = "tmpfs"
target = "/srv/a/b/c"
type = "tmpfs"
[[mounts]]
source = "{SHARE}"
target = "/srv/share"
[[mounts]]
source = "tmpfs"
target = "/srv/a"
type = "tmpfs"
[[mounts]]
source = "tmpfs"
target = "/srv/a/b"
type = "tmpfs"
"""


@pytest.fixture(scope="module")
def machine(request):
    shutil.rmtree(SHARE, ignore_errors=True)
    SHARE.mkdir()
    with UpMachine("qemu", config("1GiB")).running(request) as m:
        yield m
    shutil.rmtree(SHARE, ignore_errors=True)


def test_docker_cli(machine, tmp_path) -> None:
    upchecks.docker_cli_everyday(machine, tmp_path)


def test_docker_python_package(machine) -> None:
    upchecks.docker_python_package(machine)


def test_exec_and_status(machine) -> None:
    upchecks.exec_and_status(machine)


def test_status_shows_what_the_machine_costs(machine) -> None:
    upchecks.status_shows_resources(machine, vm=True)


def test_mounts_parent_first(machine) -> None:
    upchecks.mounts_parent_first(machine)


def test_virtiofs_share_both_ways(machine) -> None:
    (SHARE / "from-host").write_text("written on the host\n")
    seen = machine.cli("exec", "--", "cat", "/srv/share/from-host")
    assert seen.stdout == "written on the host\n", seen.stderr
    wrote = machine.cli("exec", "--", "sh", "-c", "echo written in the guest > /srv/share/from-guest")
    assert wrote.returncode == 0, wrote.stderr
    assert (SHARE / "from-guest").read_text() == "written in the guest\n"


def _guest_offset_ms(m: UpMachine) -> float:
    """host − guest clock, measured by a SetTime whose threshold is too large to step (one round trip)."""
    from boxpark.host.client import GuestClient
    from boxpark.transport import read_secret

    async def measure() -> float:
        secret = read_secret(str(m.dir / "backend" / "secret"))
        async with await GuestClient.open(f"unix:{m.dir}/api.sock", secret=secret) as client:
            best = None
            for _ in range(5):  # the smallest round trip gives the truest reading
                start = time.monotonic_ns()
                result = await client.set_time(time.time_ns(), threshold_ns=10**18)
                rtt = time.monotonic_ns() - start
                assert not result.stepped
                if best is None or rtt < best[0]:
                    best = (rtt, result.offset_ns)
            return best[1] / 1e6

    return asyncio.run(measure())


def test_paused_vm_clock_is_brought_back(machine) -> None:
    """QMP stop for 60 s leaves the guest's clock a minute behind; the agent's push brings it back."""
    from boxpark.host.backends.qemu import Qmp

    async def pause(seconds: float) -> None:
        qmp = await Qmp.connect(str(machine.dir / "backend" / "qmp-user.sock"))
        try:
            await qmp.execute("stop")
            await asyncio.sleep(seconds)
            await qmp.execute("cont")
        finally:
            qmp.close()

    assert abs(_guest_offset_ms(machine)) < 50
    asyncio.run(pause(60))
    behind = _guest_offset_ms(machine)
    assert behind > 30_000, f"the pause did not leave the guest behind ({behind:.0f} ms)"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        offset = _guest_offset_ms(machine)
        if abs(offset) < 50:
            break
        time.sleep(1)
    assert abs(offset) < 50, f"guest clock still {offset:.1f} ms off after the pushes"
    print(f"after a 60 s pause the guest was {behind / 1000:.1f} s behind; brought back to {offset:+.2f} ms")


def test_dockerd_killed_and_restarted(machine) -> None:
    upchecks.dockerd_killed_and_restarted(machine)


def test_disk_resize_survives_a_killed_agent(machine) -> None:
    """1 GiB → 2 GiB in the config; the agent is killed once the resize is recorded (before boot); the next up
    grows the image under the running guest (QMP block_resize: no reboot) and its filesystem."""
    assert machine.cli("exec", "--", "sh", "-c", "echo precious > /var/lib/boxpark/keep").returncode == 0
    assert machine.down().returncode == 0
    machine.config.write_text(f'backend = "qemu"\n{config("2GiB")}')
    pending = machine.dir / "pending-resize.json"
    import subprocess
    import sys

    env = {**os.environ, "BOXPARK_HOME": str(machine.home)}
    up = subprocess.Popen([sys.executable, "-m", "boxpark", "up", "--name", machine.name, "--config",
                           str(machine.config), "--no-context"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not pending.exists():
        assert time.monotonic() < deadline and up.poll() is None, "no pending-resize record appeared"
        time.sleep(0.01)
    while machine.agent_pid() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(machine.agent_pid(), 9)  # mid-way: recorded, neither the image nor the filesystem grown
    up.wait(60)
    assert json.loads(pending.read_text())["size"] == 2 * 1024 ** 3
    again = machine.up()
    assert again.returncode == 0, again.stderr + machine.logs()
    assert "rebooting the guest" not in again.stderr and "growing the data disk to 2048 MiB" in again.stderr
    assert not pending.exists()
    df = machine.cli("exec", "--", "df", "-B1", "--output=size", "/var/lib/boxpark")
    size = int(df.stdout.split()[-1])
    assert 1.9 * 1024 ** 3 < size <= 2 * 1024 ** 3, df.stdout
    assert machine.cli("exec", "--", "cat", "/var/lib/boxpark/keep").stdout == "precious\n"
    assert machine.docker("version", "--format", "{{.Server.Version}}").returncode == 0


def test_down_leaves_nothing(machine) -> None:
    upchecks.down_leaves_nothing(machine)
