"""The PVH kernel: the ELF unpacked from a bzImage's payload, cached, and the bzImage kept when it cannot be."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import pytest

from boxpark.host.backends.pvh import has_pvh_entry, payload, pvh_kernel


def elf_with_notes(notes: list[tuple[bytes, int, bytes]]) -> bytes:
    """A minimal ELF64 LE with one PT_NOTE segment holding `notes` (name, type, desc)."""
    blob = b""
    for name, kind, desc in notes:
        name += b"\0"
        blob += struct.pack("<III", len(name), len(desc), kind)
        blob += name + b"\0" * (-len(name) % 4) + desc + b"\0" * (-len(desc) % 4)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(blob), len(blob), 4)
    return bytes(header) + phdr + blob


def bzimage(compressed: bytes) -> bytes:
    """A bzImage shell: one setup sector after the boot sector, the header's magic, the payload's place."""
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, 100, len(compressed))
    return bytes(setup) + bytes(100) + compressed + bytes(64)


PVH_NOTE = (b"Xen", 18, struct.pack("<I", 0x1000000))


def test_the_pvh_note_is_found_among_others() -> None:
    assert has_pvh_entry(elf_with_notes([(b"Xen", 6, b"linux\0"), PVH_NOTE]))
    assert not has_pvh_entry(elf_with_notes([(b"Xen", 6, b"linux\0"), (b"GNU", 18, b"1234")]))
    assert not has_pvh_entry(b"MZ" + bytes(200))


def test_unpacked_once_then_taken_from_the_cache(tmp_path: Path) -> None:
    elf = elf_with_notes([PVH_NOTE])
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(gzip.compress(elf)))
    assert payload(image.read_bytes())[:2] == b"\x1f\x8b"
    cache = tmp_path / "cache"
    got = pvh_kernel(str(image), cache)
    assert got is not None and Path(got).read_bytes() == elf
    Path(got).write_bytes(b"cached")  # a second call does not unpack again
    assert pvh_kernel(str(image), cache) == got and Path(got).read_bytes() == b"cached"
    assert [p.name for p in cache.iterdir()] == [Path(got).name]  # no temporary file left


@pytest.mark.parametrize("content", [
    bzimage(gzip.compress(elf_with_notes([(b"Xen", 6, b"linux\0")]))),  # no PVH entry point
    bzimage(b"\x00\x01\x02\x03 not a known compression"),
    b"\x7fELF not a bzImage at all",
])
def test_anything_else_boots_as_it_is(tmp_path: Path, content: bytes) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(content)
    assert pvh_kernel(str(image), tmp_path / "cache") is None


def test_the_images_kernel_has_a_pvh_entry(tmp_path: Path) -> None:
    """The Debian cloud kernel the image ships (lz4 inside): QEMU can boot it through PVH."""
    from boxpark.dirs import cache_home

    kernel = cache_home() / "images" / "amd64" / "vmlinuz"
    if not kernel.exists():
        pytest.skip("no amd64 image built (boxpark image build)")
    if shutil.which("lz4") is None:
        pytest.skip("no lz4 program: the qemu backend boots the bzImage (apt-get install lz4)")
    got = pvh_kernel(str(kernel), tmp_path)
    assert got is not None and has_pvh_entry(Path(got).read_bytes())
