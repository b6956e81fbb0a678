"""The one process supervisor: spawns every child the Guest API runs and is the only one that waits for them.

Each child is spawned under `reaper.LOCK` and `reaper.own()`ed before the lock is released, so PID 1's
orphan reaper never takes its exit status; its exit is learnt from a pidfd watched by the event loop and
collected with `waitid(P_PIDFD)`, after which the pid is `disown()`ed. Signals go through the pidfd too, so
a signal can never hit a recycled pid. This module never waits by pid, never uses asyncio's subprocess API
(whose child watcher waits by pid) and never lets `subprocess.Popen` wait: the Popen object is kept only so
that it does not reap on its own, and is handed its return code by us.

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

    __slots__ = ("pid", "argv", "group", "exited", "code", "signal", "_pidfd", "_popen", "_on_exit", "_reap")

    def __init__(self, popen: subprocess.Popen[bytes], argv: list[str], pidfd: int, group: bool,
                 reap: Callable[[Process], None]) -> None:
        self.pid = popen.pid
        self.argv = argv
        self.group = group  # the child leads its own process group (pgid == pid)
        self.code: int | None = None
        self.signal: int | None = None
        self.exited: asyncio.Future[tuple[int | None, int | None]] = asyncio.get_running_loop().create_future()
        self._pidfd = pidfd
        self._popen = popen
        self._on_exit: list[Callable[[Process], None]] = []
        self._reap = reap

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def on_exit(self, callback: Callable[[Process], None]) -> None:
        """Call `callback(process)` right as it is reaped, from the reaping callback itself: one loop turn
        sooner than a callback on `exited` (which the loop schedules for its next turn)."""
        self._on_exit.append(callback)

    def poll(self) -> bool:
        """Reap it now if it has exited (without waiting for the loop to see its pidfd): for a caller that
        has reason to think it is about to, as when its output pipes have all closed. True once reaped."""
        if self.running:
            self._reap(self)
        return not self.running

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
        loop = asyncio.get_running_loop()
        self._loop = loop
        argv = list(argv)
        with reaper.LOCK:
            popen = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                                     close_fds=True, start_new_session=new_session, preexec_fn=preexec_fn)
            reaper.own(popen.pid)
            try:
                pidfd = os.pidfd_open(popen.pid)
            except OSError:  # cannot happen for an unreaped child, but never leave it unowned and unwaited
                reaper.disown(popen.pid)
                popen.kill()
                popen.wait()
                raise
        child = Process(popen, argv, pidfd, new_session, self._reap)
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
            child._popen.returncode = -1
        elif info.si_code == os.CLD_EXITED:
            child.code = info.si_status
            child._popen.returncode = info.si_status
        else:  # CLD_KILLED or CLD_DUMPED
            child.signal = info.si_status
            child._popen.returncode = -info.si_status
        self.children.discard(child)
        child.exited.set_result((child.code, child.signal))
        callbacks, child._on_exit = child._on_exit, []
        for callback in callbacks:
            callback(child)

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
