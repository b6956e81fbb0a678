"""The guest's one door for running helper commands (resize2fs, sfdisk, mkswap, ...).

Not for the processes the API runs on a caller's behalf: those belong to the supervisor. Every internal
command goes through `run`, which raises one `HelperError` carrying argv, exit code, stdout and stderr.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from . import reaper


@dataclass
class HelperError(Exception):
    """A helper command failed to start, timed out or exited non-zero."""

    argv: list[str]
    code: int | None
    stdout: str
    stderr: str
    reason: str = ""

    def __str__(self) -> str:
        what = self.reason or f"exited with status {self.code}"
        detail = (self.stderr.strip() or self.stdout.strip()).splitlines()
        tail = f": {detail[-1]}" if detail else ""
        return f"{self.argv[0]} {what}{tail}"


def run(argv: list[str], *, timeout: float = 120.0, input: bytes | None = None,
        env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run argv to completion and return its result; raise `HelperError` unless it exits 0 (with `check`)."""
    try:
        with reaper.LOCK:  # so that PID 1's orphan reaper never takes this child's exit status
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=env, close_fds=True, start_new_session=True)
            reaper.own(process.pid)
    except FileNotFoundError:
        raise HelperError(list(argv), None, "", "", reason="is not installed") from None
    except PermissionError:
        raise HelperError(list(argv), None, "", "", reason="is not executable") from None
    try:
        out, err = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise HelperError(list(argv), None, out.decode(errors="replace"), err.decode(errors="replace"),
                           reason=f"timed out after {timeout:.0f} s") from None
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()
        reaper.disown(process.pid)
    result = subprocess.CompletedProcess(argv, process.returncode, out.decode(errors="replace"),
                                         err.decode(errors="replace"))
    if check and result.returncode != 0:
        raise HelperError(list(argv), result.returncode, result.stdout, result.stderr)
    return result
