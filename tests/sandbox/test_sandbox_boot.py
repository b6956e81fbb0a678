"""The sandbox backend for real: the image's init as PID 1 in namespaces over the image's squashfs.

Needs root and the built image (`boxpark image build`; the fixture builds it, instantly when cached).
Every test checks what it can from both sides: the guest over its API, the host through /proc, /sys, the
cgroup and the loop device. Nothing here may touch what is global to the host (clock, swap, power).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from boxpark import protocol
from boxpark.host.backends import BackendError, get_backend
from boxpark.host.backends.sandbox import cgroup2_mount
from boxpark.host.eventstream import EventStreamError
from boxpark.host.spec import Disk, MachineSpec, SpecError
from tests.bootchecks import boot_mounts
from tests.machines import (Machine, Machines, _machine_reporter, image_dir, machines,  # noqa: F401
                            module_machines)

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")]



@pytest.fixture(scope="module")
def guest(module_machines: Machines) -> Machine:  # noqa: F811
    return module_machines.boot("sandbox", settings={"log": "debug"})


# --------------------------------------------------------------------------------- one shared guest


def test_ready_arrives_with_the_timeline(guest: Machine) -> None:
    assert guest.ready is not None
    steps = [step.name for step in guest.ready.timeline]
    assert steps[:2] == ["rootfs", "mounts"] and "api" in steps
    assert all(step.error is None for step in guest.ready.timeline), guest.ready.timeline
    assert guest.ready.api == "unix:/run/boxpark/host/api.sock"
    print(f"sandbox spawn -> Ready: {guest.boot_seconds * 1000:.0f} ms")  # type: ignore[operator]


def test_the_init_is_pid_1(guest: Machine) -> None:
    info = guest.api(lambda c: c.info())
    assert info.pid == 1 and info.pid1
    assert guest.sh("tr '\\0' ' ' </proc/1/cmdline").split()[-1] == "/sbin/init"
    # and on the host, that PID 1 is the child of the pre-init, inside the sandbox's cgroup
    backend = guest.backend
    init = backend.init_pid()  # type: ignore[attr-defined]
    assert init is not None and init in backend.cgroup.pids()  # type: ignore[attr-defined]


def test_root_is_a_tmpfs_overlay_on_the_squashfs(guest: Machine) -> None:
    boot_mounts(guest.sh("cat /proc/self/mountinfo"), dev="tmpfs")
    init_log = Path(guest.spec.init_log).read_text()
    assert re.search(r"root: tmpfs overlay over squashfs", init_log), init_log
    # the lower layer is the image: a file read in the guest is the squashfs's file
    ours = subprocess.run(["unsquashfs", "-cat", guest.spec.root, "etc/debian_version"], capture_output=True,
                          check=True).stdout
    assert guest.sh("cat /etc/debian_version").encode() == ours
    # and the host attached the image read-only to the loop device the sandbox mounted
    number = guest.backend.loop_device.removeprefix("/dev/loop")  # type: ignore[attr-defined]
    assert Path(f"/sys/block/loop{number}/loop/backing_file").read_text().strip() == guest.spec.root
    assert Path(f"/sys/block/loop{number}/ro").read_text().strip() == "1"


def test_a_file_written_under_root_lands_in_the_tmpfs(guest: Machine) -> None:
    # / and /tmp are both default-sized tmpfs instances (the init's): same total; writing 8 MiB under /
    # takes 8 MiB from /'s upper layer and nothing from /tmp.
    def usage() -> tuple[int, int, int, int]:
        out = guest.sh("stat -f -c '%b %f %S' / /tmp").split()
        root_total, root_free, size, tmp_total, tmp_free, _ = map(int, out)
        return root_total * size, root_free * size, tmp_total * size, tmp_free * size

    root_total, root_free, tmp_total, tmp_free = usage()
    assert root_total == tmp_total
    guest.api(lambda c: c.write_file("/boxpark-written", b"x" * (8 << 20)))
    after = usage()
    assert root_free - after[1] >= 8 << 20 and abs(tmp_free - after[3]) < 1 << 20
    assert not subprocess.run(["unsquashfs", "-l", guest.spec.root, "boxpark-written"], capture_output=True,
                              text=True).stdout.count("boxpark-written")
    guest.api(lambda c: c.exec(["rm", "/boxpark-written"]))


def test_api_filesystems_are_mounted(guest: Machine) -> None:
    # /dev is ours (a tmpfs), never the host's devtmpfs
    mounts = boot_mounts(guest.sh("cat /proc/self/mountinfo"), dev="tmpfs")
    assert mounts["/run/boxpark/host"][0] != "devtmpfs"
    assert "devtmpfs" not in {fstype for fstype, _ in mounts.values()}


def test_dev_holds_no_host_disk(guest: Machine) -> None:
    listing = guest.sh("find /dev -xdev \\( -type b -o -type c \\) -printf '%y %p\\n'")
    nodes = sorted(line.split()[1] for line in listing.splitlines())
    assert not [line for line in listing.splitlines() if line.startswith("b ")], listing
    assert [n for n in nodes if not n.startswith("/dev/pts/")] == [
        "/dev/full", "/dev/null", "/dev/ptmx", "/dev/random", "/dev/tty", "/dev/urandom", "/dev/zero"]


def test_no_clock_or_power_capability(guest: Machine) -> None:
    for pid in ("1", "self"):
        bounding = int(re.search(r"CapBnd:\s*([0-9a-f]+)", guest.sh(f"cat /proc/{pid}/status"))[1], 16)
        assert not bounding & (1 << 25), "CAP_SYS_TIME"
        assert not bounding & (1 << 22), "CAP_SYS_BOOT"



def test_services_inherit_every_open_file_the_host_allows(guest: Machine) -> None:
    """The sandbox cannot pass the host's hard limit (no CAP_SYS_RESOURCE outside its user namespace):
    the init takes all of it for the services it starts, and says so instead of warning."""
    import resource

    soft, hard = (int(n) for n in re.search(r"Max open files\s+(\d+)\s+(\d+)", guest.sh("cat /proc/self/limits")).groups())
    assert soft == hard >= min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)
    init_log = Path(guest.spec.init_log).read_text()
    assert "RLIMIT_NOFILE not raised" not in init_log, init_log


def test_the_sandbox_has_no_rtc_and_its_init_says_so(guest: Machine) -> None:
    """The sandbox's own /dev has no RTC (the host's is global: never given), and its init records that it
    has none instead of reading or refining one. A real RTC is the vm tier's (test_qemu_boot)."""
    assert not [n for n in guest.sh("ls /dev").split() if n.startswith("rtc")]
    init_log = Path(guest.spec.init_log).read_text()
    assert "clock: no RTC in the sandbox" in init_log, init_log
    assert "clock refine" not in init_log


