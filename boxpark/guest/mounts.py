"""The API filesystems every Linux userland expects, and the init's own cgroup.

The boot path: plain mount(2) calls, nothing slow. A filesystem already mounted (the sandbox hands over its
own /dev and /run) is left as it is; the devtmpfs is mounted only when /dev is not a mount yet.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

from . import libc
from .rootfs import mountinfo

log = logging.getLogger("boxpark.init")

NOSUID, NODEV, NOEXEC = libc.MS_NOSUID, libc.MS_NODEV, libc.MS_NOEXEC

# (target, fstype, source, flags, data), parents first
TABLE = [
    ("/proc", "proc", "proc", NOSUID | NODEV | NOEXEC, ""),
    ("/sys", "sysfs", "sysfs", NOSUID | NODEV | NOEXEC, ""),
    ("/dev", "devtmpfs", "devtmpfs", NOSUID, "mode=0755"),
    ("/dev/pts", "devpts", "devpts", NOSUID | NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"),
    ("/dev/shm", "tmpfs", "shm", NOSUID | NODEV, "mode=1777"),
    ("/sys/fs/cgroup", "cgroup2", "cgroup2", NOSUID | NODEV | NOEXEC, "nsdelegate"),
    ("/run", "tmpfs", "tmpfs", NOSUID | NODEV, "mode=0755"),
    ("/tmp", "tmpfs", "tmpfs", NOSUID | NODEV, "mode=1777"),
]


def mount_all() -> list[str]:
    """Mount what is missing of TABLE; return the mount points it mounted."""
    present = {point for _, _, point, _, _ in mountinfo()} if os.path.exists("/proc/self/mountinfo") else set()
    mounted = []
    for target, fstype, source, flags, data in TABLE:
        if target in present:
            continue
        os.makedirs(target, exist_ok=True)
        try:
            libc.mount(source, target, fstype, flags, data or None)
        except OSError as exc:
            if target == "/sys/fs/cgroup" and data:
                libc.mount(source, target, fstype, flags, None)  # an older kernel without nsdelegate
            else:
                raise OSError(exc.errno, f"mount {fstype} on {target}: {os.strerror(exc.errno or 0)}") from None
        mounted.append(target)
        if target == "/proc":
            present = {point for _, _, point, _, _ in mountinfo()}
    _links()
    return mounted


def _links() -> None:
    """The /dev symlinks udev or systemd would make."""
    for link, target in (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
                         ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2"),
                         ("/dev/ptmx", "pts/ptmx")):
        if not os.path.lexists(link):
            try:
                os.symlink(target, link)
            except OSError:
                pass


def init_cgroup(root: str = "/sys/fs/cgroup") -> list[str]:
    """Move PID 1 into the leaf cgroup `init` and enable every available controller below the root.

    A cgroup with controllers enabled for its children may not hold processes itself, so the init moves
    out of the root first; dockerd then creates its own cgroups beside it with limits that work.
    """
    enter_init_cgroup(root)()
    return enable_controllers(root)


def enter_init_cgroup(root: str = "/sys/fs/cgroup") -> Callable[[], None]:
    """Start moving PID 1 into the leaf cgroup `init`; return the call that waits for the move to end
    (and raises its error). Start no process until then: it would stay in the root.

    The move waits out an RCU grace period in the kernel (10–15 ms measured here), asleep and without the
    GIL: on a thread of its own that time passes beside the boot's next steps and imports. The thread does
    nothing but the write(2), so it needs the GIL only to start and to end.
    """
    os.makedirs(f"{root}/init", exist_ok=True)
    fd = os.open(f"{root}/init/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    pid = str(os.getpid()).encode()
    errors: list[OSError] = []

    def move() -> None:
        try:
            os.write(fd, pid)
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=move, name="init-cgroup", daemon=True)
    try:
        thread.start()
    except BaseException:
        os.close(fd)
        raise

    def wait() -> None:
        thread.join()
        os.close(fd)
        if errors:
            raise OSError(errors[0].errno, f"cannot move the init into {root}/init: {errors[0].strerror}")

    return wait


def enable_controllers(root: str = "/sys/fs/cgroup") -> list[str]:
    """Enable every available controller below the root (PID 1 has left it: `enter_init_cgroup`)."""
    try:
        with open(f"{root}/cgroup.controllers") as f:
            controllers = f.read().split()
    except OSError:
        return []
    enabled = []
    for name in controllers:
        try:
            with open(f"{root}/cgroup.subtree_control", "w") as f:
                f.write(f"+{name}")
            enabled.append(name)
        except OSError as exc:
            log.warning("cgroup controller %s not enabled: %s", name, exc.strerror)
    return enabled
