"""The x86 kernel as an ELF with a PVH entry point, unpacked once from the image's bzImage.

QEMU boots such an ELF directly (`-kernel vmlinux`, PVH boot): no real-mode setup, no decompressor and
no relocation pass in the guest, which under TCG cost 1-2 s of every boot (bench/boot.py). The ELF is
the bzImage's own payload (its setup header says where: payload_offset and payload_length), unpacked
on the host once per kernel and kept in the cache, keyed by the bzImage's contents. Anything that stops
this (no PVH note, a compression without a decompressor here, no writable cache) leaves the bzImage in
use: a slower boot, never a failed one.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

log = logging.getLogger("boxpark.host.qemu")

XEN_ELFNOTE_PHYS32_ENTRY = 18  # the ELF note that marks a PVH entry point
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


def payload(bzimage: bytes) -> bytes:
    """The compressed kernel inside a bzImage (boot protocol 2.08+), or ValueError."""
    if bzimage[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", bzimage, 0x206)[0] < 0x208:
        raise ValueError("not a bzImage with boot protocol 2.08 or later")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return bzimage[start:start + length]


def decompress(data: bytes) -> bytes:
    """The kernel's payload unpacked: gzip, xz and lzma here, lz4 and zstd through their programs."""
    if data[:2] == b"\x1f\x8b":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)  # trailing bytes are ignored
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMADecompressor().decompress(data)
    if data[:4] == LZ4_LEGACY_MAGIC:
        return _program(["lz4", "-d", "-c", "-q"], data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return _program(["zstd", "-d", "-c", "-q"], data)
    if data[:3] == b"\x5d\x00\x00":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
    raise ValueError(f"the kernel's payload is compressed in a way not handled here ({data[:4].hex()})")


def _program(argv: list[str], data: bytes) -> bytes:
    if shutil.which(argv[0]) is None:
        raise ValueError(f"{argv[0]} is not installed (the kernel's payload is {argv[0]}-compressed)")
    done = subprocess.run(argv, input=data, capture_output=True, timeout=120)
    # lz4's legacy frames may be followed by padding it complains about after a complete kernel
    if not done.stdout.startswith(b"\x7fELF"):
        raise ValueError(f"{argv[0]} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF carries the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        at, end = p_offset, p_offset + p_filesz
        while at + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, at)
            name = elf[at + 12:at + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def pvh_kernel(bzimage: str, cache: Path) -> str | None:
    """The PVH ELF of `bzimage` (unpacked into `cache` the first time), or None: boot the bzImage."""
    try:
        data = Path(bzimage).read_bytes()
        target = cache / f"{hashlib.sha256(data).hexdigest()[:24]}.elf"
        if target.exists():
            return str(target)
        elf = decompress(payload(data))
        if not has_pvh_entry(elf):
            log.debug("pvh: %s has no PVH entry point: booting the bzImage", bzimage)
            return None
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            tmp.write_bytes(elf)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return str(target)
    except (OSError, ValueError, EOFError, zlib.error, lzma.LZMAError, subprocess.SubprocessError) as exc:
        log.debug("pvh: booting the bzImage %s as it is: %s", bzimage, exc)
        return None
