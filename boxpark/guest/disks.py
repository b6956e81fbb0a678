"""Disks on the Guest API: the `ResizeDisk` call grows a partition to fill its disk, then its filesystem.

With the real tools (sfdisk, resize2fs, xfs_growfs) through `subp`, and the BLKPG ioctl to tell the kernel
a new partition size while it is in use (a kernel that refuses means `reboot_required`). It is idempotent,
so a host that retries after a failure or a reboot finishes the job. It blocks for as long as the tools
take: the server runs it in a worker thread, never on the loop, and one resize runs at a time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat as stat_
import tempfile
import threading
from dataclasses import dataclass

from .. import protocol
from ..protocol import ErrorCode
from . import libc, subp
from .errors import GuestError, from_oserror
from .filesystems import check_path, probe, unescape

log = logging.getLogger("boxpark.guest.disks")

_RESIZE_LOCK = threading.Lock()  # one resize at a time: two would fight over the same table
_MIN_GROWTH = 1024 * 1024  # less free space than this after a partition is not worth a new table


def _size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _sysfs(device: str) -> str:
    """The sysfs directory of a block device (by its device number, so any name or symlink works)."""
    info = os.stat(device)
    if not stat_.S_ISBLK(info.st_mode):
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"resize_disk: {device} is not a block device")
    return os.path.realpath(f"/sys/dev/block/{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}")


def _partition_node(disk_sysfs: str, number: int) -> str | None:
    """The /dev node of partition `number` as the kernel knows it, or None if the kernel does not."""
    try:
        entries = os.listdir(disk_sysfs)
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(disk_sysfs, entry, "partition")) as f:
                if int(f.read()) != number:
                    continue
            with open(os.path.join(disk_sysfs, entry, "dev")) as f:
                major, minor = (int(x) for x in f.read().split(":"))
        except (OSError, ValueError):
            continue
        node = f"/dev/{entry}"
        if not os.path.exists(node):  # no devtmpfs node (unusual): make one beside it
            os.mknod(node, 0o600 | stat_.S_IFBLK, os.makedev(major, minor))
        return node
    return None


def _kernel_size(disk_sysfs: str, node: str) -> int | None:
    """The size the kernel gives a partition now, in bytes (None: it has no such partition any more)."""
    try:
        with open(os.path.join(disk_sysfs, os.path.basename(node), "size")) as f:
            return int(f.read()) * 512
    except (OSError, ValueError):
        return None


def find_mountpoint(device: str) -> str | None:
    """Where the filesystem on `device` is mounted in this mount namespace (by device number), or None."""
    rdev = os.stat(device).st_rdev
    wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[2] == wanted:
            return unescape(fields[4])
    return None


def _run(argv: list[str], what: str, ok_codes: tuple[int, ...] = (0,), input: bytes | None = None) -> str:
    try:
        result = subp.run(argv, timeout=600, check=False, input=input)
    except subp.HelperError as exc:
        raise GuestError(ErrorCode.FAILED, f"{what}: {exc}") from None
    if result.returncode not in ok_codes:
        error = subp.HelperError(list(argv), result.returncode, result.stdout, result.stderr)
        code = ErrorCode.PERMISSION_DENIED if "ermission denied" in str(error) else ErrorCode.FAILED
        raise GuestError(code, f"{what}: {error}")
    return result.stdout


@dataclass
class _Table:
    label: str
    sector: int
    starts: dict[int, int]  # partition number -> first sector
    sizes: dict[int, int]  # partition number -> sectors


def _read_table(device: str) -> _Table:
    out = _run(["sfdisk", "--json", device], f"resize_disk: reading the partition table of {device}")
    try:
        table = json.loads(out)["partitiontable"]
        label = table["label"]
        sector = int(table.get("sectorsize", 512))
        starts: dict[int, int] = {}
        sizes: dict[int, int] = {}
        for entry in table.get("partitions", []):
            number = int(re.search(r"(\d+)$", entry["node"]).group(1))  # type: ignore[union-attr]
            starts[number] = int(entry["start"])
            sizes[number] = int(entry["size"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GuestError(ErrorCode.FAILED, f"resize_disk: cannot read sfdisk's table of {device}: {exc}") from None
    return _Table(label, sector, starts, sizes)


def _room_after(table: _Table, number: int, disk_bytes: int) -> int:
    """Bytes the partition could grow by: up to the next partition, or the end of the usable disk."""
    start, size = table.starts[number], table.sizes[number]
    end = start + size  # first sector after it
    limit = disk_bytes // table.sector
    if table.label == "gpt":
        limit -= 1 + (16384 + table.sector - 1) // table.sector  # the backup header and its entries
    elif table.label == "dos":
        limit = min(limit, 2**32)
    following = [s for n, s in table.starts.items() if s >= end and n != number]
    if following:
        limit = min(limit, min(following))
    return max(0, limit - end) * table.sector


def _fs_bytes(device: str, fstype: str, mountpoint: str | None) -> int:
    """The filesystem's size now: from statvfs when mounted, else from its superblock."""
    if mountpoint is not None:
        st = os.statvfs(mountpoint)
        return st.f_blocks * st.f_frsize
    with open(device, "rb") as f:
        head = f.read(2048)
    if fstype.startswith("ext"):
        sb = head[1024:]
        blocks = int.from_bytes(sb[4:8], "little")
        incompat = int.from_bytes(sb[0x60:0x64], "little")
        if incompat & 0x80:  # 64bit
            blocks |= int.from_bytes(sb[0x150:0x154], "little") << 32
        return blocks * (1024 << int.from_bytes(sb[24:28], "little"))
    if fstype == "xfs":
        return int.from_bytes(head[4:8], "big") * int.from_bytes(head[8:16], "big")
    return 0


