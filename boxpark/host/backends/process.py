"""The machine's host processes, watched through pidfds: what QEMU, virtiofsd's peers and the sandbox run as.

A `PidfdProcess` is signalled through its pidfd only, so a pid that was reused is never hit, and its exit
is awaited on the event loop (the pidfd turns readable) with no thread and no SIGCHLD handler. Linux only
(`pidfd_open`): a backend that runs its machine in this process (vz) has a `MachineEnd` of its own instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from typing import Protocol

PR_SET_PDEATHSIG = 1


class MachineEnd(Protocol):
    """What a backend waits on for its machine's end: a child process, or (vz) a VM in this process."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    async def wait_for(self, timeout: float) -> int | None: ...

    def close(self) -> None: ...


class PidfdProcess:
    """A child process watched through a pidfd: `await wait()`, `signal()` never hits a reused pid."""

    def __init__(self, popen: subprocess.Popen[bytes], what: str) -> None:
        self.popen = popen
        self.what = what
        self.pid = popen.pid
        self.pidfd: int | None = os.pidfd_open(popen.pid)
        self.started = time.monotonic()
        self._exited: asyncio.Future[int] | None = None

    @property
    def returncode(self) -> int | None:
        if self.popen.returncode is None:
            self.popen.poll()
        return self.popen.returncode

    def signal(self, signum: int) -> bool:
        """Send `signum`; False when the process is already gone."""
        if self.pidfd is None or self.returncode is not None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            return False
        return True

    async def wait(self) -> int:
        """Its exit status (reaped); negative for a signal, as subprocess has it."""
        code = self.returncode
        if code is not None:
            return code
        if self._exited is None:
            loop = asyncio.get_running_loop()
            self._exited = loop.create_future()
            assert self.pidfd is not None
            pidfd = self.pidfd

            def readable() -> None:
                loop.remove_reader(pidfd)
                code = self.popen.wait()
                if self._exited is not None and not self._exited.done():
                    self._exited.set_result(code)

            loop.add_reader(pidfd, readable)
        return await asyncio.shield(self._exited)

    async def wait_for(self, timeout: float) -> int | None:
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        """Kill it if it still runs, reap it, and release the pidfd."""
        if self.returncode is None:
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        if self.pidfd is not None:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the host process that started it dies (no orphan machines)."""
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

