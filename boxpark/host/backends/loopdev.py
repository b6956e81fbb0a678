"""Loop devices by ioctl (no losetup): the sandbox's root image attached read-only, detached on exit.

Attached with LOOP_CONFIGURE in one call (read-only, autoclear) and held open while attached, so the
device cannot be detached and handed to someone else under us.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
from typing import Iterator

from .base import BackendError

log = logging.getLogger("boxpark.host.sandbox")

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")  # struct loop_info64
_LOOP_CONFIG = struct.Struct(f"=II{_LOOP_INFO64.size}s64x")  # struct loop_config


@contextlib.contextmanager
def loop_device(path: str) -> Iterator[str]:
    """Attach `path` read-only to a free loop device; detach it on exit. Yields /dev/loopN.

    We keep the device open while it is attached, so it cannot be detached and handed to someone else
    under us; on exit we ask for the detach (the kernel defers it while a mount still holds the device —
    autoclear — and it happens when the sandbox's mount namespace goes), then wait for it, bounded.
    """
    backing = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        device, fd = _attach(backing, path)
    finally:
        os.close(backing)
    try:
        yield device
    finally:
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: already detached
                log.error("cannot detach %s: %s", device, exc.strerror)
        os.close(fd)
        number = device.removeprefix("/dev/loop")
        deadline = time.monotonic() + 5
        while _loop_backing(number) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        if _loop_backing(number) is not None:
            log.error("%s is still attached to %s after the sandbox ended", device, path)


def _attach(backing: int, path: str) -> tuple[str, int]:
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise BackendError(f"the sandbox needs loop devices: /dev/loop-control: {exc.strerror} "
                           f"(modprobe loop?)") from None
    try:
        for _ in range(16):  # another process may take the free device between our two calls
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            name = os.fsencode(path)[:63]
            info = _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR, name,
                                     b"", b"", 0, 0)
            try:
                fcntl.ioctl(fd, LOOP_CONFIGURE, _LOOP_CONFIG.pack(backing, 0, info))
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EBUSY:
                    continue
                raise BackendError(f"cannot attach {path} to {device}: {exc.strerror}") from None
            return device, fd
    finally:
        os.close(control)
    raise BackendError(f"cannot attach {path} to a loop device: every free one was taken first")


def _loop_backing(number: str) -> str | None:
    try:
        with open(f"/sys/block/loop{number}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None
