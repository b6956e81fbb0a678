"""The sandbox's pre-init refuses to go on unless the host started it and moved it into the sandbox's cgroup.

Run as the backend runs it (`python -S -I -c "…; run()" SYNC_FD HOST_PID …`); these cases end before any
namespace is made, so they need no root.
"""

from __future__ import annotations

import os
import subprocess
import sys

from boxpark.host.backends.sandbox import PREINIT_RUN

ARGS = ["/dev/loop-none", "/nonexistent", "/nonexistent", "/sbin/init", "boxpark.sandbox=1"]


def run_preinit(sync: bytes | None, host_pid: int | None = None) -> subprocess.CompletedProcess[str]:
    read, write = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-S", "-I", "-c", PREINIT_RUN, str(read),
                                  str(os.getpid() if host_pid is None else host_pid), *ARGS],
                                 pass_fds=[read], stderr=subprocess.PIPE, text=True)
    finally:
        os.close(read)
    if sync is not None:
        os.write(write, sync)
    os.close(write)
    _, stderr = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, "", stderr)


def test_it_ends_when_the_host_closes_the_pipe_without_moving_it() -> None:
    done = run_preinit(None)
    assert done.returncode == 1
    assert done.stderr == "boxpark-preinit: FATAL: the host did not move the pre-init into the sandbox's cgroup\n"


def test_it_ends_when_its_parent_is_not_the_host_process() -> None:
    done = run_preinit(b"1", host_pid=1)
    assert done.returncode == 1
    assert done.stderr == "boxpark-preinit: FATAL: the host process 1 is gone\n"


def test_it_says_how_to_call_it() -> None:
    done = subprocess.run([sys.executable, "-S", "-I", "-c", PREINIT_RUN, "3"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "FATAL: usage: preinit.py SYNC_FD HOST_PID" in done.stderr
