"""A cgroup of its own for every launched service, so that nothing it started outlives it.

When a service's main process exits, whatever it left behind (dockerd's containerd, a daemon's helpers) is
killed with `cgroup.kill`, the way systemd's control-group kill mode does it; otherwise a restarted
dockerd finds the old containerd still holding its files. Only in the guest (PID 1, cgroup2 at
/sys/fs/cgroup with the init in its leaf); anywhere else the calls do nothing.
"""

from __future__ import annotations

import itertools
import logging
import os
import re

log = logging.getLogger("boxpark.guest.cgroups")

ROOT = "/sys/fs/cgroup"
SERVICES = f"{ROOT}/services"
_counter = itertools.count(1)


def available() -> bool:
    return os.getpid() == 1 and os.path.exists(f"{ROOT}/init/cgroup.kill")


def make(name: str) -> str | None:
    """A new, empty cgroup for a service called `name` (None where there are no service cgroups)."""
    if not available():
        return None
    path = f"{SERVICES}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:64]}.{next(_counter)}"
    try:
        os.makedirs(path)
    except OSError as exc:
        log.warning("no cgroup for %s: %s", name, exc.strerror)
        return None
    return path


def enter(path: str) -> None:
    """In the child, before exec: move itself into `path` (so it cannot fork before it is placed)."""
    with open(f"{path}/cgroup.procs", "w") as f:
        f.write("0")


def kill(path: str) -> None:
    """SIGKILL everything left in `path`, then remove it once it is empty (best effort)."""
    try:
        with open(f"{path}/cgroup.kill", "w") as f:
            f.write("1")
    except OSError as exc:
        log.warning("cgroup.kill of %s: %s", path, exc.strerror)
    remove(path)


def remove(path: str, tries: int = 50) -> None:
    import asyncio

    try:
        os.rmdir(path)
    except OSError:  # EBUSY until the killed processes are gone
        if tries > 0:
            asyncio.get_running_loop().call_later(0.1, remove, path, tries - 1)
