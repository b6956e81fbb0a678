"""The sandbox's pre-init: makes the namespaces, plays the kernel's part for the guest init, then becomes it.

Started by the host (`SandboxBackend`) with the host's Python (`-S -I`): stdlib only, nothing slow, no
boxpark import. It sets PR_SET_PDEATHSIG (it dies with the host process) and waits on SYNC_FD until the
host has moved it into the sandbox's cgroup (the move waits for an RCU grace period, ~16 ms: the host does
it while this Python starts, off the boot's path). Then it does what `unshare --pid --mount --net --uts
--ipc --cgroup --fork --kill-child` did: unshares those namespaces (the cgroup namespace rooted at the
sandbox's cgroup), forks, and stays as the parent that waits for its child and exits with its status;
the child, PID 1 of the new pid namespace, dies if that parent dies.

PID 1 mounts the image's squashfs (already attached read-only to a loop device by the host) on a fresh
directory, gives it a private tmpfs /dev holding only the nodes a userland needs (never the host's
devtmpfs: that would show the host's disks), a tmpfs /run with the host's state directory bound at
/run/boxpark/host (where the API and event sockets live), writes the settings file, pivots into the new
root, drops CAP_SYS_TIME and CAP_SYS_BOOT for good, and execs the image's /sbin/init (the image's Python).

Anything wrong: one `boxpark-preinit: FATAL:` line on stderr (the sandbox's console.log) and exit 1.

    python3 -S -I preinit.py SYNC_FD HOST_PID LOOP_DEVICE MOUNTPOINT STATE_DIR INIT SETTINGS [TAG[:FD]=DIRECTORY ...]
    e.g.    ... preinit.py 5 4242 /dev/loop3 /state/root /state /sbin/init "boxpark.sandbox=1 …" share0=/home/me

The host runs it as `-c "…; run()"` from this directory's __pycache__ (a script would be compiled anew on
every boot); HOST_PID is the process that must be its parent (else it ends at once).

Each TAG=DIRECTORY is a host directory shared with the guest: bound (with its submounts) at
/run/boxpark/shares/TAG, where the agent's init phase binds it on its target. TAG:FD=DIRECTORY binds it
idmapped (Linux 5.12+) by the user namespace the host left open at FD, whose root is the share's owner:
the guest's root acts as that owner there, as on the qemu backend's home share.

Plain argv, no json: every import here is paid on every boot (json and platform cost ~20 ms together);
`_signal`, not `signal` (which imports enum).
"""

import _signal
import ctypes
import os
import sys
import time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP = 1, 24
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
NAMESPACES = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP
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


def die_with_parent():
    """SIGKILL when our parent dies (as `unshare --kill-child` gives its child)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(_signal.SIGKILL), 0, 0, 0), "PR_SET_PDEATHSIG")


def enter(sync_fd, host_pid):
    """Die with the host process, wait until it has put us in the sandbox's cgroup, unshare the namespaces;
    return the seconds waited for the host."""
    die_with_parent()
    if os.getppid() != host_pid:  # it died before the line above: nobody would ever stop us
        raise Failed(f"the host process {host_pid} is gone")
    began = time.monotonic()
    moved = os.read(sync_fd, 1)
    os.close(sync_fd)
    waited = time.monotonic() - began
    if moved != b"1":
        raise Failed("the host did not move the pre-init into the sandbox's cgroup")
    _check(_libc.unshare(NAMESPACES), "unshare the namespaces")
    return waited


def fork_pid1():
    """Fork PID 1 of the new pid namespace; here, in the parent, wait for it and end as it ended."""
    signals = {_signal.SIGINT, _signal.SIGTERM}
    blocked = _signal.pthread_sigmask(_signal.SIG_BLOCK, signals)  # as unshare --fork: the child handles them
    pid = os.fork()
    if pid == 0:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, blocked)  # the init must not inherit the block
        die_with_parent()
        return
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed: end by the same signal, as unshare does
        try:
            _signal.signal(-code, _signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL, SIGSTOP: always their default
            pass
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {-code})
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def main(argv):
    start = time.monotonic()
    if len(argv) < 8:
        raise Failed("usage: preinit.py SYNC_FD HOST_PID LOOP_DEVICE MOUNTPOINT STATE_DIR INIT SETTINGS "
                     "[TAG[:FD]=DIRECTORY ...]")
    sync_fd, host_pid = int(argv[1]), int(argv[2])
    loop, root, state, init, settings = argv[3:8]
    waited = enter(sync_fd, host_pid)
    fork_pid1()
    if os.getpid() != 1:
        raise Failed(f"not PID 1 of a new pid namespace (pid {os.getpid()})")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount may reach the host
    mount(loop, root, "squashfs", MS_RDONLY)
    make_dev(root + "/dev")
    make_run(root + "/run", state, settings)
    bind_shares(root + "/run", argv[8:])
    os.chdir(root)
    pivot_root(".", ".")  # the old root ends up stacked on the new one: detach it
    _check(_libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")
    drop_capabilities()
    if not os.path.exists(init):
        raise Failed(f"the image has no {init}")
    # stamped with CLOCK_MONOTONIC like the init's lines (the host's clock: no time namespace here)
    sys.stderr.write(f"boxpark-preinit: [{time.monotonic():9.3f}] root {loop} (squashfs, ro) ready in "
                     f"{(time.monotonic() - start) * 1000:.1f} ms ({waited * 1000:.1f} of them waiting for the "
                     f"host to move it into the cgroup); exec {init}\n")
    sys.stderr.flush()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/", "TERM": "linux", "BOXPARK_SETTINGS": SETTINGS}
    os.execve(init, [init], env)


def run():
    """The entry point (`python3 -S -I -c "…; run()" ARGS`, or this file run as a script)."""
    try:
        main(sys.argv)
    except (Failed, OSError, ValueError) as exc:
        sys.stderr.write(f"boxpark-preinit: FATAL: {exc}\n")
        sys.exit(1)


if __name__ == "__main__":
    run()
