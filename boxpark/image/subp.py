"""The image builder's one door to other programs, and its errors.

Every command the builder runs goes through `run()`: an argv list (never a shell string), a timeout, and on
failure one `CommandError` carrying the argv, the exit code and the tail of stdout/stderr. Nothing else in
`boxpark.image` imports `subprocess`. The errors here are what a user sees: a sentence and, where we know
one, a hint saying what to do — never a traceback.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import BoxparkError

# The Debian package that provides each tool the builder runs, for the "install X" hint.
TOOL_PACKAGES: dict[str, str] = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "apt-config": "apt",
    "chroot": "coreutils",
    "debootstrap": "debootstrap",
    "depmod": "kmod",
    "dpkg": "dpkg",
    "dpkg-deb": "dpkg",
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "mount": "mount",
    "umount": "mount",
    "zstd": "zstd",
}


class BuildError(BoxparkError):
    """The image could not be built (or exported, or imported). `str()` is a sentence for the user; `hint`
    (if any) says what to do. Not `host.spec`'s error for an image that is missing."""

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"




class CommandError(BuildError):
    """A command exited non-zero (or timed out: `returncode` is None). Carries argv, exit code and output."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int | None,
        stdout: str,
        stderr: str,
        hint: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        what = "timed out" if returncode is None else f"failed with exit code {returncode}"
        tail = _tail(stderr) or _tail(stdout)
        message = f"command {what}: {' '.join(self.argv)}"
        if tail:
            message += "\n" + "\n".join("    " + line for line in tail.splitlines())
        super().__init__(message, hint)


class MissingToolError(BuildError):
    """A program the builder needs is not installed; the hint names the Debian package that provides it."""


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def require_tools(*names: str) -> None:
    """Raise MissingToolError naming every absent tool and the Debian packages to install."""
    missing = [name for name in names if find_tool(name) is None]
    if missing:
        packages = sorted({TOOL_PACKAGES.get(name, name) for name in missing})
        raise MissingToolError(
            f"missing tool{'s' if len(missing) > 1 else ''}: {', '.join(missing)}",
            hint=f"apt-get install {' '.join(packages)}",
        )


def find_tool(name: str) -> str | None:
    """The tool's path, also looking in the sbin directories a non-login root shell may lack in PATH."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 600,
    input: bytes | None = None,
    hint: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run argv to completion, capturing its output; raise CommandError if it fails or times out.

    `env` entries are added to (not substituted for) the current environment. `hint` is attached to the
    error, for failures whose usual cause we know (no network, no root, ...).
    """
    args = [os.fspath(a) for a in argv]
    exe = find_tool(args[0]) if "/" not in args[0] else args[0]
    if exe is None:
        require_tools(args[0])
        raise AssertionError("unreachable")
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        # Its own session, so that an interrupted build can stop the command's whole process tree
        # (debootstrap and apt leave dpkg children behind when only the parent is killed).
        proc = subprocess.Popen(
            [exe, *args[1:]],
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise BuildError(f"cannot run {args[0]}: {exc.strerror}", hint) from None
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        raise CommandError(args, None, _text(stdout), _text(stderr), hint) from None
    except BaseException:  # KeyboardInterrupt, SystemExit from a signal handler: stop it all, then go on
        _kill_group(proc)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise CommandError(args, proc.returncode, _text(stdout), _text(stderr), hint)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", "replace")


def output(argv: Sequence[str | os.PathLike[str]], **kwargs: object) -> str:
    """run() and return stdout as text."""
    return _text(run(argv, **kwargs).stdout)  # type: ignore[arg-type]


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path` (from /proc/self/mountinfo), deepest first."""
    root = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                mnt = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
                if mnt == root or mnt.startswith(root.rstrip("/") + "/"):
                    found.append(Path(mnt))
    except OSError:
        return []
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path) -> None:
    """Delete a build tree safely: unmount whatever a tool left mounted in it, and never cross a mount.

    debootstrap bind-mounts host device nodes and mounts /proc and /sys inside its target; a plain
    rmtree over a left-over bind mount would delete the host's files.
    """
    if not os.path.lexists(path):
        return
    for mnt in mounts_under(path):
        try:
            run(["umount", mnt], timeout=60)
        except BuildError:
            run(["umount", "-l", mnt], timeout=60)
    if mounts_under(path):
        raise BuildError(f"cannot remove {path}: something is still mounted under it")
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    device = path.lstat().st_dev
    _remove_dir(path, device)


def _remove_dir(path: Path, device: int) -> None:
    with os.scandir(path) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if entry.is_dir(follow_symlinks=False):
                if st.st_dev != device:
                    raise BuildError(f"refusing to delete across a mount point: {entry.path}")
                _remove_dir(Path(entry.path), device)
            else:
                os.unlink(entry.path)
    os.rmdir(path)
