"""Running another architecture's programs on the build host: qemu-user through binfmt_misc.

`debootstrap --arch=arm64` on an amd64 host runs arm64 maintainer scripts (and later `apt-get` in the
chroot) in one stage, which works only while the kernel hands arm64 ELF files to qemu-user. This module
checks that, and sets up what it can without installing anything: mounts binfmt_misc when nothing is
mounted on /proc/sys/fs/binfmt_misc, and registers the handler from the line qemu-user-static ships in
/usr/lib/binfmt.d (what systemd-binfmt would do at boot). The handler must have the F flag (the kernel opens
the interpreter when it is registered), since the interpreter's path does not exist inside the chroot.
It never installs a package: a missing one is an error naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import subp
from .progress import Progress
from .subp import BuildError

BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")
BINFMT_D = (Path("/usr/lib/binfmt.d"), Path("/lib/binfmt.d"))
# Debian arch -> the qemu-user name: the binfmt handler, its binfmt.d file, the `-static` binary.
QEMU_USER = {"arm64": "qemu-aarch64", "amd64": "qemu-x86_64"}
PACKAGE = "qemu-user-static"


@dataclass(frozen=True)
class Handler:
    """One registered binfmt_misc entry, as /proc/sys/fs/binfmt_misc/<name> describes it."""

    enabled: bool
    interpreter: str
    flags: str


def parse_handler(text: str) -> Handler:
    """The kernel's description of a handler: `enabled`, `interpreter PATH`, `flags: FLAGS`, ..."""
    enabled, interpreter, flags = False, "", ""
    for line in text.splitlines():
        if line.strip() == "enabled":
            enabled = True
        elif line.startswith("interpreter "):
            interpreter = line[len("interpreter ") :].strip()
        elif line.startswith("flags:"):
            flags = line[len("flags:") :].strip()
    return Handler(enabled, interpreter, flags)


def registration_line(conf_text: str) -> str:
    """The register string in a binfmt.d file: its first line that is not blank or a comment."""
    for line in conf_text.splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            return line.strip()
    raise ValueError("no registration line")


def write_once(path: Path, text: str) -> None:
    """One write(2): binfmt_misc takes each write as one whole command."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def ensure_can_run(arch: str, host_arch: str, progress: Progress, binfmt: Path = BINFMT_MISC) -> None:
    """Make sure `arch` programs run on this host (for a chroot), or raise BuildError saying what to do."""
    if arch == host_arch:
        return
    name = QEMU_USER.get(arch)
    if name is None:
        raise BuildError(f"cannot build an {arch} root on an {host_arch} host", hint=f"build it on an {arch} host")
    what = f"building an {arch} root on an {host_arch} host runs {arch} programs through {name}-static"
    conf = next((d / f"{name}.conf" for d in BINFMT_D if (d / f"{name}.conf").is_file()), None)
    if subp.find_tool(f"{name}-static") is None or conf is None:
        raise BuildError(f"{what}, which is not installed", hint=f"apt-get install {PACKAGE}")
    if not (binfmt / "register").exists():
        try:
            subp.run(["mount", "-t", "binfmt_misc", "binfmt_misc", binfmt], timeout=30)
        except BuildError as exc:
            raise BuildError(
                f"{what}, and binfmt_misc is not mounted (mounting it failed: {exc.message.splitlines()[-1]})",
                hint=f"mount -t binfmt_misc binfmt_misc {binfmt}",
            ) from None
        progress.say(f"mounted binfmt_misc on {binfmt}")
    entry = binfmt / name
    if not entry.exists():
        line = registration_line(conf.read_text(encoding="utf-8"))
        try:
            write_once(binfmt / "register", line)
        except OSError as exc:
            raise BuildError(
                f"{what}, and registering it with binfmt_misc failed: {exc.strerror}",
                hint=f"register it yourself: cat {conf} > {binfmt}/register",
            ) from None
        progress.say(f"registered {name} with binfmt_misc (from {conf})")
    handler = parse_handler(entry.read_text(encoding="utf-8"))
    if not handler.enabled:
        raise BuildError(f"{what}, but its binfmt_misc handler is disabled", hint=f"echo 1 > {entry}")
    if "F" not in handler.flags:
        raise BuildError(
            f"{what}, but its binfmt_misc handler ({handler.interpreter}) lacks the F flag, so it cannot "
            "run inside a chroot",
            hint=f"apt-get install {PACKAGE}; then echo -1 > {entry} and build again "
            "(the builder registers the static one)",
        )