def resize_disk(message: protocol.ResizeDisk) -> protocol.ResizeResult:
    """The `ResizeDisk` call (runs in a worker thread): grow a partition, tell the kernel, grow its filesystem.

    Safe to repeat: a partition that already fills its room is left alone, a filesystem that already fills
    its device too. If the kernel cannot take the new size of a partition in use, the reply says
    `reboot_required` and the filesystem waits for the next call after the reboot.
    """
    device = os.path.realpath(message.device) if message.device else ""
    check_path(device, "the disk")
    if not os.path.exists(device):
        raise GuestError(ErrorCode.NOT_FOUND, f"resize_disk: no such device {message.device}")
    with _RESIZE_LOCK:
        return _resize(device, message.partition)


def _resize(device: str, partition: int | None) -> protocol.ResizeResult:
    disk_sysfs = _sysfs(device)
    target = device
    partition_grown = reboot_required = False
    if partition is not None:
        if partition < 1:
            raise GuestError(ErrorCode.INVALID_ARGUMENT, f"resize_disk: partition {partition} (numbers start at 1)")
        table = _read_table(device)
        if partition not in table.sizes:
            raise GuestError(ErrorCode.NOT_FOUND,
                             f"resize_disk: {device} has no partition {partition} "
                             f"(it has {sorted(table.sizes) or 'none'})")
        node = _partition_node(disk_sysfs, partition)
        if node is None:  # the kernel never read this table (e.g. no parser for the label): add it
            _run(["partx", "--add", "--nr", str(partition), device], f"resize_disk: adding partition {partition}")
            node = _partition_node(disk_sysfs, partition)
            if node is None:
                raise GuestError(ErrorCode.FAILED, f"resize_disk: the kernel shows no partition {partition} "
                                                   f"of {device}")
        target = node
    fstype = probe(target)
    if fstype not in ("ext2", "ext3", "ext4", "xfs"):
        raise GuestError(ErrorCode.INVALID_ARGUMENT,
                         f"resize_disk: {target} holds {fstype or 'no filesystem Boxpark recognises'}; "
                         f"only ext2/3/4 and xfs can be grown")
    old_size = _size(target)
    if partition is not None:
        if _room_after(table, partition, _size(device)) >= _MIN_GROWTH:
            # ", +": keep the start, take all the room; for gpt sfdisk also moves the backup header to the end
            _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-N", str(partition), device],
                 f"resize_disk: growing partition {partition} of {device}", input=b", +\n")
            before = table.sizes[partition]
            table = _read_table(device)
            partition_grown = table.sizes[partition] > before
        wanted = table.sizes[partition] * table.sector
        if _kernel_size(disk_sysfs, target) != wanted:
            _tell_kernel(device, partition, table.starts[partition] * table.sector, wanted)
            reboot_required = _kernel_size(disk_sysfs, target) != wanted
    new_size = _size(target)
    filesystem_grown = False
    if not reboot_required:
        filesystem_grown = _grow_filesystem(target, fstype)
    return protocol.ResizeResult(filesystem=fstype, old_size=old_size, new_size=new_size,
                                 partition_grown=partition_grown, filesystem_grown=filesystem_grown,
                                 reboot_required=reboot_required)


def _tell_kernel(device: str, partition: int, start: int, size: int) -> None:
    """Resize the kernel's view of one partition with BLKPG (works while it is mounted).

    Not `partx --update`: when a resize fails it may delete the partition and fail to add it back.
    A refusal is not an error here: the caller sees the sizes still differ (reboot_required).
    """
    try:
        libc.blkpg(device, libc.BLKPG_RESIZE_PARTITION, partition, start, size)
    except OSError as exc:
        log.warning("the kernel keeps the old size of partition %d of %s: %s", partition, device, exc.strerror)


def _grow_filesystem(device: str, fstype: str) -> bool:
    mountpoint = find_mountpoint(device)
    before = _fs_bytes(device, fstype, mountpoint)
    if fstype.startswith("ext"):
        if mountpoint is None:
            # resize2fs wants a freshly checked filesystem offline; -p fixes only what is safe (0 or 1: fine)
            _run(["e2fsck", "-f", "-p", device], f"resize_disk: checking {device} before growing it", (0, 1))
        _run(["resize2fs", device], f"resize_disk: growing the {fstype} filesystem on {device}")
        return _fs_bytes(device, fstype, mountpoint) > before
    if mountpoint is not None:
        _run(["xfs_growfs", mountpoint], f"resize_disk: growing the xfs filesystem on {device} ({mountpoint})")
        return _fs_bytes(device, fstype, mountpoint) > before
    # xfs grows only while mounted: mount it for the moment, out of everyone's way
    where = tempfile.mkdtemp(prefix="boxpark-grow-", dir="/run" if os.path.isdir("/run") else None)
    try:
        try:
            libc.mount(device, where, "xfs", 0, None)
        except OSError as exc:
            raise from_oserror(exc, f"resize_disk: mounting {device} to grow it") from None
        try:
            before = _fs_bytes(device, fstype, where)
            _run(["xfs_growfs", where], f"resize_disk: growing the xfs filesystem on {device}")
            return _fs_bytes(device, fstype, where) > before
        finally:
            libc.umount2(where, 0)
    finally:
        os.rmdir(where)
