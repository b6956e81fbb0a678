"""The binfmt_misc registration string for x86_64 programs (Rosetta, qemu-x86_64), and `register` against a
stand-in directory (never the host's binfmt_misc: an x86_64 entry there would catch this host's programs)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from boxpark.guest import binfmt

DEBIAN_BUSYBOX_HEADER = bytes.fromhex("7f454c4602010100000000000000000002003e00")  # an ET_EXEC x86_64 file


def matches(header: bytes, magic: bytes, mask: bytes) -> bool:
    """What the kernel does: every magic byte equals the file's byte under the mask."""
    return all((h & k) == m for h, m, k in zip(header, magic, mask))


def elf_header(*, cls: int = 2, data: int = 1, osabi: int = 0, etype: int = 2, machine: int = 62) -> bytes:
    return b"\x7fELF" + bytes([cls, data, 1, osabi]) + bytes(8) + struct.pack("<HH", etype, machine)


def test_the_x86_64_registration_string() -> None:
    line = binfmt.x86_64_registration("/run/rosetta/rosetta")
    magic = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00"
    mask = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    assert line == f":rosetta:M::{magic}:{mask}:/run/rosetta/rosetta:CF"
    fields = line.split(":")
    assert len(fields) == 8 and fields[0] == "" and fields[2] == "M" and fields[3] == ""  # offset 0


def test_it_matches_x86_64_executables_and_pies_of_any_os_abi_only() -> None:
    magic, mask = binfmt.elf_magic(binfmt.EM_X86_64)
    assert len(magic) == len(mask) == 20
    assert matches(DEBIAN_BUSYBOX_HEADER, magic, mask)
    assert matches(elf_header(etype=3), magic, mask)  # PIE (ET_DYN)
    assert matches(elf_header(osabi=3), magic, mask)  # ELFOSABI_GNU
    assert not matches(elf_header(machine=183), magic, mask)  # aarch64
    assert not matches(elf_header(machine=3), magic, mask)  # i386
    assert not matches(elf_header(cls=1), magic, mask)  # 32-bit
    assert not matches(elf_header(data=2), magic, mask)  # big-endian
    assert not matches(elf_header(etype=1), magic, mask)  # relocatable object
    assert not matches(elf_header(etype=4), magic, mask)  # core
    assert not matches(b"#!/bin/sh\n" + bytes(10), magic, mask)


def test_the_aarch64_magic() -> None:
    magic, mask = binfmt.elf_magic(binfmt.EM_AARCH64)
    assert matches(elf_header(machine=183, etype=3), magic, mask)
    assert not matches(DEBIAN_BUSYBOX_HEADER, magic, mask)


@pytest.mark.parametrize(
    "name, interpreter, flags",
    [
        ("", "/x", "CF"),
        ("a/b", "/x", "CF"),
        ("a:b", "/x", "CF"),
        ("..", "/x", "CF"),
        ("ok", "relative/path", "CF"),
        ("ok", "/with:colon", "CF"),
        ("ok", "/x", "CX"),
        ("ok", "/x", "FF"),
    ],
)
def test_what_the_kernel_would_refuse_is_refused_here(name: str, interpreter: str, flags: str) -> None:
    magic, mask = binfmt.elf_magic(binfmt.EM_X86_64)
    with pytest.raises(ValueError):
        binfmt.registration(name, interpreter, magic, mask, flags)


def test_magic_and_mask_must_agree() -> None:
    with pytest.raises(ValueError, match="same length"):
        binfmt.registration("x", "/x", b"\x7fELF", b"\xff\xff")
    with pytest.raises(ValueError, match="never match"):
        binfmt.registration("x", "/x", b"\x7f", b"\x0f")


def test_parse_entry() -> None:
    text = "enabled\ninterpreter /run/rosetta/rosetta\nflags: OCF\noffset 0\nmagic 7f454c46\nmask ffffffff\n"
    assert binfmt.parse_entry(text) == {"enabled": "yes", "interpreter": "/run/rosetta/rosetta", "flags": "OCF"}
    assert binfmt.parse_entry("disabled\ninterpreter /x\nflags: \n")["enabled"] == "no"


def fake_binfmt(tmp_path: Path) -> Path:
    (tmp_path / "register").write_text("")
    return tmp_path


def test_register_writes_one_line_to_register(tmp_path: Path) -> None:
    root = fake_binfmt(tmp_path)
    assert binfmt.register("/usr/bin/qemu-x86_64-static", "qemu-x86_64", root=str(root)) is True
    assert (root / "register").read_text() == binfmt.x86_64_registration("/usr/bin/qemu-x86_64-static",
                                                                          "qemu-x86_64")


def test_register_keeps_an_identical_entry_and_replaces_another(tmp_path: Path) -> None:
    root = fake_binfmt(tmp_path)
    entry = root / "rosetta"
    entry.write_text("enabled\ninterpreter /run/rosetta/rosetta\nflags: OCF\n")
    assert binfmt.register(binfmt.ROSETTA_INTERPRETER, root=str(root)) is False
    assert (root / "register").read_text() == ""
    entry.write_text("enabled\ninterpreter /usr/bin/qemu-x86_64-static\nflags: F\n")
    assert binfmt.register(binfmt.ROSETTA_INTERPRETER, root=str(root)) is True
    assert entry.read_text().startswith("-1")  # removed first (the kernel would drop the file here)
    assert (root / "register").read_text().endswith(":/run/rosetta/rosetta:CF")


def test_unregister(tmp_path: Path) -> None:
    root = fake_binfmt(tmp_path)
    assert binfmt.unregister("nothing", root=str(root)) is False
    (root / "x").write_text("enabled\n")
    assert binfmt.unregister("x", root=str(root)) is True and (root / "x").read_text().startswith("-1")


def test_the_boot_path_does_not_import_it() -> None:
    import subprocess
    import sys

    code = "import sys, boxpark.guest.init; print('boxpark.guest.binfmt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