def test_the_sandbox_has_its_own_namespaces_and_cgroup(guest: Machine) -> None:
    init = guest.backend.init_pid()  # type: ignore[attr-defined]
    for ns in ("pid", "mnt", "net", "uts", "ipc", "cgroup"):
        assert os.readlink(f"/proc/{init}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    (unified,) = [line for line in guest.sh("cat /proc/self/cgroup").splitlines() if line.startswith("0::")]
    assert unified.startswith("0::/") and "boxpark" not in unified and ".." not in unified  # rooted at its own
    assert guest.backend.cgroup.path.startswith(cgroup2_mount())  # type: ignore[attr-defined]
    assert guest.sh("hostname").strip() == guest.spec.name


def test_the_event_stream_resumes_after_the_host_drops_it(guest: Machine) -> None:
    events = guest.backend.events
    assert events is not None
    before = events.last_seq
    guest.run(events.close())
    guest.api(lambda c: c.exec(["true"]))
    guest.api(lambda c: c.launch("short", ["true"], replace=True))
    time.sleep(0.2)  # the guest has events to send and nobody to take them
    guest.run(events.start())
    exited = guest.run(events.wait_for(protocol.ProcessExited, 60, after=before, where=lambda e: e.name == "short"))
    assert exited.code == 0
    seqs = [frame.seq for frame in events.frames]
    assert seqs == sorted(set(seqs)) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no repeat
    assert events.connections >= 2


# --------------------------------------------------------------------------------- one guest each


def host_leftovers(machine: Machine, loop: str, cgroup: str) -> list[str]:
    """What a stopped sandbox must not leave on the host."""
    left = []
    number = loop.removeprefix("/dev/loop")
    try:
        backing = Path(f"/sys/block/loop{number}/loop/backing_file").read_text().strip()
    except OSError:
        backing = ""
    if backing == machine.spec.root:
        left.append(f"{loop} is still attached to {backing}")
    if os.path.exists(cgroup):
        left.append(f"the cgroup {cgroup} is still there")
    mounts = Path("/proc/self/mountinfo").read_text()
    if machine.spec.state_dir in mounts:
        left.append("a mount under the state directory")
    return left


@pytest.mark.parametrize("how", ["sigterm", "poweroff"])
def test_a_clean_stop_ends_services_and_leaves_nothing(machines: Machines, how: str) -> None:  # noqa: F811
    guest = machines.boot("sandbox")
    backend = guest.backend
    guest.api(lambda c: c.launch("sleeper", ["sleep", "1000"]))
    processes = guest.api(lambda c: c.list_processes())
    assert [p.name for p in processes if p.running] == ["sleeper"]
    host_pids = backend.pids()
    assert len(host_pids) >= 3  # the pre-init, the init, the sleeper
    loop, cgroup = backend.loop_device, backend.cgroup.path  # type: ignore[attr-defined]
    if how == "sigterm":
        os.kill(backend.init_pid(), signal.SIGTERM)  # type: ignore[attr-defined,arg-type]
    else:
        try:
            guest.api(lambda c: c.poweroff())
        except (ConnectionError, OSError):
            pass  # the init may be gone before its reply is read
    code = guest.run(backend.wait(), 30)
    assert code == 0
    log = Path(guest.spec.init_log).read_text()
    assert "shutting down" in log and "powering off" in log
    guest.stop()
    for pid in host_pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie_or_other(pid), f"pid {pid} survived"
    assert host_leftovers(guest, loop, cgroup) == []  # type: ignore[arg-type]


def _zombie_or_other(pid: int) -> bool:
    """A pid that exists again after being killed is someone else's (reuse) — or our zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_a_killed_sandbox_leaves_nothing(machines: Machines) -> None:  # noqa: F811
    guest = machines.boot("sandbox")
    backend = guest.backend
    loop, cgroup = backend.loop_device, backend.cgroup.path  # type: ignore[attr-defined]
    os.kill(backend.init_pid(), signal.SIGKILL)  # type: ignore[attr-defined,arg-type]
    guest.run(backend.wait(), 30)  # the pre-init ends with its child
    guest.stop()
    assert host_leftovers(guest, loop, cgroup) == []  # type: ignore[arg-type]


def test_a_host_that_never_answers_times_out_clearly_and_the_guest_keeps_trying(machines: Machines) -> None:  # noqa: F811
    guest = machines.create("sandbox")
    guest.start()
    events = guest.backend.events
    assert events is not None
    guest.run(events.close())  # nobody answers the guest's dial from now on
    with pytest.raises(EventStreamError) as info:
        guest.run(guest.backend.wait_ready(2.0))
    message = str(info.value)
    assert "did not report Ready within 2 s" in message and "never connected" in message
    assert guest.spec.init_log in message and guest.spec.console_log in message
    deadline = time.monotonic() + 30  # on a busy host the guest may take longer than 2 s to get there
    while "not answering yet" not in Path(guest.spec.init_log).read_text():
        assert time.monotonic() < deadline, "the guest never tried the event stream"
        time.sleep(0.05)
    guest.run(events.start())  # back: the guest's next retry gets through, Ready comes
    assert guest.wait_ready(10).api


# --------------------------------------------------------------------------------- bad input


def test_the_sandbox_refuses_what_it_cannot_do(machines: Machines, tmp_path: Path) -> None:  # noqa: F811
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    backend = get_backend("sandbox")
    for fields, key in (({"disks": (Disk(str(disk)),)}, "disks"),
                        ({"arch": "arm64" if os.uname().machine == "x86_64" else "amd64"}, "arch"),
                        ({"api": "tcp:127.0.0.1:1"}, "api")):
        spec = machines.spec("sandbox", image=image_dir(), **fields)
        with pytest.raises(SpecError) as info:
            backend.check(spec)
        assert info.value.field == key, info.value
    # memory and cpus always have a value: a host that cannot limit them runs the sandbox and says so
    # (tests/sandbox/test_up.py checks the cgroup's limits or the warning), it does not refuse
    backend.check(machines.spec("sandbox", memory=512, cpus=1))


def _squashfs(tmp_path: Path, init: bytes | None) -> str:
    tree = tmp_path / "tree"
    for d in ("dev", "run", "proc", "sys", "sbin", "mnt", "tmp"):
        (tree / d).mkdir(parents=True)
    if init is not None:
        (tree / "sbin" / "init").write_bytes(init)
        (tree / "sbin" / "init").chmod(0o755)
    image = tmp_path / "root.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(image), "-noappend", "-quiet", "-all-root"], check=True,
                   capture_output=True)
    return str(image)


def _elf_for(machine: int) -> bytes:
    """A 64-bit little-endian ELF header for `machine` (183: aarch64, 62: x86-64); enough for execve to judge."""
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    header[16:18] = (2).to_bytes(2, "little")  # ET_EXEC
    header[18:20] = machine.to_bytes(2, "little")
    header[20:24] = (1).to_bytes(4, "little")
    header[52:54] = (64).to_bytes(2, "little")
    return bytes(header)


@pytest.mark.parametrize("init, says", [
    (None, "the image has no /sbin/init"),
    # the kernel refuses it, or a qemu-user binfmt_misc handler (if this host registered one) does
    (_elf_for(183 if os.uname().machine == "x86_64" else 62), "Exec format error|Invalid ELF image"),
], ids=["no-init", "init-for-another-arch"])
def test_a_broken_image_fails_fast_with_the_reason(machines: Machines, tmp_path: Path, init: bytes | None,  # noqa: F811
                                                   says: str) -> None:
    spec = MachineSpec(root=_squashfs(tmp_path, init), state_dir=machines.state_dir(), name="broken")
    guest = machines.create("sandbox", spec, expect_errors=True)
    guest.start()
    with pytest.raises(BackendError) as info:
        guest.run(guest.backend.wait_ready(120))
    # fast means: the end of the machine's process was noticed, not the deadline run out
    assert "before the guest was ready" in str(info.value) and re.search(says, str(info.value)), info.value
    if init is None:
        assert "boxpark-preinit: FATAL: " in Path(spec.console_log).read_text()
    loop, cgroup = guest.backend.loop_device, guest.backend.cgroup.path  # type: ignore[attr-defined]
    guest.stop()
    assert host_leftovers(guest, loop, cgroup) == []  # type: ignore[arg-type]


def test_cgroups_left_by_a_killed_host_process_are_swept(machines: Machines) -> None:  # noqa: F811
    dead = subprocess.Popen(["true"])
    dead.wait()
    parent = Path(cgroup2_mount(), "boxpark")
    parent.mkdir(exist_ok=True)
    leftover = parent / f"gone-{dead.pid}-00000000"
    (leftover / "init").mkdir(parents=True)  # the guest's own cgroups come along
    (leftover / "docker").mkdir()
    try:
        guest = machines.boot("sandbox")
        assert not leftover.exists()
        assert Path(guest.backend.cgroup.path).name.split("-")[1] == str(os.getpid())  # type: ignore[attr-defined]
    finally:
        for directory in (leftover / "init", leftover / "docker", leftover):
            if directory.exists():
                directory.rmdir()


def test_start_twice_is_refused(machines: Machines) -> None:  # noqa: F811
    guest = machines.boot("sandbox")
    with pytest.raises(BackendError, match="started a machine already"):
        guest.run(guest.backend.start(guest.spec))


def test_concurrent_sandboxes_do_not_share_anything(machines: Machines) -> None:  # noqa: F811
    a = machines.create("sandbox")
    b = machines.create("sandbox")
    a.start()
    b.start()
    a.wait_ready()
    b.wait_ready()
    assert a.backend.loop_device != b.backend.loop_device  # type: ignore[attr-defined]
    assert a.backend.cgroup.path != b.backend.cgroup.path  # type: ignore[attr-defined]
    assert a.api(lambda c: c.info()).pid == b.api(lambda c: c.info()).pid == 1
    a.api(lambda c: c.write_file("/only-in-a", b"a"))
    assert b.api(lambda c: c.exec(["test", "-e", "/only-in-a"])).code == 1
    assert a.stop() == 0
    assert b.api(lambda c: c.info()).pid == 1  # stopping one leaves the other alone


# --------------------------------------------------------------------------------- the command


def test_boxpark_boot_serves_until_sigterm_then_leaves_nothing(tmp_path: Path) -> None:
    root = str(image_dir() / "root.squashfs")  # built first: the command would only say "run: boxpark image build"
    state = tempfile.mkdtemp(prefix="bp-", dir="/tmp")
    repo = Path(__file__).resolve().parents[2]
    command = subprocess.Popen([sys.executable, "-m", "boxpark", "boot", "--backend", "sandbox", "--state", state],
                               cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        assert command.stdout is not None
        while not lines or not lines[-1].startswith("try: "):
            assert time.monotonic() < deadline and command.poll() is None, (lines, command.stderr.read())  # type: ignore[union-attr]
            lines.append(command.stdout.readline().rstrip("\n"))
        text = "\n".join(lines)
        assert re.search(r"^the guest is ready: \d+ ms from start \(sandbox\)", text, re.MULTILINE), text
        assert re.search(r"^    step mounts +[\d.]+ ms", text, re.MULTILINE), text
        address = re.search(r"^API: (unix:\S+)", text, re.MULTILINE)[1]  # type: ignore[index]
        assert address == f"unix:{state}/api.sock"
        record = json.loads(Path(state, "machine.json").read_text())
        call = subprocess.run([sys.executable, "-m", "boxpark", "guest", "call", address, "info"], cwd=repo,
                              capture_output=True, text=True, timeout=30)
        assert json.loads(call.stdout)["pid"] == 1, call.stderr
        command.send_signal(signal.SIGTERM)
        assert command.wait(30) == 0
        assert "stopped (status 0)" in command.stderr.read()  # type: ignore[union-attr]
        loop, cgroup = record["loop_device"], record["cgroup"]
        number = loop.removeprefix("/dev/loop")
        backing = Path(f"/sys/block/loop{number}/loop/backing_file")
        assert not backing.exists() or backing.read_text().strip() != root
        assert not os.path.exists(cgroup)
        for pid in record["pids"]:
            assert not os.path.exists(f"/proc/{pid}") or _zombie_or_other(pid)
        assert not Path(state, "machine.json").exists()
        assert state not in Path("/proc/self/mountinfo").read_text()
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
        shutil.rmtree(state, ignore_errors=True)
