"""The initramfs archive: a newc cpio the kernel (and cpio(1)) can read."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from boxpark.image.initramfs import CpioWriter, build, init_script


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """A minimal newc reader: {name: (mode, data, (rdevmajor, rdevminor))}."""
    entries = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", pos
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = (name_start + namesize + 3) & ~3
        body = data[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body, (rmaj, rmin))


def test_writer_round_trip_with_padding_for_every_name_length() -> None:
    w = CpioWriter()
    w.directory("d")
    for n in range(1, 9):
        w.file("d/" + "x" * n, b"y" * n, 0o755)
    w.symlink("d/link", "target")
    w.char_device("dev-console", 5, 1)
    data = w.finish()
    assert len(data) % 512 == 0
    entries = read_newc(data)
    assert stat.S_ISDIR(entries["d"][0])
    for n in range(1, 9):
        mode, body, _ = entries["d/" + "x" * n]
        assert body == b"y" * n and stat.S_IMODE(mode) == 0o755 and stat.S_ISREG(mode)
    assert stat.S_ISLNK(entries["d/link"][0]) and entries["d/link"][1] == b"target"
    assert stat.S_ISCHR(entries["dev-console"][0]) and entries["dev-console"][2] == (5, 1)


def test_writer_refuses_duplicates() -> None:
    w = CpioWriter()
    w.directory("a")
    with pytest.raises(ValueError):
        w.directory("/a/")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_gnu_cpio_reads_our_archive() -> None:
    w = CpioWriter()
    w.directory("bin")
    w.file("bin/hello", b"hi\n", 0o755)
    w.symlink("bin/sh", "hello")
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=w.finish(), capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["bin", "bin/hello", "bin/sh"]


def test_build_lays_out_init_busybox_and_modules_in_order(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF fake")
    moddir = tmp_path / "mods"
    (moddir / "kernel" / "a").mkdir(parents=True)
    (moddir / "kernel" / "a" / "virtio.ko").write_bytes(b"v")
    (moddir / "kernel" / "a" / "virtio-blk.ko").write_bytes(b"b")
    out = tmp_path / "initrd.img"
    info = build(
        out, busybox=busybox, moddir=moddir, module_paths=["kernel/a/virtio.ko", "kernel/a/virtio-blk.ko"]
    )
    assert info.size == out.stat().st_size
    entries = read_newc(gzip.decompress(out.read_bytes()))
    assert entries["init"][1] == init_script() and entries["init"][0] & 0o111
    assert entries["bin/busybox"][1] == b"\x7fELF fake"
    assert entries["etc/boxpark/modules"][1] == b"virtio\nvirtio_blk\n"
    assert entries["lib/modules/virtio_blk.ko"][1] == b"b"
    assert entries["dev/console"][2] == (5, 1)
    assert info.modules == ["virtio", "virtio_blk"]
    # same inputs, same bytes
    build(
        tmp_path / "again.img",
        busybox=busybox,
        moddir=moddir,
        module_paths=["kernel/a/virtio.ko", "kernel/a/virtio-blk.ko"],
    )
    assert (tmp_path / "again.img").read_bytes() == out.read_bytes()


def test_init_script_is_valid_sh() -> None:
    sh = shutil.which("busybox") or shutil.which("dash") or "sh"
    argv = [sh, "sh", "-n"] if sh.endswith("busybox") else [sh, "-n"]
    subprocess.run([*argv, "/dev/stdin"], input=init_script(), check=True)
