"""Storage calls of the Guest API: mount, umount, swapon/swapoff and resize_disk.

mount/umount go straight to mount(2)/umount2(2); `parse_options` turns mount(8)-style options into the
flags, the propagation change and the filesystem's data string, the way mount(8) splits them. Swap is
global to the whole machine even inside namespaces, so swapon/swapoff check every argument (the path,
its kind, the swap signature, whether it is in use) before the one system call, and the server lets them
through only when it is the guest's init. `resize_disk` grows a partition to fill its disk and then the
filesystem on it, with the real tools (sfdisk, resize2fs, xfs_growfs) through `subp` and the BLKPG ioctl;
it is idempotent, so a host that retries after a failure or a reboot finishes the job. Nothing here may block
the event loop for long except `resize_disk`, which the server runs in a thread.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat as stat_
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable

from .. import protocol
from ..protocol import ErrorCode
from . import libc, subp
from .errors import GuestError, from_oserror

log = logging.getLogger("boxpark.guest.storage")

# ----------------------------------------------------------------------------------- mount options

# option -> (flags it sets, flags it clears); "rw" clears what "ro" sets, and so on
_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (libc.MS_RDONLY, 0), "rw": (0, libc.MS_RDONLY),
    "nosuid": (libc.MS_NOSUID, 0), "suid": (0, libc.MS_NOSUID),
    "nodev": (libc.MS_NODEV, 0), "dev": (0, libc.MS_NODEV),
    "noexec": (libc.MS_NOEXEC, 0), "exec": (0, libc.MS_NOEXEC),
    "sync": (libc.MS_SYNCHRONOUS, 0), "async": (0, libc.MS_SYNCHRONOUS),
    "dirsync": (libc.MS_DIRSYNC, 0),
    "mand": (libc.MS_MANDLOCK, 0), "nomand": (0, libc.MS_MANDLOCK),
    "noatime": (libc.MS_NOATIME, 0), "atime": (0, libc.MS_NOATIME),
    "nodiratime": (libc.MS_NODIRATIME, 0), "diratime": (0, libc.MS_NODIRATIME),
    "relatime": (libc.MS_RELATIME, 0), "norelatime": (0, libc.MS_RELATIME),
    "strictatime": (libc.MS_STRICTATIME, 0), "nostrictatime": (0, libc.MS_STRICTATIME),
    "lazytime": (libc.MS_LAZYTIME, 0), "nolazytime": (0, libc.MS_LAZYTIME),
    "nosymfollow": (libc.MS_NOSYMFOLLOW, 0), "symfollow": (0, libc.MS_NOSYMFOLLOW),
    "silent": (libc.MS_SILENT, 0), "loud": (0, libc.MS_SILENT),
    "bind": (libc.MS_BIND, 0), "rbind": (libc.MS_BIND | libc.MS_REC, 0),
    "move": (libc.MS_MOVE, 0),
    "remount": (libc.MS_REMOUNT, 0),
}

_PROPAGATION = {
    "private": libc.MS_PRIVATE, "shared": libc.MS_SHARED, "slave": libc.MS_SLAVE,
    "unbindable": libc.MS_UNBINDABLE,
}

# options only mount(8) and fstab readers care about; the kernel would reject them in the data string
_USERSPACE_ONLY = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
                   "_netdev"}
_USERSPACE_PREFIXES = ("comment=", "x-", "X-")

# the flags a bind mount takes only through a second, remounting call
_PER_MOUNT = (libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC | libc.MS_NOATIME
              | libc.MS_NODIRATIME | libc.MS_RELATIME | libc.MS_STRICTATIME | libc.MS_NOSYMFOLLOW)


@dataclass(frozen=True)
class MountOptions:
    """mount(8)-style options split the way mount(2) wants them."""

    flags: int = 0  # MS_* for the mount, bind or remount call
    propagation: int = 0  # MS_SHARED/PRIVATE/SLAVE/UNBINDABLE (| MS_REC): applied by a second call
    data: str = ""  # everything else, for the filesystem (comma-joined, order kept)
    mkdir: int | None = None  # X-mount.mkdir[=mode]: create the target with this mode

    @property
    def bind(self) -> bool:
        return bool(self.flags & libc.MS_BIND) and not self.flags & libc.MS_REMOUNT

    @property
    def remount(self) -> bool:
        return bool(self.flags & libc.MS_REMOUNT)

    @property
    def move(self) -> bool:
        return bool(self.flags & libc.MS_MOVE)


def split_options(options: list[str] | tuple[str, ...]) -> list[str]:
    """Each item may itself be `a,b,c`; commas inside double quotes (SELinux contexts) do not split."""
    words: list[str] = []
    for item in options:
        for match in re.finditer(r'(?:[^,"]|"[^"]*")+', item):
            word = match.group(0).strip()
            if word:
                words.append(word)
        if item.count('"') % 2:
            raise ValueError(f"unbalanced quote in mount option {item!r}")
    return words


def parse_options(options: list[str] | tuple[str, ...]) -> MountOptions:
    """Parse mount(8)-style options; raise ValueError naming an option that cannot be used."""
    flags = 0
    propagation = 0
    data: list[str] = []
    mkdir: int | None = None
    for word in split_options(options):
        if word in _FLAGS:
            set_, clear = _FLAGS[word]
            flags = (flags | set_) & ~clear
        elif word in _PROPAGATION:
            propagation = _PROPAGATION[word]
        elif word.startswith("r") and word[1:] in _PROPAGATION:
            propagation = _PROPAGATION[word[1:]] | libc.MS_REC
        elif word == "X-mount.mkdir" or word.startswith("X-mount.mkdir="):
            _, _, mode = word.partition("=")
            try:
                mkdir = int(mode, 8) if mode else 0o755
            except ValueError:
                raise ValueError(f"bad mode in mount option {word!r} (octal, like 0755)") from None
        elif word in ("loop",) or word.startswith("loop="):
            raise ValueError(f"mount option {word!r} is not supported: attach a loop device first and mount it")
        elif word in _USERSPACE_ONLY or word.startswith(_USERSPACE_PREFIXES):
            continue
        else:
            data.append(word)
    return MountOptions(flags=flags, propagation=propagation, data=",".join(data), mkdir=mkdir)


# ------------------------------------------------------------------------------------------ mount


def _check_path(path: str, what: str) -> None:
    if not path or "\0" in path or not path.startswith("/"):
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"{what} {path!r} must be an absolute path")


def mount(message: protocol.Mount) -> protocol.Ok:
    """The `Mount` call: mount(2) with mount(8)-style options, like `mount -t fstype -o options src dst`."""
    _check_path(message.target, "the mount target")
    try:
        opts = parse_options(message.options)
    except ValueError as exc:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"mount on {message.target}: {exc}") from None
    source, target, fstype = message.source, message.target, message.fstype
    if "\0" in source or "\0" in fstype:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, "mount: NUL in the source or filesystem type")
    what = f"mount {source or fstype or '(propagation)'} on {target}"
    if message.mkdir or opts.mkdir is not None:
        try:
            os.makedirs(target, opts.mkdir if opts.mkdir is not None else 0o755, exist_ok=True)
        except OSError as exc:
            raise _mount_error(exc, f"{what}: creating the target", message) from None
    if not os.path.exists(target):
        raise GuestError(ErrorCode.NOT_FOUND, f"{what}: the target {target} does not exist (mkdir=True creates it)")
    if not os.path.isdir(target) and not (opts.bind or opts.move or opts.remount):
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"{what}: {target} is not a directory")
    propagation_only = bool(opts.propagation) and not (source or fstype) and not (
        opts.flags & (libc.MS_BIND | libc.MS_REMOUNT | libc.MS_MOVE))
    try:
        if opts.remount:
            libc.mount(source or None, target, fstype or None, opts.flags, opts.data or None)
        elif opts.bind or opts.move:
            if not source or not os.path.exists(source):
                raise GuestError(ErrorCode.NOT_FOUND, f"{what}: the source {source!r} does not exist")
            kind = libc.MS_MOVE if opts.move else libc.MS_BIND | (opts.flags & libc.MS_REC)
            libc.mount(source, target, None, kind, None)
            if opts.bind and opts.flags & _PER_MOUNT:
                _or_undo(target, lambda: libc.mount(None, target, None,
                                                    libc.MS_REMOUNT | libc.MS_BIND | (opts.flags & _PER_MOUNT)))
        elif not propagation_only:
            if not fstype:
                fstype = _probe(source) if source.startswith("/") else ""
                if not fstype:
                    raise GuestError(ErrorCode.INVALID_ARGUMENT,
                                     f"{what}: give fstype (no filesystem recognised on {source!r})")
            if source.startswith("/dev/") and not os.path.exists(source):
                raise GuestError(ErrorCode.NOT_FOUND, f"{what}: the device {source} does not exist")
            libc.mount(source or fstype, target, fstype, opts.flags, opts.data or None)
        if propagation_only:
            libc.mount(None, target, None, opts.propagation)
        elif opts.propagation:
            _or_undo(target, lambda: libc.mount(None, target, None, opts.propagation))
    except OSError as exc:
        raise _mount_error(exc, what, message) from None
    return protocol.Ok()


def _or_undo(target: str, step: Callable[[], None]) -> None:
    """Run the second step of a two-call mount; if it fails, take the first mount away again."""
    try:
        step()
    except OSError:
        try:
            libc.umount2(target, libc.MNT_DETACH)
        except OSError:
            pass
        raise


def _mount_error(exc: OSError, what: str, message: protocol.Mount) -> GuestError:
    options = ",".join(message.options)
    detail = f" (type {message.fstype or '?'}, options {options or 'none'})"
    reasons = {
        errno.ENODEV: (ErrorCode.INVALID_ARGUMENT, f"the kernel has no filesystem type {message.fstype!r}"),
        errno.ENOTBLK: (ErrorCode.INVALID_ARGUMENT, f"{message.source} is not a block device"),
        errno.EBUSY: (ErrorCode.UNAVAILABLE, "the source is already mounted or the target is busy"),
        errno.EINVAL: (ErrorCode.INVALID_ARGUMENT,
                       "invalid argument: a bad option, a bad superblock, or not a mount point to remount"),
        errno.ENOENT: (ErrorCode.NOT_FOUND, "no such file or directory"),
    }
    if exc.errno in reasons:
        code, reason = reasons[exc.errno]  # type: ignore[index]
        return GuestError(code, f"{what}: {reason}{detail}")
    mapped = from_oserror(exc, what)
    return GuestError(mapped.code, f"{mapped.message}{detail}")


def umount(message: protocol.Umount) -> protocol.Ok:
    """The `Umount` call: umount2(2); `lazy` detaches now and cleans up when it is no longer busy."""
    _check_path(message.target, "the umount target")
    flags = (libc.MNT_DETACH if message.lazy else 0) | (libc.MNT_FORCE if message.force else 0)
    try:
        libc.umount2(message.target, flags)
    except OSError as exc:
        what = f"umount {message.target}"
        if exc.errno == errno.EINVAL:
            raise GuestError(ErrorCode.INVALID_ARGUMENT, f"{what}: not a mount point") from None
        if exc.errno == errno.EBUSY:
            raise GuestError(ErrorCode.UNAVAILABLE,
                             f"{what}: target is busy (open files or mounts below it; lazy=True detaches "
                             f"it anyway)") from None
        raise from_oserror(exc, what) from None
    return protocol.Ok()


# ------------------------------------------------------------------------------------------- swap

SWAP_SIGNATURE = b"SWAPSPACE2"


def _active_swaps() -> set[str]:
    try:
        with open("/proc/swaps") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return set()
    return {_unescape(line.split()[0]) for line in lines if line.split()}


def _unescape(text: str) -> str:
    """Undo the octal escapes /proc uses for spaces and tabs in paths (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def check_swap(path: str) -> str:
    """Check that `path` can be swapped on, without touching it: "block" or "file", else GuestError."""
    _check_path(path, "the swap path")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise GuestError(ErrorCode.NOT_FOUND, f"swapon {path}: no such file or device") from None
    except OSError as exc:
        raise from_oserror(exc, f"swapon {path}") from None
    if stat_.S_ISBLK(info.st_mode):
        kind = "block"
    elif stat_.S_ISREG(info.st_mode):
        kind = "file"
        if info.st_blocks * 512 < info.st_size:
            raise GuestError(ErrorCode.INVALID_ARGUMENT,
                             f"swapon {path}: the file has holes (make it with dd or fallocate, not truncate)")
    else:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"swapon {path}: not a block device or a regular file")
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open(path, "rb") as f:
            f.seek(page - len(SWAP_SIGNATURE))
            signature = f.read(len(SWAP_SIGNATURE))
    except OSError as exc:
        raise from_oserror(exc, f"swapon {path}") from None
    if signature != SWAP_SIGNATURE:
        raise GuestError(ErrorCode.INVALID_ARGUMENT,
                         f"swapon {path}: no swap signature ({SWAP_SIGNATURE.decode()}) at byte {page - 10}; "
                         f"run mkswap on it first")
    if os.path.realpath(path) in _active_swaps():
        raise GuestError(ErrorCode.ALREADY_EXISTS, f"swapon {path}: already in use as swap")
    return kind


