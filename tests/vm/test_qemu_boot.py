"""The qemu backend for real: the image boots under TCG (this host's /dev/kvm is PVM-only) and is driven.

One machine is shared by most tests (a TCG boot costs ~10 s): it boots with a known RTC base counted in
VM time, a mkswap'd swap disk and an ext4 data disk, and its event listener closed at first (a host that
does not answer). The bad-input cases boot their own short-lived machines. Every machine's logs are
checked for tracebacks by the factory (tests/machines.py).
"""

from __future__ import annotations

import asyncio
import calendar
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from boxpark import protocol
from boxpark.host.backends import API_PORT, BackendError
from boxpark.host.backends.qemu import QemuBackend
from boxpark.host.client import GuestClient
from boxpark.host.guestlink import guest_client
from boxpark.host.eventstream import EventStreamError
from boxpark.host.spec import Disk, SpecError
from boxpark.transport import TransportError
from tests.machines import Machine, Machines, image_dir

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed"),
              pytest.mark.skipif(os.geteuid() != 0, reason="the image and its tools need root")]

RTC_BASE = "2031-05-17T12:00:00"
RTC_BASE_NS = calendar.timegm((2031, 5, 17, 12, 0, 0)) * 1_000_000_000
CLOCK_TOLERANCE_NS = 50_000_000



def device_with_serial(machine: Machine, serial: str) -> str:
    out = machine.sh("for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/serial 2>/dev/null); done")
    for line in out.splitlines():
        name, _, value = line.partition(" ")
        if value.strip() == serial:
            return f"/dev/{name}"
    raise AssertionError(f"no disk with serial {serial}: {out}")


@pytest.fixture(scope="module")
def vm(module_machines: Machines, tmp_path_factory: pytest.TempPathFactory) -> Machine:
    disks = tmp_path_factory.mktemp("disks")
    swap, data = disks / "swap.img", disks / "data.img"
    for path in (swap, data):
        with open(path, "wb") as f:
            f.truncate(64 << 20)
    subprocess.run(["mkswap", str(swap)], check=True, capture_output=True)  # formats a file; no swapon here
    subprocess.run(["mkfs.ext4", "-q", "-F", str(data)], check=True, capture_output=True)
    shared = tmp_path_factory.mktemp("shared")
    (shared / "from-host.txt").write_text("written on the host\n")
    machine = module_machines.create("qemu", memory=1536, console=True, rtc_base=RTC_BASE, rtc_clock="vm",
                                     disks=(Disk(str(swap), name="swap"), Disk(str(data), name="data")),
                                     shares={"hostdir": str(shared)})
    machine.shared = shared  # type: ignore[attr-defined]
    machine.start()
    # A host that does not answer: the guest must keep retrying, the host time out with a clear message.
    events = machine.backend.events
    assert events is not None
    machine.run(events.close())
    notes: dict[str, Any] = {}
    try:
        machine.run(machine.backend.wait_ready(3.0))
    except EventStreamError as exc:
        notes["timeout"] = str(exc)
    deadline = time.monotonic() + 120
    while "not answering yet" not in Path(machine.spec.init_log).read_text(errors="replace"):
        assert time.monotonic() < deadline, "the guest never tried the event stream"
        assert machine.backend.child is not None and machine.backend.child.returncode is None, machine.log_tails()
        time.sleep(0.1)
    notes["refused_at"] = time.monotonic()
    machine.run(events.start())
    machine.wait_ready()
    notes["ready_after_reopen"] = time.monotonic() - notes["refused_at"]
    machine.notes = notes  # type: ignore[attr-defined]
    return machine


def test_boots_to_ready(vm: Machine) -> None:
    assert vm.ready is not None and vm.ready.arch == "x86_64"
    assert [s.name for s in vm.ready.timeline if s.error] == [], vm.ready.timeline
    backend = vm.backend
    assert isinstance(backend, QemuBackend) and backend.plan is not None and backend.plan.accel == "tcg"
    from boxpark.host.boot import format_timeline

    print(format_timeline(backend, vm.ready))  # the metric, A/B-compared in bench/boot.py, not asserted


