"""The one process supervisor: spawns every child the Guest API runs and is the only one that waits for them.

Each child is spawned under `reaper.LOCK` and `reaper.own()`ed before the lock is released, so PID 1's
orphan reaper never takes its exit status; its exit is learnt from a pidfd watched by the event loop and
collected with `waitid(P_PIDFD)`, after which the pid is `disown()`ed. Signals go through the pidfd too, so
a signal can never hit a recycled pid. This module never waits by pid, never uses asyncio's subprocess API
(whose child watcher waits by pid) and never lets `subprocess.Popen` wait: the Popen object is kept only so
that it does not reap on its own, and is handed its return code by us.

A plain spawn (no `preexec_fn`, no `cwd`, stdio fds above 2, a program found on the PATH) goes through
`os.posix_spawn` (one CLONE_VFORK, no error pipe, none of Popen's Python): about 40% less CPU per spawn
than Popen here. Any other spawn, and any spawn posix_spawn refuses, goes through Popen, so every error a
caller sees is Popen's own.

Everything here runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import os
import signal as signals
import subprocess
from typing import Any, Callable, Mapping, Sequence

from . import reaper


class Process:
    """One spawned process: its pid, and a future that completes with `(code, signal)` once it is reaped."""

    __slots__ = ("pid", "argv", "group", "exited", "code", "signal", "_pidfd", "_popen")

    def __init__(self, loop: asyncio.AbstractEventLoop, pid: int, popen: subprocess.Popen[bytes] | None,
                 argv: list[str], pidfd: int, group: bool) -> None:
        self.pid = pid
        self.argv = argv
        self.group = group  # the child leads its own process group (pgid == pid)
        self.code: int | None = None
        self.signal: int | None = None
        self.exited: asyncio.Future[tuple[int | None, int | None]] = loop.create_future()
        self._pidfd = pidfd
        self._popen = popen

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def send_signal(self, signum: int, group: bool = False) -> bool:
        """Signal the child (or its whole process group); False when it has already been reaped.

        The group id is the child's pid: while the child is unreaped (its pidfd open here) that id cannot
        name anybody else's group. After the reap it could, so a reaped child is never signalled.
        """
        if not self.running:
            return False
        if group and self.group:
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                return False
            return True
        try:
            signals.pidfd_send_signal(self._pidfd, signum)
        except ProcessLookupError:
            return False
        return True

    def __repr__(self) -> str:
        state = "running" if self.running else f"code={self.code} signal={self.signal}"
        return f"<Process {self.pid} {self.argv[0]!r} {state}>"


class Supervisor:
    """Spawns children and reaps each one through its pidfd; `stop_all` ends them all."""

    def __init__(self) -> None:
        self.children: set[Process] = set()  # the running ones
        self._loop: asyncio.AbstractEventLoop | None = None

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
              stdin: int = subprocess.DEVNULL, stdout: int = subprocess.DEVNULL,
              stderr: int = subprocess.DEVNULL, new_session: bool = True,
              preexec_fn: Callable[[], Any] | None = None) -> Process:
        """Start argv (never through a shell) with the given fds as its stdio; raise OSError if it cannot.

        `new_session` puts the child in a new session and process group of its own, so that it and its
        descendants can be signalled together and it has no controlling terminal (unless `preexec_fn`
        gives it one).
        """
        loop = self._loop or asyncio.get_running_loop()  # (each get_running_loop is a getpid system call)
        self._loop = loop
        argv = list(argv)
        popen = None
        with reaper.LOCK:
            pid = None
            if preexec_fn is None and cwd is None:
                pid = _posix_spawn(argv, env, (stdin, stdout, stderr), new_session)
            if pid is None:
                popen = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                                         close_fds=True, start_new_session=new_session, preexec_fn=preexec_fn)
                pid = popen.pid
            reaper.own(pid)
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:  # cannot happen for an unreaped child, but never leave it unowned and unwaited
                reaper.disown(pid)
                os.kill(pid, signals.SIGKILL)
                os.waitpid(pid, 0)
                if popen is not None:
                    popen.returncode = -signals.SIGKILL
                raise
        child = Process(loop, pid, popen, argv, pidfd, new_session)
        self.children.add(child)
        loop.add_reader(pidfd, self._reap, child)
        return child

    def _reap(self, child: Process) -> None:
        with reaper.LOCK:  # no spawn may reuse the pid between the reap and the disown
            try:
                info = os.waitid(os.P_PIDFD, child._pidfd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:  # someone else waited for it: its status is lost
                info = None
                lost = True
            else:
                lost = False
                if info is None:
                    return  # not exited yet (a spurious wake-up)
            reaper.disown(child.pid)
        assert self._loop is not None
        self._loop.remove_reader(child._pidfd)
        os.close(child._pidfd)
        child._pidfd = -1
        if lost or info is None:
            child.code, child.signal = None, None
        elif info.si_code == os.CLD_EXITED:
            child.code = info.si_status
        else:  # CLD_KILLED or CLD_DUMPED
            child.signal = info.si_status
        if child._popen is not None:
            child._popen.returncode = -1 if child.code is None and child.signal is None else (
                child.code if child.code is not None else -(child.signal or 0))
        self.children.discard(child)
        child.exited.set_result((child.code, child.signal))

    async def stop_all(self, grace: float) -> None:
        """SIGTERM every running child's process group, SIGKILL whatever is left after `grace`, wait for all."""
        children = list(self.children)
        if not children:
            return
        for child in children:
            child.send_signal(signals.SIGTERM, group=True)
            child.send_signal(signals.SIGCONT, group=True)  # a stopped process cannot act on SIGTERM
        waits = [child.exited for child in children]
        _, pending = await asyncio.wait(waits, timeout=grace)
        if pending:
            for child in children:
                if child.running:
                    child.send_signal(signals.SIGKILL, group=True)
            await asyncio.wait(pending)


