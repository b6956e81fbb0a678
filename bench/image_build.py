"""The image builder: rebuild after a code change, unchanged build, sizes, QEMU (TCG) boot to the init for
amd64 and arm64, and bundle export/import.

References, measured in the same run: the base's own squashfs compression (its tree, unpacked from the
cached base, compressed again with the builder's options: what every code change would cost without the
appended layer), the boot's time to the initramfs's switch_root (the kernel's and initramfs's share of
the time to the init), and for export/import a plain copy of the same bytes. The arm64 base's build time
is the one figure read from the cache's record (its build takes minutes through qemu-user). Needs root the first time (the Debian bases; arm64's takes minutes through qemu-user).
Goals: rebuild after a code change ≤ 45 s; unchanged build instant; root ≤ 192 MiB (lz4 for boot speed; zstd -15 was 140 MiB); export and import
within a few times a plain copy.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._report import figure
from boxpark.image import build, bundle, pylayer

INIT_STARTED = re.compile(r"^boxpark-init: (\[[ \d.]+\] )?started", re.MULTILINE)
SWITCHED = "boxpark-initramfs: switching to"


def quiet(line: str) -> None:
    print("   " + line, file=sys.stderr)


MACHINE = {
    "amd64": ["qemu-system-x86_64", "-machine", "q35"],
    "arm64": ["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a72"],
}


def boot(image: Path, work: Path, timeout: float = 120, arch: str = "amd64", accel: str = "tcg") -> tuple[float, float]:
    """Seconds from QEMU's start to the initramfs's switch_root line and to the init's first line."""
    log = work / f"console-{arch}.log"
    log.unlink(missing_ok=True)  # a boot before in `work` left its init's line there
    argv = [
        *MACHINE[arch], "-accel", accel, "-m", "1024", "-nographic", "-no-reboot",
        "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
        "-append", "root=/dev/vda rootfstype=squashfs console=hvc0",
        "-drive", f"file={image / 'root.squashfs'},if=none,id=root,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=root",
        "-device", "virtio-serial-pci", "-chardev", f"file,id=con,path={log}", "-device", "virtconsole,chardev=con",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    switched = None
    try:
        while time.monotonic() - start < timeout:
            text = log.read_text(errors="replace") if log.exists() else ""
            if switched is None and SWITCHED in text:
                switched = time.monotonic() - start
            if INIT_STARTED.search(text):
                return switched or 0.0, time.monotonic() - start
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"the init did not start; console:\n{log.read_text(errors='replace')[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def base_compression(manifest: dict[str, Any], work: Path) -> float:
    """Seconds to compress the amd64 base's tree again, as the builder does (the tree unpacked first,
    untimed)."""
    from boxpark.image import rootfs

    base = build.cache_dir() / "bases" / manifest["root"]["base"] / "base.squashfs"
    tree, out = work / "base-tree", work / "base-again.squashfs"
    subprocess.run(["unsquashfs", "-no-progress", "-quiet", "-d", str(tree), str(base)], check=True,
                   stdout=subprocess.DEVNULL)
    start = time.monotonic()
    subprocess.run(["mksquashfs", str(tree), str(out), "-noappend", "-no-progress", "-quiet",
                    *rootfs.BASE_COMPRESSION], check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    shutil.rmtree(tree)
    out.unlink()
    return seconds


def main() -> None:
    image = build.build_image(build.default_image_dir("amd64", True), progress=quiet)
    manifest = json.loads((image / "manifest.json").read_text())
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp:
        work = Path(tmp)
        source = work / "src" / "boxpark"
        shutil.copytree(pylayer.package_dir(), source, ignore=shutil.ignore_patterns("__pycache__"))
        with open(source / "guest" / "init.py", "a") as f:
            f.write(f"# bench {time.time_ns()}\n")
        start = time.monotonic()
        build.build_image(work / "image", source=source, progress=quiet)
        rebuild = time.monotonic() - start
        start = time.monotonic()
        build.build_image(work / "image", source=source, progress=quiet)
        unchanged = time.monotonic() - start
        switched, started = boot(image, work)
        full = base_compression(manifest, work)

    figure("image_rebuild_after_code_change", rebuild, "s", full, "<= 45 s")
    figure("image_unchanged_build", unchanged, "s", rebuild, "instant")
    root_mib = manifest["files"]["root.squashfs"]["size"] / 2**20
    figure("image_root_size", root_mib, "MiB", None, "<= 192 MiB (lz4; zstd -15 was 140)")
    figure("image_initrd_size", manifest["files"]["initrd.img"]["size"] / 2**20, "MiB", None, "~1 MiB")
    figure("image_boot_to_init_tcg", started, "s", switched, "init reached in ~4 s")
    bundle_figures(image)
    arm64()


def bundle_figures(image: Path) -> None:
    """Export and import of the amd64 image, against copying the same bytes."""
    with tempfile.TemporaryDirectory(prefix="bench-bundle-") as tmp:
        work = Path(tmp)
        start = time.monotonic()
        for name in ("manifest.json", *build.OUTPUTS):
            shutil.copyfile(image / name, work / name)
        copy = time.monotonic() - start
        start = time.monotonic()
        out = bundle.export_bundle(image, work / "image.tar").path
        export = time.monotonic() - start
        start = time.monotonic()
        bundle.import_bundle(out, work / "imported")
        imported = time.monotonic() - start
        size = out.stat().st_size / 2**20
    figure("image_export", export, "s", copy, "a few times a copy")
    figure("image_import", imported, "s", copy, "a few times a copy")
    figure("image_bundle_size", size, "MiB", None, "~ the image's files")


def arm64() -> None:
    """The arm64 image (built through qemu-user: minutes cold): its cold base build, size, boot to init."""
    image = build.build_image(build.default_image_dir("arm64", True), arch="arm64", progress=quiet)
    manifest = json.loads((image / "manifest.json").read_text())
    base = manifest["root"]["base_seconds"] or {}
    figure("image_arm64_base_build", sum(base.values()), "s", base.get("base squashfs"), "a few minutes")
    figure("image_arm64_root_size", manifest["files"]["root.squashfs"]["size"] / 2**20, "MiB", None,
           "<= 192 MiB (lz4; zstd -15 was 140)")
    with tempfile.TemporaryDirectory(prefix="bench-arm64-") as tmp:
        switched, started = boot(image, Path(tmp), arch="arm64")
    figure("image_arm64_boot_to_init_tcg", started, "s", switched, "init reached in ~4 s")


if __name__ == "__main__":
    main()
