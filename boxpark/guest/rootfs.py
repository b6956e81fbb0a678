"""The root filesystem: a tmpfs overlaid on the read-only squashfs root, then pivoted into.

The boot path: nothing slow here. Whatever is mounted below the old root when the init starts (the
initramfs's /dev, the sandbox's /dev, /run and host directory) is moved into the new root first, so it
survives the pivot, the way switch_root does it.
"""

from __future__ import annotations

import os

from . import libc

WORK = "/mnt"  # an empty directory every Debian root has: the tmpfs for the overlay's upper layer goes here


def mountinfo() -> list[tuple[int, int, str, str, str]]:
    """(mount id, parent id, mount point, fstype, source) for each mount, in the kernel's order."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, source = right.split()[:2]
            point = fields[4].replace("\\040", " ")
            result.append((int(fields[0]), int(fields[1]), point, fstype, source))
    return result


def ensure_proc() -> None:
    if not os.path.exists("/proc/self/mountinfo"):
        libc.mount("proc", "/proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)


def overlay_root(size: str = "") -> str:
    """Overlay a tmpfs on /, move the existing submounts over, pivot into it. Returns the lower fstype."""
    ensure_proc()
    mounts = mountinfo()
    root = next((m for m in mounts if m[2] == "/"), None)
    if root is None:
        raise RuntimeError("no / in /proc/self/mountinfo")
    if root[3] == "overlay":
        return "overlay (already)"
    libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)  # pivot_root and MS_MOVE need it
    # Mounts below / (the top-most ones; moving them takes their children along).
    top = [m[2] for m in mounts if m[1] == root[0] and m[2] not in ("/", WORK)]
    options = "mode=0755" + (f",size={size}" if size else "")
    libc.mount("tmpfs", WORK, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, options)
    for directory in ("upper", "work", "root"):
        os.mkdir(f"{WORK}/{directory}", 0o755)
    libc.mount("overlay", f"{WORK}/root", "overlay", 0,
               f"lowerdir=/,upperdir={WORK}/upper,workdir={WORK}/work")
    for point in top:
        target = f"{WORK}/root{point}"
        os.makedirs(target, exist_ok=True)
        libc.mount(point, target, None, libc.MS_MOVE)
    os.chdir(f"{WORK}/root")
    # pivot_root(".", "."): the old root ends up stacked on the new one, and is detached right away.
    libc.pivot_root(".", ".")
    libc.umount2(".", libc.MNT_DETACH)
    os.chdir("/")
    return root[3]