def swapon(message: protocol.Swapon) -> protocol.Ok:
    """The `Swapon` call (machine-wide: the server lets it through only on the guest's init)."""
    priority = message.priority
    if priority is not None and not -1 <= priority <= libc.SWAP_FLAG_PRIO_MASK:
        raise GuestError(ErrorCode.INVALID_ARGUMENT,
                         f"swapon {message.path}: priority {priority} is out of range (-1 to 32767)")
    check_swap(message.path)
    flags = libc.SWAP_FLAG_PREFER | priority if priority is not None and priority >= 0 else 0
    try:
        libc.swapon(message.path, flags)
    except OSError as exc:
        raise from_oserror(exc, f"swapon {message.path}") from None
    return protocol.Ok()


def swapoff(message: protocol.Swapoff) -> protocol.Ok:
    """The `Swapoff` call (machine-wide, like `swapon`); the path must be in use as swap."""
    _check_path(message.path, "the swap path")
    if not os.path.exists(message.path):
        raise GuestError(ErrorCode.NOT_FOUND, f"swapoff {message.path}: no such file or device")
    if os.path.realpath(message.path) not in _active_swaps():
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"swapoff {message.path}: not in use as swap")
    try:
        libc.swapoff(message.path)
    except OSError as exc:
        raise from_oserror(exc, f"swapoff {message.path}") from None
    return protocol.Ok()