def test_a_host_that_never_answers_times_out_and_the_guest_retries(vm: Machine) -> None:
    notes = vm.notes  # type: ignore[attr-defined]
    assert "did not report Ready within 3 s" in notes["timeout"] and "never connected" in notes["timeout"]
    assert vm.spec.init_log in notes["timeout"]
    assert notes["ready_after_reopen"] < 5  # the guest's retry backoff is at most ~1 s


def test_exec_works(vm: Machine) -> None:
    result = vm.api(lambda c: c.exec(["uname", "-m"]))
    assert (result.code, result.stdout) == (0, b"x86_64\n")
    assert vm.api(lambda c: c.exec(["sh", "-c", "echo oops >&2; exit 3"])).code == 3


def test_the_secret_stays_off_every_command_line(vm: Machine) -> None:
    secret = vm.backend.secret
    assert secret and vm.backend.secret_file
    assert os.stat(vm.backend.secret_file).st_mode & 0o077 == 0
    assert secret not in Path(f"/proc/{vm.backend.child.pid}/cmdline").read_bytes()  # type: ignore[union-attr]
    assert secret.decode() not in vm.sh("cat /proc/cmdline")
    with pytest.raises(TransportError):  # and tcp without it is refused
        vm.run(GuestClient.open(vm.backend.address(API_PORT), secret=b"0" * 64))


def guest_clock_error_ns(vm: Machine, expected_at: Any) -> int:
    """How far the guest's CLOCK_REALTIME is from `expected_at(host time.time_ns())`, probed by a file's mtime.

    A write is a unary call the init answers itself (no process started), so the bracket is a few ms; the
    mtime is the guest's coarse clock (a jiffy behind at most).
    """
    best: int | None = None
    for _ in range(3):
        before = time.time_ns()
        vm.api(lambda c: c.write_file("/run/clock-probe", b"x"))
        after = time.time_ns()
        mtime = vm.api(lambda c: c.stat("/run/clock-probe")).mtime_ns
        low, high = expected_at(before), expected_at(after)
        error = 0 if low - 10_000_000 <= mtime <= high else min(abs(mtime - low), abs(mtime - high))
        best = error if best is None else min(best, error)
    assert best is not None
    return best


def test_the_rtc_sets_the_clock_and_the_refine_makes_it_exact(vm: Machine) -> None:
    events = vm.backend.events
    assert events is not None
    stepped = vm.run(events.wait_for(protocol.ClockStepped, 30, where=lambda e: e.source == "rtc-refine"))
    assert abs(stepped.offset_ns) < 1_000_000_000  # the boot's coarse setting was within the RTC's second
    running = vm.backend.running_at_wall  # type: ignore[attr-defined]
    # the RTC started at RTC_BASE when the guest started running (clock=vm), and counts with the VM
    error = guest_clock_error_ns(vm, lambda host_ns: RTC_BASE_NS + host_ns - int(running * 1e9))
    print(f"after the refine the guest's clock is within {error / 1e6:.1f} ms of the RTC")
    assert error <= CLOCK_TOLERANCE_NS, f"the guest's clock is {error / 1e6:.1f} ms off the RTC"


def test_a_time_pushed_by_the_host_wins(vm: Machine) -> None:
    reply = vm.api(lambda c: c.set_time(time.time_ns()))
    assert reply.stepped and abs(reply.offset_ns) > 3_600 * 10**9  # from 2031 back to now
    error = guest_clock_error_ns(vm, lambda host_ns: host_ns)
    assert error <= CLOCK_TOLERANCE_NS, f"the guest's clock is {error / 1e6:.1f} ms off the host's"
    events = vm.backend.events
    assert events is not None
    vm.run(events.wait_for(protocol.ClockStepped, 60, where=lambda e: e.source == "host"))


# adjtime(NULL, &left): the part of the current slew not yet done, in µs (a query: no change)
PENDING_SLEW = ("import ctypes; t = (ctypes.c_long * 2)(); ctypes.CDLL(None).adjtime(None, t); "
                "print(t[0] * 1000000 + t[1])")


