"""The bootable kernel: arm64's raw `Image` (checked by its magic), unpacked when a package ships it
compressed (gzip, zstd, EFI zboot); x86's bzImage; anything else refused with a sentence."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from boxpark.image import kernel
from boxpark.image.subp import BuildError


def arm64_image(size: int = 4096) -> bytes:
    """An arm64 Image header: an EFI stub's "MZ", then at 0x38 the magic "ARM\\x64"."""
    data = bytearray(size)
    data[0:2] = b"MZ"
    data[0x38:0x3C] = b"ARM\x64"
    data[0x100:] = bytes(i % 251 for i in range(size - 0x100))
    return bytes(data)


def bzimage(size: int = 4096) -> bytes:
    data = bytearray(size)
    data[0x202:0x206] = b"HdrS"
    return bytes(data)


def zboot(payload: bytes, method: bytes = b"gzip") -> bytes:
    """An EFI zboot image: "MZ", 2 bytes, "zimg", payload offset and size, 8 bytes, the method's name."""
    offset = 0x200
    header = bytearray(offset)
    header[0:2], header[4:8] = b"MZ", b"zimg"
    struct.pack_into("<II", header, 8, offset, len(payload))
    header[0x18 : 0x18 + len(method)] = method
    return bytes(header) + payload + b"\0" * 64


def test_formats() -> None:
    assert kernel.image_format(arm64_image()) == "arm64-image"
    assert kernel.image_format(bzimage()) == "bzimage"
    assert kernel.image_format(gzip.compress(arm64_image())) == "gzip"
    assert kernel.image_format(b"\x28\xb5\x2f\xfd" + bytes(100)) == "zstd"
    assert kernel.image_format(zboot(b"x")) == "zboot"
    assert kernel.image_format(b"\x7fELF" + bytes(1000)) == "unknown"


def test_a_raw_image_is_used_as_it_is(tmp_path: Path) -> None:
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(arm64_image())
    assert kernel.bootable_image(vmlinuz, "arm64", tmp_path / "Image") == vmlinuz
    assert not (tmp_path / "Image").exists()
    vmlinuz.write_bytes(bzimage())
    assert kernel.bootable_image(vmlinuz, "amd64", tmp_path / "Image") == vmlinuz


def test_a_gzip_kernel_is_unpacked_and_checked(tmp_path: Path) -> None:
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(gzip.compress(arm64_image()) + b"\0" * 300)  # padding after the stream, as in packages
    out = kernel.bootable_image(vmlinuz, "arm64", tmp_path / "Image")
    assert out == tmp_path / "Image" and out.read_bytes() == arm64_image()
    assert kernel.bootable_image(vmlinuz, "arm64", tmp_path / "Image") == out  # reused


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd")
def test_a_zstd_kernel_is_unpacked(tmp_path: Path) -> None:
    packed = subprocess.run(["zstd", "-c", "-q"], input=arm64_image(), capture_output=True, check=True).stdout
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(packed)
    assert kernel.bootable_image(vmlinuz, "arm64", tmp_path / "Image").read_bytes() == arm64_image()
    vmlinuz.write_bytes(zboot(packed, b"zstd"))
    assert kernel.bootable_image(vmlinuz, "arm64", tmp_path / "Image2").read_bytes() == arm64_image()


def test_an_efi_zboot_kernel_is_unpacked(tmp_path: Path) -> None:
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(zboot(gzip.compress(arm64_image())))
    assert kernel.bootable_image(vmlinuz, "arm64", tmp_path / "Image").read_bytes() == arm64_image()
    vmlinuz.write_bytes(zboot(b"whatever", b"lzma"))
    with pytest.raises(BuildError, match="compressed with 'lzma'"):
        kernel.bootable_image(vmlinuz, "arm64", tmp_path / "Image3")


def test_what_is_not_a_kernel_for_the_arch_is_refused(tmp_path: Path) -> None:
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(bzimage())
    with pytest.raises(BuildError, match="is a bzimage kernel, not one for arm64"):
        kernel.bootable_image(vmlinuz, "arm64", tmp_path / "Image")
    vmlinuz.write_bytes(gzip.compress(b"not a kernel" * 100))
    with pytest.raises(BuildError, match=r"unpacks \(gzip\) to something that is not an arm64 boot image"):
        kernel.bootable_image(vmlinuz, "arm64", tmp_path / "Image")
    assert not (tmp_path / "Image").exists()
    vmlinuz.write_bytes(b"\x7fELF" + bytes(1000))
    with pytest.raises(BuildError, match="neither a boot image nor gzip/zstd"):
        kernel.bootable_image(vmlinuz, "arm64", tmp_path / "Image")
