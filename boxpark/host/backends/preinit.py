"""The sandbox's pre-init: plays the kernel's part for the guest init, then becomes it (PID 1).

Runs as PID 1 of fresh pid/mount/net/uts/ipc/cgroup namespaces (`unshare … --fork` started it, in the
sandbox's own cgroup), with the host's Python (`-S -I`): stdlib only, nothing slow, no boxpark import.
It mounts the image's squashfs (already attached read-only to a loop device by the host) on a fresh
directory, gives it a private tmpfs /dev holding only the nodes a userland needs (never the host's
devtmpfs: that would show the host's disks), a tmpfs /run with the host's state directory bound at
/run/boxpark/host (where the API and event sockets live), writes the settings file, pivots into the new
root, drops CAP_SYS_TIME and CAP_SYS_BOOT for good, and execs the image's /sbin/init (the image's Python).

Anything wrong: one `boxpark-preinit: FATAL:` line on stderr (the sandbox's console.log) and exit 1.

    python3 -S -I preinit.py LOOP_DEVICE MOUNTPOINT STATE_DIR INIT SETTINGS [TAG[:FD]=DIRECTORY ...]
    e.g.    ... preinit.py /dev/loop3 /state/root /state /sbin/init "boxpark.sandbox=1 boxpark.api=…" share0=/home/me

Each TAG=DIRECTORY is a host directory shared with the guest: bound (with its submounts) at
/run/boxpark/shares/TAG, where the agent's init phase binds it on its target. TAG:FD=DIRECTORY binds it
idmapped (Linux 5.12+) by the user namespace the host left open at FD, whose root is the share's owner:
the guest's root acts as that owner there, as on the qemu backend's home share.

Plain argv, no json: every import here is paid on every boot (json and platform cost ~20 ms together).
"""

import ctypes
import os
import sys
import time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
CAP_SYS_BOOT, CAP_SYS_TIME = 22, 25
DROPPED_CAPS = (CAP_SYS_TIME, CAP_SYS_BOOT)
CAPABILITY_VERSION_3 = 0x20080522
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442  # the same on every architecture
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, AT_RECURSIVE, AT_EMPTY_PATH = 1, 0o2000000, 0x8000, 0x1000
MOVE_MOUNT_F_EMPTY_PATH, AT_FDCWD, MOUNT_ATTR_IDMAP = 4, -100, 0x100000

# name, mode, major, minor: the whole /dev a guest userland gets (the init adds pts, shm and the links)
DEVICES = (
    ("null", 0o666, 1, 3), ("zero", 0o666, 1, 5), ("full", 0o666, 1, 7), ("random", 0o666, 1, 8),
    ("urandom", 0o666, 1, 9), ("tty", 0o666, 5, 0), ("ptmx", 0o666, 5, 2),
)
HOST_DIR = "/run/boxpark/host"
SETTINGS = "/run/boxpark/settings"
SHARES = "/run/boxpark/shares"

_libc = ctypes.CDLL(None, use_errno=True)


class Failed(Exception):
    pass


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise Failed(f"{what}: {os.strerror(errno)}")


def mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()),
           f"mount {fstype or source or ''} on {target}")