# ------------------------------------------------------------------------------------ resize_disk

_RESIZE_LOCK = threading.Lock()  # one resize at a time: two would fight over the same table
_MIN_GROWTH = 1024 * 1024  # less free space than this after a partition is not worth a new table


def _probe(device: str) -> str:
    """The filesystem on a block device, from its superblock: ext2/ext3/ext4, xfs, swap, or ""."""
    try:
        with open(device, "rb") as f:
            head = f.read(65536)
    except OSError:
        return ""
    if head[:4] == b"XFSB":
        return "xfs"
    if len(head) >= 2048 and head[1080:1082] == b"\x53\xef":
        compat = int.from_bytes(head[1024 + 0x5C:1024 + 0x60], "little")
        incompat = int.from_bytes(head[1024 + 0x60:1024 + 0x64], "little")
        if incompat & (0x40 | 0x80 | 0x200):  # extents, 64bit, flex_bg
            return "ext4"
        return "ext3" if compat & 0x4 else "ext2"  # has_journal
    page = os.sysconf("SC_PAGE_SIZE")
    if head[page - 10:page] == SWAP_SIGNATURE:
        return "swap"
    return ""


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
            return _unescape(fields[4])
    return None


def _run(argv: list[str], what: str, ok_codes: tuple[int, ...] = (0,), input: bytes | None = None) -> str:
    try:
        result = subp.run(argv, timeout=600, check=False, input=input)
    except subp.CommandError as exc:
        raise GuestError(ErrorCode.FAILED, f"{what}: {exc}") from None
    if result.returncode not in ok_codes:
        error = subp.CommandError(list(argv), result.returncode, result.stdout, result.stderr)
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
    _check_path(device, "the disk")
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
    fstype = _probe(target)
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
