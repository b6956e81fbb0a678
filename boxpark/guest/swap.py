"""Swap on the Guest API: the `Swapon` and `Swapoff` calls.

Swap is global to the whole machine even inside namespaces, so swapon/swapoff check every argument (the
path, its kind, the swap signature, whether it is in use) before the one system call, and the server lets
them through only when it is the guest's init. Nothing here writes to the path: `mkswap` is the caller's.
"""

from __future__ import annotations

import os
import stat as stat_

from .. import protocol
from ..protocol import ErrorCode
from . import libc
from .errors import GuestError, from_oserror
from .filesystems import SWAP_SIGNATURE, check_path, unescape


def _active_swaps() -> set[str]:
    try:
        with open("/proc/swaps") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return set()
    return {unescape(line.split()[0]) for line in lines if line.split()}


def check_swap(path: str) -> str:
    """Check that `path` can be swapped on, without touching it: "block" or "file", else GuestError."""
    check_path(path, "the swap path")
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
    if message.discard:  # a device without discard ignores it
        flags |= libc.SWAP_FLAG_DISCARD
    try:
        libc.swapon(message.path, flags)
    except OSError as exc:
        raise from_oserror(exc, f"swapon {message.path}") from None
    return protocol.Ok()


def swapoff(message: protocol.Swapoff) -> protocol.Ok:
    """The `Swapoff` call (machine-wide, like `swapon`); the path must be in use as swap."""
    check_path(message.path, "the swap path")
    if not os.path.exists(message.path):
        raise GuestError(ErrorCode.NOT_FOUND, f"swapoff {message.path}: no such file or device")
    if os.path.realpath(message.path) not in _active_swaps():
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"swapoff {message.path}: not in use as swap")
    try:
        libc.swapoff(message.path)
    except OSError as exc:
        raise from_oserror(exc, f"swapoff {message.path}") from None
    return protocol.Ok()