_DEVNULL = -1
_SEALED = False
_RESET = (signals.SIGPIPE, signals.SIGXFSZ)  # what Popen's restore_signals resets (Python ignores them)


def _posix_spawn(argv: list[str], env: Mapping[str, str] | None, stdio: tuple[int, int, int],
                 new_session: bool) -> int | None:
    """Spawn argv with posix_spawn and return its pid; None where Popen must do it (or say why it cannot).

    As Popen does: the program is looked up on the PATH of `env` (the server's own without one), the child
    gets a new session with `new_session`, SIGPIPE and SIGXFSZ back at their defaults, and no fd but its
    stdio (every fd of this process is close-on-exec, as Python opens them)."""
    global _DEVNULL, _SEALED
    if not _SEALED:  # what this process inherited may be inheritable: never hand it on
        _seal_inherited()
        _SEALED = True
    actions = []
    for target, fd in enumerate(stdio):
        if fd == subprocess.DEVNULL:
            if _DEVNULL < 0:
                _DEVNULL = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            fd = _DEVNULL
        if not isinstance(fd, int) or fd < 3:  # dup2 onto itself would keep close-on-exec; leave it to Popen
            return None
        actions.append((os.POSIX_SPAWN_DUP2, fd, target))
    program = argv[0]
    if not isinstance(program, str) or not program:
        return None
    # os.environ decodes every variable on each iteration; its bytes dict is what the child gets anyway
    environment = getattr(os.environ, "_data", os.environ) if env is None else env
    key = (program, None if "/" in program else environment.get(b"PATH" if env is None else "PATH"))
    path = _found.get(key)
    if path is None or not os.access(path, os.X_OK):  # a program found before is checked again, with one call
        path = _lookup(program, None if "/" in program else os.get_exec_path(env))
        if path is None:
            return None
        if len(_found) >= 256:
            _found.clear()
        _found[key] = path
    try:
        return os.posix_spawn(path, argv, environment, file_actions=actions, setsid=new_session,
                              setsigdef=_RESET)
    except (OSError, ValueError, TypeError):
        return None  # Popen tries again and raises its own error


_found: dict[tuple[str, object], str] = {}
"""Where a program was found, by its name and the PATH it was looked up on (at most 256 entries): the first executable one, as Popen's search
finds it, unless one appears earlier on that PATH later (then the cached one is used, as a shell's hash)."""


def _lookup(program: str, search: list[str] | None) -> str | None:
    candidates = [program] if search is None else [os.path.join(directory, program) for directory in search]
    for path in candidates:
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def _seal_inherited() -> None:
    """Make every fd above 2 close-on-exec (Python opens its own so; this catches those inherited at start)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # closed meanwhile (the listing's own fd)
                pass
