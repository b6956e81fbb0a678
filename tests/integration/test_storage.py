"""mount/umount and resize_disk for real, in a private mount namespace; swap only up to its checks.

Every mount happens inside the namespace server's own mount namespace (it goes away with it), every disk
is a sparse image file on a loop device that is detached after the test whatever happens. Swap is global
to the machine even in a namespace, so swapon/swapoff are tested through their argument checks and the
server's machine-wide gate only; the real swapon runs in the VM tier.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any, Awaitable, Callable

import pytest

from boxpark import protocol
from boxpark.guest import filesystems, swap
from boxpark.guest.errors import GuestError
from boxpark.guest.server import GuestServer
from boxpark.host.client import GuestClient, RemoteError
from boxpark.protocol import ErrorCode
from tests.guestserver import refused, running_server
from tests.nsfixture import (MiB, Namespace, grow_image, loop_device, make_image, mkfs, python_argv, requires_root,
                             run_in_namespace, sh)

pytestmark = pytest.mark.integration


def call(ns: Namespace, body: Callable[[GuestClient], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with await GuestClient.open(ns.address) as client:
            return await body(client)

    return asyncio.run(run())


def mount_line(ns: Namespace, target: str) -> str:
    lines = [line for line in ns.mounts().splitlines() if line.split()[4] == target]
    return lines[-1] if lines else ""


def ext_size(device: str) -> int:
    out = sh(["dumpe2fs", "-h", device]).stdout
    count = int(re.search(r"^Block count:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    block = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    return count * block


def df_size(ns: Namespace, target: str) -> int:
    return int(ns.run(["df", "--output=size", "-B1", target]).stdout.split()[1])


def has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        effective = int(re.search(r"^CapEff:\s+([0-9a-f]+)", f.read(), re.M).group(1), 16)  # type: ignore[union-attr]
    return bool(effective & (1 << 24))


# ------------------------------------------------------------------------------------------ mount


@requires_root
def test_tmpfs_with_flags_and_data_stays_in_the_namespace(guest_ns: Namespace) -> None:
    target = f"{guest_ns.tmp}/m/t"

    async def body(client: GuestClient) -> None:
        await refused(client.mount("tmpfs", target, "tmpfs"), ErrorCode.NOT_FOUND, target, "mkdir")
        await client.mount("tmpfs", target, "tmpfs", ["nosuid,nodev", "noexec", "size=2m", "mode=0700"], mkdir=True)
        line = mount_line(guest_ns, target)
        assert re.search(r"\bnosuid\b", line) and re.search(r"\bnodev\b", line) and re.search(r"\bnoexec\b", line)
        assert "size=2048k" in line and "mode=700" in line
        await client.write_file(f"{target}/f", b"in tmpfs")
        await client.mount("", target, "", ["remount", "ro"])
        assert " ro," in mount_line(guest_ns, target)
        await refused(client.write_file(f"{target}/g", b"x"), ErrorCode.PERMISSION_DENIED, f"{target}/g")
        await client.umount(target, force=True)
        assert mount_line(guest_ns, target) == ""

    call(guest_ns, body)
    with open("/proc/self/mountinfo") as f:
        assert guest_ns.tmp not in f.read()  # never visible outside the namespace


@requires_root
def test_bind_readonly_recursive_and_propagation(guest_ns: Namespace) -> None:
    tmp = guest_ns.tmp
    os.makedirs(f"{tmp}/src/sub")
    with open(f"{tmp}/src/file", "w") as f:
        f.write("shared data")

    async def body(client: GuestClient) -> None:
        await client.mount("tmpfs", f"{tmp}/src/sub", "tmpfs", ["size=1m"])
        await client.mount(f"{tmp}/src", f"{tmp}/ro", options=["bind", "ro"], mkdir=True)
        assert " ro," in mount_line(guest_ns, f"{tmp}/ro")
        assert (await client.read_file(f"{tmp}/ro/file")).data == b"shared data"
        failed = guest_ns.run(["touch", f"{tmp}/ro/new"], check=False)
        assert failed.returncode != 0 and "Read-only" in failed.stderr
        assert mount_line(guest_ns, f"{tmp}/ro/sub") == ""  # plain bind: not the mounts below
        await client.mount(f"{tmp}/src", f"{tmp}/rb", options=["rbind"], mkdir=True)
        assert mount_line(guest_ns, f"{tmp}/rb/sub") != ""
        await client.mount("", f"{tmp}/src/sub", options=["shared"])
        assert re.search(r" shared:\d+ ", mount_line(guest_ns, f"{tmp}/src/sub"))
        await client.mount("", f"{tmp}/src/sub", options=["private"])
        assert not re.search(r" shared:\d+ ", mount_line(guest_ns, f"{tmp}/src/sub"))
        await refused(client.mount(f"{tmp}/nowhere", f"{tmp}/rb", options=["bind"]), ErrorCode.NOT_FOUND,
                      f"{tmp}/nowhere")
        for target in (f"{tmp}/rb/sub", f"{tmp}/rb", f"{tmp}/ro", f"{tmp}/src/sub"):
            await client.umount(target)

    call(guest_ns, body)


@requires_root
def test_mount_and_umount_errors(guest_ns: Namespace) -> None:
    tmp = guest_ns.tmp
    os.makedirs(f"{tmp}/t")

    async def body(client: GuestClient) -> None:
        await refused(client.mount("x", f"{tmp}/t", "nosuchfs"), ErrorCode.INVALID_ARGUMENT, "nosuchfs")
        await refused(client.mount("tmpfs", f"{tmp}/t", "tmpfs", ["size=lots"]), ErrorCode.INVALID_ARGUMENT,
                      "size=lots")
        await refused(client.mount("/dev/nosuchdisk", f"{tmp}/t", "ext4"), ErrorCode.NOT_FOUND, "/dev/nosuchdisk")
        await refused(client.mount("tmpfs", "relative", "tmpfs"), ErrorCode.INVALID_ARGUMENT, "absolute")
        await refused(client.mount("tmpfs", f"{tmp}/t", "tmpfs", ["loop"]), ErrorCode.INVALID_ARGUMENT, "loop")
        await refused(client.umount(f"{tmp}/t"), ErrorCode.INVALID_ARGUMENT, "not a mount point")
        await refused(client.umount(f"{tmp}/gone"), ErrorCode.NOT_FOUND, f"{tmp}/gone")
        await client.mount("tmpfs", f"{tmp}/t", "tmpfs")
        busy = guest_ns.spawn(["sh", "-c", f"cd {tmp}/t && exec sleep 60"])
        try:
            for _ in range(200):  # until the shell is in the directory
                if os.path.exists(f"/proc/{busy.pid}/cwd") and os.readlink(f"/proc/{busy.pid}/cwd") == f"{tmp}/t":
                    break
                await asyncio.sleep(0.01)
            await refused(client.umount(f"{tmp}/t"), ErrorCode.UNAVAILABLE, "busy", "lazy")
            await client.umount(f"{tmp}/t", lazy=True)
            assert mount_line(guest_ns, f"{tmp}/t") == ""
        finally:
            busy.kill()
            busy.wait()

    call(guest_ns, body)


@requires_root
def test_mount_a_block_device_recognising_its_filesystem(guest_ns: Namespace) -> None:
    image = make_image(f"{guest_ns.tmp}/fs.img", 64 * MiB)
    mkfs(image, "ext4")
    with loop_device(image) as loop:
        async def body(client: GuestClient) -> None:
            await client.mount(loop.path, f"{guest_ns.tmp}/disk", options=["noatime"], mkdir=True)
            line = mount_line(guest_ns, f"{guest_ns.tmp}/disk")
            assert " - ext4 " in line and "noatime" in line
            await client.write_file(f"{guest_ns.tmp}/disk/hello", b"on ext4")
            await client.umount(f"{guest_ns.tmp}/disk")

        call(guest_ns, body)
        assert "hello" in sh(["debugfs", "-R", "ls -l /", loop.path]).stdout


# ------------------------------------------------------------------------------------ resize_disk


@requires_root
def test_resize_ext4_partition_online_then_offline(guest_ns: Namespace) -> None:
    """gpt, partition 2 of 2, mounted: the table and the kernel grow live; ext4 grows online where this
    process may (CAP_SYS_RESOURCE, as the guest's init has), else the call says so and finishes offline."""
    tmp = guest_ns.tmp
    image = make_image(f"{tmp}/disk.img", 200 * MiB, partitions=[16 * MiB, None])
    with loop_device(image) as loop:
        part = loop.partition(2)
        mkfs(part, "ext4")
        before_fs = ext_size(part)
        files = {f"{tmp}/mnt/f{i}": os.urandom(100_000 + i) for i in range(5)}

        async def body(client: GuestClient) -> None:
            await client.mount(part, f"{tmp}/mnt", "ext4", mkdir=True)
            for path, data in files.items():
                await client.write_file(path, data)
            await client.sync()
            grow_image(image, 400 * MiB)
            loop.refresh()
            if has_cap_sys_resource():
                result = await client.resize_disk(loop.path, 2)
                assert result.filesystem_grown
            else:
                await refused(client.resize_disk(loop.path, 2), ErrorCode.PERMISSION_DENIED, "resize2fs", part)
                # the partition and the kernel's view of it grew even so; now grow the filesystem offline
                assert loop.size(part) > 350 * MiB
                await client.umount(f"{tmp}/mnt")
                result = await client.resize_disk(loop.path, 2)
                assert not result.partition_grown and result.filesystem_grown
                await client.mount(part, f"{tmp}/mnt", "ext4")
            assert result.filesystem == "ext4" and not result.reboot_required
            assert result.new_size == loop.size(part) > 350 * MiB
            for path, data in files.items():
                assert (await client.read_file(path)).data == data
            assert df_size(guest_ns, f"{tmp}/mnt") > 300 * MiB
            again = await client.resize_disk(loop.path, 2)  # nothing left to do, and it says so
            assert (again.partition_grown, again.filesystem_grown, again.old_size) == (False, False,
                                                                                     again.new_size)
            await client.umount(f"{tmp}/mnt")

        call(guest_ns, body)
        assert ext_size(part) > before_fs and ext_size(part) >= loop.size(part) - 8 * MiB
        table = sh(["sfdisk", "--dump", loop.path]).stdout
        assert "start=        2048, size=       32768" in table  # partition 1 untouched
        verify = sh(["sfdisk", "--verify", loop.path], check=False)  # the gpt backup header moved to the end
        assert verify.returncode == 0 and "backup" not in (verify.stdout + verify.stderr).lower(), verify


@requires_root
def test_resize_xfs_partition_online(guest_ns: Namespace) -> None:
    tmp = guest_ns.tmp
    image = make_image(f"{tmp}/xfs.img", 320 * MiB, partitions=[None], label="dos")
    with loop_device(image) as loop:
        part = loop.partition(1)
        mkfs(part, "xfs")

        async def body(client: GuestClient) -> protocol.ResizeResult:
            await client.mount(part, f"{tmp}/x", mkdir=True)
            await client.write_file(f"{tmp}/x/keep", b"x" * 4096)
            before = df_size(guest_ns, f"{tmp}/x")
            grow_image(image, 700 * MiB)
            loop.refresh()
            result = await client.resize_disk(loop.path, 1)
            assert df_size(guest_ns, f"{tmp}/x") > before + 300 * MiB
            assert "data" in guest_ns.run(["xfs_info", f"{tmp}/x"]).stdout
            assert (await client.read_file(f"{tmp}/x/keep")).data == b"x" * 4096
            await client.umount(f"{tmp}/x")
            return result

        result = call(guest_ns, body)
        assert result.filesystem == "xfs" and result.partition_grown and result.filesystem_grown
        assert result.old_size < 320 * MiB < 690 * MiB < result.new_size == loop.size(part)
        assert not result.reboot_required


@requires_root
@pytest.mark.parametrize("fstype, size, grown", [("ext4", 64 * MiB, 128 * MiB), ("xfs", 320 * MiB, 400 * MiB)])
def test_resize_whole_disk_filesystem_unmounted(guest_ns: Namespace, fstype: str, size: int, grown: int) -> None:
    """No partition table: the filesystem fills the device. Offline ext4 is checked first; an unmounted xfs
    is mounted for the moment (xfs grows only while mounted)."""
    image = make_image(f"{guest_ns.tmp}/whole.img", size)
    mkfs(image, fstype)
    with loop_device(image) as loop:
        grow_image(image, grown)
        loop.refresh()
        result = call(guest_ns, lambda client: client.resize_disk(loop.path))
        assert (result.filesystem, result.partition_grown, result.filesystem_grown) == (fstype, False, True)
        assert result.old_size == result.new_size == grown
        if fstype == "ext4":
            assert ext_size(loop.path) == grown
        else:
            info = sh(["xfs_db", "-r", "-c", "sb 0", "-c", "p dblocks blocksize", loop.path]).stdout
            values = dict(line.split(" = ") for line in info.splitlines())
            assert int(values["dblocks"]) * int(values["blocksize"]) == grown
        assert "boxpark-grow-" not in guest_ns.mounts()


@requires_root
def test_reboot_required_when_the_kernel_cannot_take_the_new_table(guest_ns: Namespace) -> None:
    """The kernel still knows a partition 2 that the disk's table no longer has: growing partition 1 over
    its place works on disk, but the kernel refuses the overlap; the filesystem waits for a reboot."""
    image = make_image(f"{guest_ns.tmp}/r.img", 64 * MiB, partitions=[16 * MiB, 16 * MiB])
    with loop_device(image) as loop:
        mkfs(loop.partition(1), "ext4")
        before = loop.size(loop.partition(1))
        sh(["sfdisk", "--no-reread", "--no-tell-kernel", "--delete", loop.path, "2"])
        assert os.path.exists(loop.partition(2))  # the kernel's view is stale now
        result = call(guest_ns, lambda client: client.resize_disk(loop.path, 1))
        assert result.partition_grown and result.reboot_required and not result.filesystem_grown
        assert result.old_size == result.new_size == before == loop.size(loop.partition(1))
        assert ext_size(loop.partition(1)) <= before
        table = sh(["sfdisk", "--json", loop.path]).stdout
        assert '"size": 32768' not in table  # on disk, partition 1 took the room


@requires_root
def test_resize_errors(guest_ns: Namespace) -> None:
    tmp = guest_ns.tmp
    image = make_image(f"{tmp}/e.img", 64 * MiB, partitions=[8 * MiB, None])
    with loop_device(image) as loop:
        mkfs(loop.partition(1), "ext4")

        async def body(client: GuestClient) -> None:
            await refused(client.resize_disk("/dev/nosuchdisk"), ErrorCode.NOT_FOUND, "/dev/nosuchdisk")
            await refused(client.resize_disk(image), ErrorCode.INVALID_ARGUMENT, "not a block device")
            await refused(client.resize_disk(loop.path, 7), ErrorCode.NOT_FOUND, "no partition 7")
            await refused(client.resize_disk(loop.path, 2), ErrorCode.INVALID_ARGUMENT, "no filesystem")
            await refused(client.resize_disk(loop.path, 0), ErrorCode.INVALID_ARGUMENT)
            # partition 1 is followed by partition 2: no room, nothing changes
            result = await client.resize_disk(loop.path, 1)
            assert not result.partition_grown and not result.filesystem_grown

        call(guest_ns, body)


# ------------------------------------------------------------------------------------------- swap


def swap_file(path: str, size: int = 4 * MiB) -> str:
    with open(path, "wb") as f:
        f.write(b"\0" * size)  # written, not sparse: the kernel refuses files with holes
    os.chmod(path, 0o600)
    sh(["mkswap", path])
    return path


def test_swap_checks_refuse_before_any_syscall(tmp_path) -> None:
    def reason(path: str) -> tuple[ErrorCode, str]:
        with pytest.raises(GuestError) as info:
            swap.check_swap(path)
        return info.value.code, info.value.message

    assert reason(f"{tmp_path}/missing")[0] == ErrorCode.NOT_FOUND
    assert reason(str(tmp_path))[0] == ErrorCode.INVALID_ARGUMENT
    assert reason("relative")[0] == ErrorCode.INVALID_ARGUMENT
    with open(f"{tmp_path}/plain", "wb") as f:
        f.write(b"\0" * 65536)
    code, message = reason(f"{tmp_path}/plain")
    assert code == ErrorCode.INVALID_ARGUMENT and "mkswap" in message
    with open(f"{tmp_path}/sparse", "wb") as f:
        f.truncate(4 * MiB)
    assert "holes" in reason(f"{tmp_path}/sparse")[1]
    assert reason("/dev/null")[0] == ErrorCode.INVALID_ARGUMENT
    assert swap.check_swap(swap_file(f"{tmp_path}/swap")) == "file"  # a good one passes the checks only
    with pytest.raises(GuestError, match="priority"):
        swap.swapon(protocol.Swapon(path=f"{tmp_path}/swap", priority=40000))
    with pytest.raises(GuestError, match="not in use as swap"):
        swap.swapoff(protocol.Swapoff(path=f"{tmp_path}/swap"))
    with pytest.raises(GuestError) as info:
        swap.swapoff(protocol.Swapoff(path=f"{tmp_path}/missing"))
    assert info.value.code == ErrorCode.NOT_FOUND


@pytest.mark.skipif(os.getpid() == 1, reason="off PID 1 only")
def test_the_server_refuses_swap_off_pid1_even_for_a_good_swap_file(tmp_path) -> None:
    assert GuestServer().machine_wide is False  # the default off PID 1
    path = swap_file(f"{tmp_path}/swap")
    with running_server(tmp_path) as srv:
        async def body() -> None:
            async with await GuestClient.open(srv.address) as client:
                for attempt in (client.swapon(path), client.swapon(path, priority=5), client.swapoff(path)):
                    with pytest.raises(RemoteError) as info:
                        await attempt
                    assert info.value.code == ErrorCode.PERMISSION_DENIED and "PID 1" in info.value.message

        asyncio.run(body())
    with open("/proc/swaps") as f:
        assert path not in f.read()


def test_probe_recognises_filesystems(tmp_path) -> None:
    for fstype in ("ext2", "ext3", "ext4", "xfs"):
        image = make_image(f"{tmp_path}/{fstype}.img", 320 * MiB if fstype == "xfs" else 8 * MiB)
        mkfs(image, fstype)
        assert filesystems.probe(image) == fstype
        os.unlink(image)
    assert filesystems.probe(swap_file(f"{tmp_path}/swap")) == "swap"
    assert filesystems.probe(make_image(f"{tmp_path}/blank", MiB)) == ""


@requires_root
def test_pivot_root_and_detach_the_old_root_in_a_private_namespace(short_tmp: str) -> None:
    """libc.pivot_root as the boot path uses it, for real but only inside a throwaway mount namespace."""
    code = """
import os
from boxpark.guest import libc
new = sys.argv[1]
libc.mount("tmpfs", new, "tmpfs", libc.MS_NOSUID, "size=1m")
os.mkdir(new + "/old")
with open(new + "/marker", "w") as f:
    f.write("the new root")
libc.pivot_root(new, new + "/old")
os.chdir("/")
libc.umount2("/old", libc.MNT_DETACH)
print(open("/marker").read(), sorted(os.listdir("/")))
try:
    libc.pivot_root("/nonexistent", "/nonexistent")
except OSError as exc:
    print(exc.errno, exc.filename)
"""
    os.mkdir(f"{short_tmp}/root")
    out = run_in_namespace(python_argv(code, f"{short_tmp}/root"))
    assert out.stdout.splitlines() == ["the new root ['marker', 'old']", "2 /nonexistent"]
    assert os.listdir(f"{short_tmp}/root") == []  # the host never saw the tmpfs