def test_a_later_push_a_little_off_is_slewed_not_stepped(vm: Machine) -> None:
    """Past the host's first push, one a little off (here 60 ms ahead, less the push's latency) is slewed by
    adjtime(3), not stepped: the guest's kernel holds the correction as a slew still to do."""
    vm.api(lambda c: c.set_time(time.time_ns(), threshold_ns=10**18))  # the host has spoken (a no-op push)
    reply = vm.api(lambda c: c.set_time(time.time_ns() + 60_000_000, threshold_ns=5_000_000))
    assert not reply.stepped and 5_000_000 < reply.offset_ns <= 128_000_000, reply
    pending_us = int(vm.sh(f"python3 -c '{PENDING_SLEW}'").strip())
    assert 0 < pending_us * 1000 <= reply.offset_ns, (pending_us, reply)  # forward, some of it done already
    # a push far off steps, and cancels what is left of the slew (it would move the stepped clock on)
    assert vm.api(lambda c: c.set_time(time.time_ns() + 1_000_000_000, threshold_ns=5_000_000)).stepped
    assert int(vm.sh(f"python3 -c '{PENDING_SLEW}'").strip()) == 0
    assert vm.api(lambda c: c.set_time(time.time_ns(), threshold_ns=5_000_000)).stepped  # and back


def test_swap_on_a_swap_disk(vm: Machine) -> None:
    device = device_with_serial(vm, "swap")
    vm.api(lambda c: c.swapon(device))
    swaps = vm.sh("cat /proc/swaps")
    assert device in swaps, swaps
    vm.api(lambda c: c.swapoff(device))
    assert device not in vm.sh("cat /proc/swaps")


def test_a_grown_data_disk_is_resized(vm: Machine) -> None:
    device = device_with_serial(vm, "data")
    vm.api(lambda c: c.mount(device, "/mnt/data", "ext4", mkdir=True))
    before = int(vm.sh("stat -f -c '%b %S' /mnt/data").split()[0])
    backend = vm.backend
    assert isinstance(backend, QemuBackend)
    vm.run(backend.resize_disk("data", 128 << 20))
    name = device.removeprefix("/dev/")
    deadline = time.monotonic() + 20
    while int(vm.sh(f"cat /sys/block/{name}/size")) * 512 != 128 << 20:
        assert time.monotonic() < deadline, "the guest never saw the new size"
        time.sleep(0.2)
    result = vm.api(lambda c: c.resize_disk(device))
    assert result.filesystem == "ext4" and result.filesystem_grown and result.new_size == 128 << 20
    total, size = map(int, vm.sh("stat -f -c '%b %S' /mnt/data").split())
    assert total * size > 100 << 20 and total > before
    vm.api(lambda c: c.umount("/mnt/data"))


def test_a_directory_share_mounts_with_virtiofs(vm: Machine) -> None:
    shared: Path = vm.shared  # type: ignore[attr-defined]
    vm.api(lambda c: c.mount("hostdir", "/mnt/hostdir", "virtiofs", mkdir=True))
    try:
        assert vm.sh("cat /mnt/hostdir/from-host.txt") == "written on the host\n"
        vm.api(lambda c: c.write_file("/mnt/hostdir/from-guest.txt", b"written in the guest\n"))
        assert (shared / "from-guest.txt").read_text() == "written in the guest\n"
    finally:
        vm.api(lambda c: c.umount("/mnt/hostdir"))


# --------------------------------------------------------------------------------------- docker


async def _forward(vm: Machine, host_path: str, guest_path: str) -> asyncio.AbstractServer:
    """A host unix socket whose every connection is a `connect` to `guest_path` in the guest."""
    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = await guest_client(vm.backend)
        try:
            sock = await client.connect(path=guest_path)
        finally:
            await client.close()
        guest_reader, guest_writer = await asyncio.open_connection(sock=sock)
        await asyncio.gather(pump(reader, guest_writer), pump(guest_reader, writer), return_exceptions=True)
        writer.close()
        guest_writer.close()

    return await asyncio.start_unix_server(handle, host_path)


