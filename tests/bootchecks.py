"""What every booted guest must show, on every tier: the checks the sandbox and vm boot tests share.

Each takes what the guest reported (its /proc/self/mountinfo) as text, so a test gets it
however its tier talks to the guest (`Machine.sh`, `boxpark exec`) and the check itself is written once.
"""

from __future__ import annotations


def mountinfo(text: str) -> dict[str, tuple[str, str]]:
    """mount point -> (fstype, options) from /proc/self/mountinfo text (the last mount on a point wins)."""
    mounts = {}
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, _source, options = right.split()[:3]
        mounts[fields[4]] = (fstype, options)
    return mounts


def boot_mounts(mountinfo_text: str, dev: str) -> dict[str, tuple[str, str]]:
    """The root is the init's overlay (its upper layer on the tmpfs at /mnt) and the API filesystems are
    mounted; `dev` is /dev's filesystem (the VM's own devtmpfs; the sandbox's tmpfs, never the host's
    devtmpfs). Returns the mounts. That the lower layer is the squashfs each tier shows its own way (the
    init detaches it after the pivot)."""
    mounts = mountinfo(mountinfo_text)
    fstype, options = mounts["/"]
    assert fstype == "overlay" and "upperdir=/mnt/upper" in options, mounts["/"]
    expected = {"/proc": "proc", "/sys": "sysfs", "/dev": dev, "/dev/pts": "devpts", "/dev/shm": "tmpfs",
                "/sys/fs/cgroup": "cgroup2", "/run": "tmpfs", "/tmp": "tmpfs"}
    found = {point: mounts.get(point, ("(not mounted)", ""))[0] for point in expected}
    assert found == expected, found
    return mounts
