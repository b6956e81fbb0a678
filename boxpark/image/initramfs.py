"""The initramfs: busybox, the boot modules and `initramfs-init.sh`, as a gzip'd newc cpio archive.

Written in Python (no cpio run, no root needed for the device nodes): every entry is owned by root with
mtime 0, so the same inputs give the same bytes. The modules go in flat under /lib/modules with their
load order, resolved at build time, in /etc/boxpark/modules — busybox's insmod does no dependency work.
"""

from __future__ import annotations

import gzip
import io
import lzma
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import subp
from .modules import module_name

NEWC_MAGIC = b"070701"


class CpioWriter:
    """Writes a newc ("070701") cpio archive, the format the kernel unpacks into its rootfs."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 0
        self._names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name}")
        self._names.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        self._write_padded(header + encoded)
        self._write_padded(data)

    def _write_padded(self, blob: bytes) -> None:
        self._out.write(blob)
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive with its trailer, padded to 512 bytes."""
        self._entry("TRAILER!!!", 0, nlink=1)
        self._out.write(b"\0" * (-self._out.tell() % 512))
        return self._out.getvalue()


@dataclass(frozen=True)
class InitramfsInfo:
    size: int
    modules: list[str]


def init_script() -> bytes:
    """The initramfs's /init, shipped beside this module."""
    return resources.files("boxpark.image").joinpath("initramfs-init.sh").read_bytes()


def read_module(path: Path) -> bytes:
    """A module's ELF bytes: busybox insmod takes no compressed modules, so unpack them here."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subp.run(["zstd", "-d", "-c", path]).stdout
    return data


def build(out: Path, *, busybox: Path, moddir: Path, module_paths: list[str]) -> InitramfsInfo:
    """Write the compressed initramfs to `out`; `module_paths` (relative to `moddir`) in load order."""
    cpio = CpioWriter()
    for d in (
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "newroot",
        "etc",
        "etc/boxpark",
        "lib",
        "lib/modules",
    ):
        cpio.directory(d, 0o1777 if d == "tmp" else 0o755)
    # The kernel opens /dev/console for /init before any devtmpfs exists: the node must be in the archive.
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.char_device("dev/kmsg", 1, 11, 0o644)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    names = []
    for rel in module_paths:
        name = module_name(rel)
        cpio.file(f"lib/modules/{name}.ko", read_module(moddir / rel))
        names.append(name)
    cpio.file("etc/boxpark/modules", "".join(f"{n}\n" for n in names).encode())
    cpio.file("init", init_script(), 0o755)
    data = gzip.compress(cpio.finish(), compresslevel=9, mtime=0)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return InitramfsInfo(len(data), names)