def pivot_root(new_root, put_old):
    machine = os.uname().machine
    number = SYS_PIVOT_ROOT.get(machine)
    if number is None:
        raise Failed(f"pivot_root: unknown syscall number on {machine}")
    _check(_libc.syscall(ctypes.c_long(number), new_root.encode(), put_old.encode()), "pivot_root")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_capabilities(caps=DROPPED_CAPS):
    """Out of the bounding set (no exec can regain them) and out of the inheritable and ambient sets."""
    for cap in caps:
        _check(_libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0), f"drop capability {cap}")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    header = _CapHeader(CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    for cap in caps:
        word, bit = divmod(cap, 32)
        mask = ~(1 << bit) & 0xFFFFFFFF
        data[word].inheritable &= mask
        data[word].effective &= mask
        data[word].permitted &= mask
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def make_dev(dev):
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m")
    old = os.umask(0)
    try:
        for name, mode, major, minor in DEVICES:
            os.mknod(f"{dev}/{name}", mode | 0o020000, os.makedev(major, minor))
        for name in ("pts", "shm"):
            os.mkdir(f"{dev}/{name}", 0o755)
    finally:
        os.umask(old)


def make_run(run, state, settings):
    mount("tmpfs", run, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    host = run + HOST_DIR[len("/run"):]
    os.makedirs(host, 0o755)
    mount(state, host, None, MS_BIND)
    mount(None, host, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    path = run + SETTINGS[len("/run"):]
    with open(path, "w") as f:
        f.write(settings + "\n")
    os.chmod(path, 0o644)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def idmapped_bind(directory, target, userns):
    """Bind `directory` (with its submounts) on `target` idmapped by the user namespace fd `userns` (the
    host made it: its root is the share's owner): the sandbox's root acts as that owner there."""
    tree = _libc.syscall(ctypes.c_long(SYS_OPEN_TREE), AT_FDCWD, directory.encode(),
                         ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE))
    try:
        if tree < 0:
            _check(-1, f"open_tree {directory}")
        attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns)
        _check(_libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), tree, b"", ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
                             ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
               f"idmap {directory}")
        _check(_libc.syscall(ctypes.c_long(SYS_MOVE_MOUNT), tree, b"", AT_FDCWD, target.encode(),
                             ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)), f"move_mount {directory} on {target}")
    finally:
        os.close(userns)
        if tree >= 0:
            os.close(tree)


def bind_shares(run, shares):
    """Each TAG=DIRECTORY (or TAG:FD=DIRECTORY, idmapped by the user namespace open at FD) bound at
    <run>/boxpark/shares/TAG (read-write; the guest's bind on the target adds ro)."""
    for share in shares:
        name, _, directory = share.partition("=")
        tag, _, userns = name.partition(":")
        if not tag or "/" in tag or not directory.startswith("/") or (userns and not userns.isdigit()):
            raise Failed(f"a share is TAG[:FD]=/DIRECTORY, not {share!r}")
        target = f"{run}{SHARES[len('/run'):]}/{tag}"
        os.makedirs(target, 0o755)
        if userns:
            try:
                idmapped_bind(directory, target, int(userns))
                continue
            except Failed as exc:  # e.g. a filesystem without idmapped mounts (NFS): share it all the same
                sys.stderr.write(f"boxpark-preinit: warning: {exc}; {directory} is shared with the host's ids "
                                 f"(the guest's root writes as root)\n")
        mount(directory, target, None, MS_BIND | MS_REC)


def main(argv):
    start = time.monotonic()
    if len(argv) < 6:
        raise Failed("usage: preinit.py LOOP_DEVICE MOUNTPOINT STATE_DIR INIT SETTINGS [TAG[:FD]=DIRECTORY ...]")
    loop, root, state, init, settings = argv[1:6]
    if os.getpid() != 1:
        raise Failed(f"not PID 1 of a new pid namespace (pid {os.getpid()}): run me under unshare --pid --fork")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount may reach the host
    mount(loop, root, "squashfs", MS_RDONLY)
    make_dev(root + "/dev")
    make_run(root + "/run", state, settings)
    bind_shares(root + "/run", argv[6:])
    os.chdir(root)
    pivot_root(".", ".")  # the old root ends up stacked on the new one: detach it
    _check(_libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")
    drop_capabilities()
    if not os.path.exists(init):
        raise Failed(f"the image has no {init}")
    # stamped with CLOCK_MONOTONIC like the init's lines (the host's clock: no time namespace here)
    sys.stderr.write(f"boxpark-preinit: [{time.monotonic():9.3f}] root {loop} (squashfs, ro) ready in "
                     f"{(time.monotonic() - start) * 1000:.1f} ms; exec {init}\n")
    sys.stderr.flush()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/", "TERM": "linux", "BOXPARK_SETTINGS": SETTINGS}
    os.execve(init, [init], env)


if __name__ == "__main__":
    try:
        main(sys.argv)
    except (Failed, OSError, ValueError) as exc:
        sys.stderr.write(f"boxpark-preinit: FATAL: {exc}\n")
        sys.exit(1)
