"""Who may wait for which child. PID 1 reaps only the children nobody in this process owns.

The supervisor and `subp` spawn under `LOCK` and `own()` the pid before releasing it; they wait for their
own children themselves (pidfds, `Popen.wait`) and `disown()` them after. `reap_orphans()` (PID 1, on
SIGCHLD) takes the lock, so it never sees an owned child as an orphan and never steals an exit status.
"""

from __future__ import annotations

import os
import threading

LOCK = threading.Lock()
_owned: set[int] = set()


def own(pid: int) -> None:
    """Mark `pid` as waited for by its spawner (call with LOCK held, right after spawning)."""
    _owned.add(pid)


def disown(pid: int) -> None:
    _owned.discard(pid)


def owned(pid: int) -> bool:
    return pid in _owned


def reap_orphans() -> list[tuple[int, int]]:
    """Reap every exited child that nobody owns; return their (pid, wait status) pairs."""
    reaped: list[tuple[int, int]] = []
    with LOCK:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return reaped
            if info is None:
                return reaped
            if info.si_pid in _owned:
                break  # its owner waits for it; the others are found by scanning
            reaped += _reap(info.si_pid)
        for pid in _children():
            if pid not in _owned:
                reaped += _reap(pid)
    return reaped


def _reap(pid: int) -> list[tuple[int, int]]:
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return []
    return [(got, status)] if got else []


def _children() -> list[int]:
    """This process's children: from /proc/self/task/*/children, else by scanning /proc for our ppid."""
    me = os.getpid()
    pids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{me}/task")
        for task in tasks:
            with open(f"/proc/{me}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        return pids
    except OSError:
        pass
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and int(fields[1]) == me:
            pids.append(int(entry))
    return pids
