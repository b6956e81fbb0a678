"""Filesystems on the Guest API: the `Mount` and `Umount` calls, and which filesystem a device holds.

mount/umount go straight to mount(2)/umount2(2), with mount(8)-style options (`mountopts`) split into the
flags, the propagation change and the filesystem's data string; a two-call mount whose second call fails
takes its first one back. `probe` reads a device's superblock (what `mount` without a type and `ResizeDisk`
need to know). The calls are quick: the server runs them on the loop.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Callable

from .. import protocol
from ..protocol import ErrorCode
from . import libc
from .errors import GuestError, from_oserror
from .mountopts import PER_MOUNT, parse_options

SWAP_SIGNATURE = b"SWAPSPACE2"
"""At the end of a swap area's first page (mkswap writes it, swapon checks it)."""


def check_path(path: str, what: str) -> None:
    if not path or "\0" in path or not path.startswith("/"):
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"{what} {path!r} must be an absolute path")


def mount(message: protocol.Mount) -> protocol.Ok:
    """The `Mount` call: mount(2) with mount(8)-style options, like `mount -t fstype -o options src dst`."""
    check_path(message.target, "the mount target")
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
            if opts.bind and opts.flags & PER_MOUNT:
                _or_undo(target, lambda: libc.mount(None, target, None,
                                                    libc.MS_REMOUNT | libc.MS_BIND | (opts.flags & PER_MOUNT)))
        elif not propagation_only:
            if not fstype:
                fstype = probe(source) if source.startswith("/") else ""
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
    check_path(message.target, "the umount target")
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


def probe(device: str) -> str:
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


def unescape(text: str) -> str:
    """Undo the octal escapes /proc uses for spaces and tabs in paths (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
