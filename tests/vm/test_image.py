"""The guest image, built for real and booted under QEMU (TCG: this machine's /dev/kvm is PVM-only).

One build per session (the cache makes it instant when nothing changed). Every boot's console log is
checked for tracebacks and fatal lines, and QEMU is killed by its PID when a test ends.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from boxpark.image import build
from boxpark.image.build import build_image, default_image_dir
from boxpark.image.modules import parse_modules_dep
from tests.unit.test_image_initramfs import read_newc

pytestmark = pytest.mark.vm

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 120.0
CMDLINE = "root=/dev/vda rootfstype=squashfs console=hvc0"
# The init's first line: `boxpark-init: started`, maybe with an uptime stamp: `boxpark-init: [ 5.465] started`.
INIT_STARTED = re.compile(r"^boxpark-init: (\[[ \d.]+\] )?started", re.MULTILINE)
BAD_CONSOLE_LINES = ("Traceback (most recent call last)", "Kernel panic", "FATAL", "insmod", "Oops")


@dataclass
class Built:
    dir: Path
    manifest: dict[str, object]
    progress: list[str]
    seconds: float


def _progress(lines: list[str]):  # type: ignore[no-untyped-def]
    def report(line: str) -> None:
        lines.append(line)
        print(line, file=sys.stderr)

    return report


@pytest.fixture(scope="session")
def image() -> Built:
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (debootstrap)")
    lines: list[str] = []
    began = time.monotonic()
    out = build_image(
        default_image_dir("amd64", True), arch="amd64", with_docker=True, progress=_progress(lines)
    )
    seconds = time.monotonic() - began
    manifest = json.loads((out / "manifest.json").read_text())
    return Built(out, manifest, lines, seconds)


def squashfs_listing(path: Path) -> dict[str, str]:
    """{path in the image: `ls -l`-style line} from unsquashfs -lls."""
    proc = subprocess.run(
        ["unsquashfs", "-lls", "-d", "", str(path)], capture_output=True, text=True, check=True
    )
    entries = {}
    for line in proc.stdout.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[0][0] in "-dlcbps":
            name = parts[5].split(" -> ")[0]
            entries[name] = line
    return entries


def squashfs_cat(path: Path, member: str) -> bytes:
    return subprocess.run(["unsquashfs", "-cat", str(path), member], capture_output=True, check=True).stdout


# ----------------------------------------------------------------------------------------- QEMU


@dataclass
class Boot:
    proc: subprocess.Popen[bytes]
    log: Path
    started: float

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, needle: str | re.Pattern[str], timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds from QEMU's start until `needle` shows on the console; fails on timeout or exit."""
        deadline = self.started + timeout

        def found() -> bool:
            text = self.text()
            return needle in text if isinstance(needle, str) else needle.search(text) is not None

        while time.monotonic() < deadline:
            if found():
                return time.monotonic() - self.started
            if self.proc.poll() is not None and not found():
                pytest.fail(
                    f"QEMU exited ({self.proc.returncode}) before {needle!r}; console:\n{self.text()}"
                )
            time.sleep(0.05)
        pytest.fail(f"no {needle!r} within {timeout} s; console:\n{self.text()}")

    def wait_exit(self, timeout: float = BOOT_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=max(0.1, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU still running after {timeout} s; console:\n{self.text()}")


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (apt-get install qemu-system-x86)")
    boots: list[Boot] = []

    def start(image: Path, append: str = CMDLINE, with_root: bool = True) -> Boot:
        log = tmp_path / f"console-{len(boots)}.log"
        argv = [
            QEMU, "-machine", "q35", "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot",
            "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"), "-append", append,
            "-device", "virtio-serial-pci", "-chardev", f"file,id=con,path={log}",
            "-device", "virtconsole,chardev=con",
        ]  # fmt: skip
        if with_root:
            argv += ["-drive", f"file={image / 'root.squashfs'},if=virtio,format=raw,readonly=on"]
        with open(tmp_path / f"qemu-{len(boots)}.out", "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        boot = Boot(proc, log, time.monotonic())
        boots.append(boot)
        return boot

    yield start
    for boot in boots:
        if boot.proc.poll() is None:
            os.kill(boot.proc.pid, 9)
        boot.proc.wait(timeout=30)


def assert_clean_console(text: str, allow: tuple[str, ...] = ()) -> None:
    bad = [line for line in text.splitlines() if any(b in line for b in BAD_CONSOLE_LINES)]
    bad = [line for line in bad if not any(a in line for a in allow)]
    assert not bad, "console shows errors:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------- tests


def test_manifest_describes_the_files(image: Built) -> None:
    m = image.manifest
    assert m["arch"] == "amd64" and m["with_docker"] is True and m["suite"] == "bookworm"
    files = m["files"]
    assert isinstance(files, dict) and set(files) == {"vmlinuz", "initrd.img", "root.squashfs"}
    for name, meta in files.items():
        data = (image.dir / name).read_bytes()
        assert len(data) == meta["size"]
        assert hashlib.sha256(data).hexdigest() == meta["sha256"]
    kernel = m["kernel"]
    assert isinstance(kernel, dict)
    assert kernel["package"] == f"linux-image-{kernel['release']}"
    root = m["root"]
    assert isinstance(root, dict)
    assert root["python"] == "3.11" and root["pyc"] is True
    assert {"docker.io", "python3", "iptables", "containerd", "runc"} <= set(root["versions"])
    assert len(str(m["inputs_hash"])) == 64
    assert "total" in m["build_seconds"]  # type: ignore[operator]


def test_sizes(image: Built) -> None:
    root = (image.dir / "root.squashfs").stat().st_size
    assert root % 512 == 0, "VZ refuses disk images whose size is not a multiple of 512"
    # lz4 (docs/image.md): 176 MiB for amd64 where zstd -15 made 140, for a QEMU TCG boot of ~4 s instead of ~8.5
    assert root <= 192 * 2**20
    assert (image.dir / "initrd.img").stat().st_size <= 2 * 2**20
    print(
        f"sizes: root {root / 2**20:.1f} MiB, initrd {(image.dir / 'initrd.img').stat().st_size / 2**20:.2f} MiB, "
        f"vmlinuz {(image.dir / 'vmlinuz').stat().st_size / 2**20:.1f} MiB",
        file=sys.stderr,
    )


def test_root_contents(image: Built) -> None:
    release = image.manifest["kernel"]["release"]  # type: ignore[index]
    ls = squashfs_listing(image.dir / "root.squashfs")
    assert ls["/sbin"].endswith("-> usr/sbin")
    assert ls["/usr/sbin/init"].startswith("-rwxr-xr-x root/root")
    assert ls["/usr/lib/boxpark/python"].endswith("-> /.boxpark/python")
    layer = "/.boxpark/python"
    for path in (
        "boxpark/__init__.py",
        "boxpark/guest/init.py",
        "boxpark/guest/__pycache__/init.cpython-311.pyc",
        "msgspec/__init__.py",
    ):
        assert f"{layer}/{path}" in ls, path
    assert any(p.startswith(f"{layer}/msgspec/_core.cpython-311-x86_64-linux-gnu") for p in ls)
    assert all(line.split()[1] == "root/root" for p, line in ls.items() if p.startswith(layer))
    for tool in (
        "/usr/sbin/dockerd",
        "/usr/bin/containerd",
        "/usr/sbin/runc",
        "/usr/sbin/iptables",
        "/usr/bin/python3",
        "/usr/sbin/modprobe",
        "/usr/sbin/mkfs.xfs",
        "/usr/sbin/mkfs.ext4",
        "/usr/sbin/sfdisk",
    ):
        assert tool in ls, tool
    moddir = f"/usr/lib/modules/{release}"
    for mod in (
        "kernel/net/bridge/br_netfilter.ko",
        "kernel/net/netfilter/nf_tables.ko",
        "kernel/net/netfilter/nft_compat.ko",
        "kernel/net/netfilter/xt_MASQUERADE.ko",
        "kernel/net/ipv4/netfilter/iptable_nat.ko",
        "kernel/drivers/net/veth.ko",
        "kernel/fs/overlayfs/overlay.ko",
        "kernel/fs/xfs/xfs.ko",
        "modules.dep",
        "modules.alias",
    ):
        assert f"{moddir}/{mod}" in ls, mod
    assert not any(p.startswith("/usr/share/man/") for p in ls)
    assert not any(p.startswith("/var/lib/apt/lists/") for p in ls)
    assert not any(p.startswith("/usr/share/locale/") for p in ls)
    # only what the guest needs of the kernel's ~90 MB of modules
    modules = [p for p in ls if p.startswith(moddir) and p.endswith(".ko")]
    assert 50 < len(modules) < 600

    init = squashfs_cat(image.dir / "root.squashfs", "usr/sbin/init").decode()
    assert init.startswith("#!/usr/bin/python3 -SI\n")
    assert "boxpark.guest.init" in init
    deps = parse_modules_dep(
        squashfs_cat(image.dir / "root.squashfs", f"{moddir.lstrip('/')}/modules.dep").decode()
    )
    assert "kernel/net/bridge/bridge.ko" in deps["kernel/net/bridge/br_netfilter.ko"]


def test_initramfs_contents(image: Built) -> None:
    entries = read_newc(gzip.decompress((image.dir / "initrd.img").read_bytes()))
    assert "init" in entries and "bin/busybox" in entries
    order = entries["etc/boxpark/modules"][1].decode().split()
    assert order == image.manifest["initramfs"]["modules"]  # type: ignore[index]
    for name in order:
        assert f"lib/modules/{name}.ko" in entries
    for before, after in (
        ("virtio", "virtio_blk"),
        ("virtio_ring", "virtio_pci"),
        ("vsock", "vmw_vsock_virtio_transport"),
        ("fuse", "virtiofs"),
    ):
        assert order.index(before) < order.index(after)
    assert "squashfs" in order and "virtio_console" in order


def test_boots_to_the_python_init(image: Built, qemu, record_property) -> None:  # type: ignore[no-untyped-def]
    boot = qemu(image.dir)
    switched = boot.wait_for("boxpark-initramfs: switching to /sbin/init")
    started = boot.wait_for(INIT_STARTED)
    record_property("seconds_to_initramfs_switch", round(switched, 2))
    record_property("seconds_to_init_started", round(started, 2))
    print(
        f"QEMU start -> switch_root {switched:.2f} s, -> 'boxpark-init: started' {started:.2f} s",
        file=sys.stderr,
    )
    assert_clean_console(boot.text())


def test_missing_root_disk_fails_clearly_and_powers_off(image: Built, qemu) -> None:  # type: ignore[no-untyped-def]
    boot = qemu(image.dir, append=CMDLINE + " boxpark.rootwait=2", with_root=False)
    boot.wait_for("FATAL: no root device /dev/vda after 2 s")
    assert boot.wait_exit(60) == 0
    assert "powering off" in boot.text()
    assert "Kernel panic" not in boot.text()


def test_boxpark_init_key_picks_the_program(image: Built, qemu) -> None:  # type: ignore[no-untyped-def]
    boot = qemu(image.dir, append=CMDLINE + " boxpark.init=/no/such/init")
    boot.wait_for("FATAL: the root has no /no/such/init")
    assert boot.wait_exit(60) == 0


def test_code_change_rebuilds_only_the_layer_and_unchanged_does_nothing(image: Built, tmp_path: Path) -> None:
    # A frozen copy of the package: the shared work tree may change under a test that uses it directly.
    source = tmp_path / "src" / "boxpark"
    shutil.copytree(build.pylayer.package_dir(), source, ignore=shutil.ignore_patterns("__pycache__"))
    marker = f"# changed by test_image {time.time_ns()}\n"
    with open(source / "guest" / "init.py", "a") as f:
        f.write(marker)
    out = tmp_path / "image"
    lines: list[str] = []
    try:
        began = time.monotonic()
        build_image(out, arch="amd64", with_docker=True, progress=_progress(lines), source=source)
        took = time.monotonic() - began
        print(f"rebuild after a code change: {took:.1f} s", file=sys.stderr)
        assert any("base: cached" in line for line in lines), lines
        assert not any("debootstrap" in line for line in lines)
        init_py = squashfs_cat(out / "root.squashfs", ".boxpark/python/boxpark/guest/init.py").decode()
        assert init_py.endswith(marker)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["inputs_hash"] != image.manifest["inputs_hash"]
        for same in ("vmlinuz", "initrd.img"):
            assert manifest["files"][same]["sha256"] == image.manifest["files"][same]["sha256"]  # type: ignore[index]
        assert (out / "root.squashfs").stat().st_size % 512 == 0

        before = {name: (out / name).stat().st_mtime_ns for name in (*build.OUTPUTS, "manifest.json")}
        lines.clear()
        began = time.monotonic()
        build_image(out, arch="amd64", with_docker=True, progress=lines.append, source=source)
        print(f"unchanged build: {time.monotonic() - began:.2f} s", file=sys.stderr)
        assert any("up to date" in line for line in lines), lines
        assert before == {name: (out / name).stat().st_mtime_ns for name in before}
    finally:
        shutil.rmtree(out, ignore_errors=True)
