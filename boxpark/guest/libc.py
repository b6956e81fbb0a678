"""Thin ctypes wrappers over the system calls Python's `os` lacks: mount, umount2, swapon/swapoff,
sethostname, reboot, pivot_root, and the BLKPG ioctl that changes the kernel's view of one partition.

The boot path imports this module before anything else is up, so it imports `ctypes`, `os` and nothing
slow, and loads libc on first use. Every wrapper raises `OSError` with the errno and the path it was
given, so callers map failures the same way as any other OS error. No policy lives here: argument checks
and the machine-wide gate belong to the callers.
"""

from __future__ import annotations

import ctypes
import errno
import os

# mount(2) flags (linux/mount.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# umount2(2) flags
MNT_FORCE = 1
MNT_DETACH = 2

# swapon(2) flags
SWAP_FLAG_PREFER = 0x8000
SWAP_FLAG_PRIO_MASK = 0x7FFF
SWAP_FLAG_DISCARD = 0x10000  # discard the area at swapon and each cluster as it is freed

# reboot(2) commands
RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC

# BLKPG (linux/blkpg.h): resize one partition in the kernel's table, even while in use
BLKPG = 0x1269
BLKPG_RESIZE_PARTITION = 3

_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41, "i686": 217, "armv7l": 218}

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _path(value: str | bytes | None) -> bytes | None:
    if value is None:
        return None
    return os.fsencode(value)


def _check(result: int, what: str, path: str | bytes | None = None) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", os.fsdecode(path) if path is not None else None)


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    """mount(2). `source`, `fstype` and `data` may be None (e.g. for a remount or a propagation change)."""
    result = _lib().mount(_path(source), _path(target), _path(fstype), ctypes.c_ulong(flags), _path(data))
    _check(result, "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2): MNT_DETACH for a lazy unmount, MNT_FORCE to force one."""
    _check(_lib().umount2(_path(target), ctypes.c_int(flags)), "umount", target)


def swapon(path: str, flags: int = 0) -> None:
    """swapon(2): machine-wide even inside namespaces. `flags` may carry SWAP_FLAG_PREFER | priority and
    SWAP_FLAG_DISCARD."""
    _check(_lib().swapon(_path(path), ctypes.c_int(flags)), "swapon", path)


def swapoff(path: str) -> None:
    """swapoff(2): machine-wide even inside namespaces."""
    _check(_lib().swapoff(_path(path)), "swapoff", path)


def sethostname(name: str) -> None:
    """sethostname(2) for the caller's UTS namespace."""
    raw = name.encode()
    _check(_lib().sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def reboot(command: int) -> None:
    """reboot(2) with RB_POWER_OFF or RB_AUTOBOOT (sync first: it does not)."""
    _check(_lib().reboot(ctypes.c_int(command)), "reboot")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2) (glibc has no wrapper: called by its syscall number for this architecture)."""
    machine = os.uname().machine
    number = _PIVOT_ROOT.get(machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"pivot_root: no syscall number known for {machine}")
    result = _lib().syscall(ctypes.c_long(number), _path(new_root), _path(put_old))
    _check(result, "pivot_root", new_root)


class _BlkpgPartition(ctypes.Structure):
    _fields_ = [("start", ctypes.c_longlong), ("length", ctypes.c_longlong), ("pno", ctypes.c_int),
                ("devname", ctypes.c_char * 64), ("volname", ctypes.c_char * 64)]


class _BlkpgIoctlArg(ctypes.Structure):
    _fields_ = [("op", ctypes.c_int), ("flags", ctypes.c_int), ("datalen", ctypes.c_int),
                ("data", ctypes.c_void_p)]


def blkpg(disk: str, op: int, number: int, start: int, length: int) -> None:
    """The BLKPG ioctl on a whole disk: partition `number` at `start` for `length` (both in bytes).

    BLKPG_RESIZE_PARTITION keeps the start and works while the partition is mounted; the kernel refuses
    (EBUSY) a size that would overlap another partition it knows.
    """
    part = _BlkpgPartition(start=start, length=length, pno=number)
    arg = _BlkpgIoctlArg(op=op, flags=0, datalen=ctypes.sizeof(part),
                         data=ctypes.cast(ctypes.pointer(part), ctypes.c_void_p))
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_lib().ioctl(fd, ctypes.c_ulong(BLKPG), ctypes.byref(arg)), "BLKPG", disk)
    finally:
        os.close(fd)