def _busybox_tar(path: Path) -> None:
    busybox = shutil.which("busybox") or "/bin/busybox"
    assert "statically linked" in subprocess.run(["file", "-L", busybox], capture_output=True, text=True).stdout
    with tarfile.open(path, "w") as tar:
        tar.add(busybox, arcname="bin/busybox")


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI on the host")
def test_docker_runs_a_container_through_connect(vm: Machine, tmp_path: Path) -> None:
    ready = vm.start_dockerd()
    assert ready.fields.get("READY") == "1"

    sock = str(tmp_path / "docker.sock")
    server = vm.run(_forward(vm, sock, "/run/docker.sock"))
    try:
        env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER_CONFIG": str(tmp_path / "config")}
        tar = tmp_path / "busybox.tar"
        _busybox_tar(tar)
        subprocess.run(["docker", "import", str(tar), "boxpark-test/busybox:1"], env=env, check=True,
                       capture_output=True, timeout=120)
        run = subprocess.run(["docker", "run", "--rm", "--network", "none", "boxpark-test/busybox:1",
                              "/bin/busybox", "echo", "hello from the guest"], env=env, capture_output=True,
                             text=True, timeout=180)
        assert run.returncode == 0, run.stderr
        assert run.stdout == "hello from the guest\n"
    finally:
        server.close()
        vm.stop_dockerd()


# --------------------------------------------------------------------------------------- bad input


def test_an_early_qemu_exit_says_why(machines: Machines) -> None:
    backend = QemuBackend(extra_args=["-device", "no-such-device-model"])
    machine = machines.create("qemu", backend_object=backend, expect_errors=True)
    with pytest.raises(BackendError) as info:
        machine.start()
    assert "no-such-device-model" in str(info.value) and "QEMU's stderr" in str(info.value)
    assert backend.child is not None and backend.child.returncode is not None


def test_a_kernel_of_another_arch_is_refused_before_starting(machines: Machines) -> None:
    spec = machines.spec("qemu", image=image_dir(), arch="arm64")  # the amd64 image's kernel, said to be arm64
    machine = machines.create("qemu", spec)
    with pytest.raises(SpecError, match="kernel: .* is built for amd64, but the machine is arm64"):
        machine.start()
    assert machine.backend.child is None and not os.path.exists(f"{spec.state_dir}/qemu.pid")


def test_a_missing_root_device_fails_with_the_reason(machines: Machines) -> None:
    machine = machines.create("qemu", console=True, memory=512, expect_errors=True,
                              command_line="root=/dev/vdz rootfstype=squashfs console=hvc0 panic=-1 "
                                           "boxpark.rootwait=2")
    machine.start()
    with pytest.raises(BackendError) as info:
        machine.run(machine.backend.wait_ready(120), 130)
    message = str(info.value)
    assert "before the guest was ready" in message and "no root device /dev/vdz" in message, message


def test_a_root_for_another_arch_fails_with_the_reason(machines: Machines, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in ("dev", "proc", "sys", "sbin", "run", "tmp", "mnt"):
        (tree / d).mkdir(parents=True)
    header = bytearray(64)  # an aarch64 ELF header: the kernel refuses to exec it here
    header[:7], header[16:18], header[18:20] = b"\x7fELF\x02\x01\x01", b"\x02\x00", (183).to_bytes(2, "little")
    (tree / "sbin" / "init").write_bytes(bytes(header))
    (tree / "sbin" / "init").chmod(0o755)
    root = tmp_path / "arm64-root.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(root), "-noappend", "-quiet", "-all-root"], check=True)
    machine = machines.create("qemu", root=str(root), console=True, memory=512, expect_errors=True)
    machine.start()
    with pytest.raises(BackendError) as info:
        machine.run(machine.backend.wait_ready(120), 130)
    message = str(info.value)
    assert "before the guest was ready" in message, message
    assert re.search(r"Exec format error|Kernel panic", message), message
