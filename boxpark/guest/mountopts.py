"""mount(8)-style options split the way mount(2) wants them: flags, a propagation change, the data string.

Pure: no system call here. `parse_options` splits the options the way mount(8) does: the flags it knows go
to the mount call, a propagation (`private`, `rshared`, ...) needs a second call, options only mount(8) and
fstab readers care about are dropped, and everything else is the filesystem's data string, in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import libc

# option -> (flags it sets, flags it clears); "rw" clears what "ro" sets, and so on
_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (libc.MS_RDONLY, 0), "rw": (0, libc.MS_RDONLY),
    "nosuid": (libc.MS_NOSUID, 0), "suid": (0, libc.MS_NOSUID),
    "nodev": (libc.MS_NODEV, 0), "dev": (0, libc.MS_NODEV),
    "noexec": (libc.MS_NOEXEC, 0), "exec": (0, libc.MS_NOEXEC),
    "sync": (libc.MS_SYNCHRONOUS, 0), "async": (0, libc.MS_SYNCHRONOUS),
    "dirsync": (libc.MS_DIRSYNC, 0),
    "mand": (libc.MS_MANDLOCK, 0), "nomand": (0, libc.MS_MANDLOCK),
    "noatime": (libc.MS_NOATIME, 0), "atime": (0, libc.MS_NOATIME),
    "nodiratime": (libc.MS_NODIRATIME, 0), "diratime": (0, libc.MS_NODIRATIME),
    "relatime": (libc.MS_RELATIME, 0), "norelatime": (0, libc.MS_RELATIME),
    "strictatime": (libc.MS_STRICTATIME, 0), "nostrictatime": (0, libc.MS_STRICTATIME),
    "lazytime": (libc.MS_LAZYTIME, 0), "nolazytime": (0, libc.MS_LAZYTIME),
    "nosymfollow": (libc.MS_NOSYMFOLLOW, 0), "symfollow": (0, libc.MS_NOSYMFOLLOW),
    "silent": (libc.MS_SILENT, 0), "loud": (0, libc.MS_SILENT),
    "bind": (libc.MS_BIND, 0), "rbind": (libc.MS_BIND | libc.MS_REC, 0),
    "move": (libc.MS_MOVE, 0),
    "remount": (libc.MS_REMOUNT, 0),
}

_PROPAGATION = {
    "private": libc.MS_PRIVATE, "shared": libc.MS_SHARED, "slave": libc.MS_SLAVE,
    "unbindable": libc.MS_UNBINDABLE,
}

# options only mount(8) and fstab readers care about; the kernel would reject them in the data string
_USERSPACE_ONLY = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
                   "_netdev"}
_USERSPACE_PREFIXES = ("comment=", "x-", "X-")

# the flags a bind mount takes only through a second, remounting call
PER_MOUNT = (libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC | libc.MS_NOATIME
              | libc.MS_NODIRATIME | libc.MS_RELATIME | libc.MS_STRICTATIME | libc.MS_NOSYMFOLLOW)


@dataclass(frozen=True)
class MountOptions:
    """mount(8)-style options split the way mount(2) wants them."""

    flags: int = 0  # MS_* for the mount, bind or remount call
    propagation: int = 0  # MS_SHARED/PRIVATE/SLAVE/UNBINDABLE (| MS_REC): applied by a second call
    data: str = ""  # everything else, for the filesystem (comma-joined, order kept)
    mkdir: int | None = None  # X-mount.mkdir[=mode]: create the target with this mode

    @property
    def bind(self) -> bool:
        return bool(self.flags & libc.MS_BIND) and not self.flags & libc.MS_REMOUNT

    @property
    def remount(self) -> bool:
        return bool(self.flags & libc.MS_REMOUNT)

    @property
    def move(self) -> bool:
        return bool(self.flags & libc.MS_MOVE)


def split_options(options: list[str] | tuple[str, ...]) -> list[str]:
    """Each item may itself be `a,b,c`; commas inside double quotes (SELinux contexts) do not split."""
    words: list[str] = []
    for item in options:
        for match in re.finditer(r'(?:[^,"]|"[^"]*")+', item):
            word = match.group(0).strip()
            if word:
                words.append(word)
        if item.count('"') % 2:
            raise ValueError(f"unbalanced quote in mount option {item!r}")
    return words


def parse_options(options: list[str] | tuple[str, ...]) -> MountOptions:
    """Parse mount(8)-style options; raise ValueError naming an option that cannot be used."""
    flags = 0
    propagation = 0
    data: list[str] = []
    mkdir: int | None = None
    for word in split_options(options):
        if word in _FLAGS:
            set_, clear = _FLAGS[word]
            flags = (flags | set_) & ~clear
        elif word in _PROPAGATION:
            propagation = _PROPAGATION[word]
        elif word.startswith("r") and word[1:] in _PROPAGATION:
            propagation = _PROPAGATION[word[1:]] | libc.MS_REC
        elif word == "X-mount.mkdir" or word.startswith("X-mount.mkdir="):
            _, _, mode = word.partition("=")
            try:
                mkdir = int(mode, 8) if mode else 0o755
            except ValueError:
                raise ValueError(f"bad mode in mount option {word!r} (octal, like 0755)") from None
        elif word in ("loop",) or word.startswith("loop="):
            raise ValueError(f"mount option {word!r} is not supported: attach a loop device first and mount it")
        elif word in _USERSPACE_ONLY or word.startswith(_USERSPACE_PREFIXES):
            continue
        else:
            data.append(word)
    return MountOptions(flags=flags, propagation=propagation, data=",".join(data), mkdir=mkdir)
