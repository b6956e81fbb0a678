"""The sandbox's cgroup: a cgroup2 directory of its own, which every process of the sandbox lands in (or
below), so stopping finds them all; its cpu.max and memory.max are the machine's limits. Empty cgroups a
killed host process left behind are swept on the next start (the owner's pid is in the name)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import time
from typing import Iterator

from .base import BackendError

log = logging.getLogger("boxpark.host.sandbox")

CGROUP_PARENT = "boxpark"


def cgroup2_mount() -> str:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return left.split()[4]
    raise BackendError("this host has no cgroup2 hierarchy mounted; the sandbox needs one "
                       "(mount -t cgroup2 none /sys/fs/cgroup/unified)")


def cgroup2_controllers() -> set[str]:
    try:
        with open(f"{cgroup2_mount()}/cgroup.controllers") as f:
            return set(f.read().split())
    except (OSError, BackendError):
        return set()


class Cgroup:
    """A cgroup2 directory of our own; every process of the sandbox ends up in it (or below)."""

    def __init__(self, path: str, joinable: bool = True) -> None:
        self.path = path
        self._procs_fd = os.open(f"{path}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) if joinable else -1

    def join(self, pid: int) -> None:
        """Move the process `pid` into this cgroup (blocks for an RCU grace period: call it off the loop).

        The sandbox's pre-init waits for this before `unshare(CLONE_NEWCGROUP)`, so the guest's cgroup
        namespace is rooted here, and before it forks the guest's PID 1, which thus starts in here.
        """
        os.write(self._procs_fd, str(pid).encode())

    def walk(self) -> list[str]:
        """This cgroup and its descendants, deepest first."""
        return [root for root, _, _ in os.walk(self.path, topdown=False)]

    def pids(self) -> list[int]:
        pids: list[int] = []
        for directory in self.walk():
            with contextlib.suppress(OSError), open(f"{directory}/cgroup.procs") as f:
                pids += [int(p) for p in f.read().split()]
        return pids

    def populated(self) -> bool:
        try:
            with open(f"{self.path}/cgroup.events") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "populated":
                        return value.strip() != "0"
        except FileNotFoundError:
            return False
        return bool(self.pids())

    def kill(self) -> None:
        """SIGKILL everything in it: cgroup.kill (Linux 5.14+), else each listed pid (all are ours)."""
        try:
            with open(f"{self.path}/cgroup.kill", "w") as f:
                f.write("1")
            return
        except FileNotFoundError:
            pass
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def limit(self, cpus: int | None, memory_mib: int | None) -> None:
        if memory_mib is not None:
            with open(f"{self.path}/memory.max", "w") as f:
                f.write(str(memory_mib * 1024 * 1024))
        if cpus is not None:
            with open(f"{self.path}/cpu.max", "w") as f:
                f.write(f"{cpus * 100000} 100000")

    def remove(self) -> None:
        if self._procs_fd >= 0:
            os.close(self._procs_fd)
            self._procs_fd = -1
        for directory in self.walk():
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot remove the sandbox's cgroup %s: %s", directory, exc.strerror)


@contextlib.contextmanager
def sandbox_cgroup(name: str, cpus: int | None = None, memory_mib: int | None = None) -> Iterator[Cgroup]:
    """A fresh cgroup `<cgroup2>/boxpark/<name>-<random>`, removed (after its processes) on exit."""
    parent = f"{cgroup2_mount()}/{CGROUP_PARENT}"
    os.makedirs(parent, exist_ok=True)
    _sweep(parent)
    if cpus is not None or memory_mib is not None:
        wanted = [c for c, v in (("cpu", cpus), ("memory", memory_mib)) if v is not None]
        for directory in (cgroup2_mount(), parent):
            try:
                with open(f"{directory}/cgroup.subtree_control", "w") as f:
                    f.write(" ".join(f"+{c}" for c in wanted))
            except OSError as exc:
                raise BackendError(f"cannot enable the {' and '.join(wanted)} controller in {directory}: "
                                   f"{exc.strerror}; leave cpus and memory at their defaults") from None
    path = f"{parent}/{name}-{os.getpid()}-{secrets.token_hex(4)}"  # the owner's pid: see _sweep
    os.mkdir(path, 0o755)
    try:
        cgroup = Cgroup(path)
    except OSError:
        os.rmdir(path)
        raise
    try:
        cgroup.limit(cpus, memory_mib)
        yield cgroup
    finally:
        if cgroup.populated():
            cgroup.kill()
            deadline = time.monotonic() + 5
            while cgroup.populated() and time.monotonic() < deadline:
                time.sleep(0.01)
        cgroup.remove()


def _sweep(parent: str, age: float = 300.0) -> None:
    """Remove the empty cgroups a killed host process left behind (with the guest's own cgroups inside).

    A cgroup goes when nothing runs in it and its owner (the pid in its name) is gone — or, should that pid
    have been reused, when it is older than `age`. A live owner's empty cgroup may be about to fill: kept.
    """
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if not entry.is_dir(follow_symlinks=False):
                continue
            parts = entry.name.rsplit("-", 2)
            owner = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            owner_gone = owner is not None and not os.path.exists(f"/proc/{owner}")
            if not (owner_gone or now - entry.stat().st_mtime > age):
                continue
            cgroup = Cgroup(entry.path, joinable=False)
            if not cgroup.populated():
                cgroup.remove()  # an EBUSY (something moved in meanwhile) is logged and left alone


