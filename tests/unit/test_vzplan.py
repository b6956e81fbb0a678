"""The vz backend's plan: a full spec lists every VZ device with its settings; each bad value fails naming it."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest

from boxpark.host.backends import vzplan
from boxpark.host.backends.vzplan import PlanError, VzLimits, kernel_problem, make_plan
from boxpark.host.spec import Disk, MachineSpec, SpecError

GiB = 1 << 30
LIMITS = VzLimits(min_memory=128 << 20, max_memory=16 * GiB, min_cpus=1, max_cpus=8, rosetta="installed")


def arm64_image(size: int = 4096) -> bytes:
    """The header of an arm64 `Image`: code0/code1, text_offset, image_size, flags, res, "ARM\\x64" at 56."""
    head = struct.pack("<IIQQQQQQ", 0x91005A4D, 0x14000000, 0, size, 0xA, 0, 0, 0) + b"ARM\x64" + b"\0" * 4
    return head + b"\0" * (size - len(head))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    d = tmp_path / "image"
    d.mkdir()
    (d / "vmlinuz").write_bytes(arm64_image())
    (d / "initrd.img").write_bytes(gzip.compress(b"initramfs"))
    (d / "root.squashfs").write_bytes(b"\0" * 8192)
    return d


def spec_for(image: Path, tmp_path: Path, **fields: object) -> MachineSpec:
    values: dict[str, object] = dict(root=str(image / "root.squashfs"), kernel=str(image / "vmlinuz"),
                                     initrd=str(image / "initrd.img"), state_dir=str(tmp_path / "s"),
                                     arch="arm64", name="mac1")
    values.update(fields)
    return MachineSpec(**values)  # type: ignore[arg-type]


def test_full_spec_lists_every_device(image: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.img"
    data.write_bytes(b"\0" * (1 << 20))
    shared = tmp_path / "src"
    shared.mkdir()
    spec = spec_for(image, tmp_path, cpus=4, memory=3072, disks=(Disk(str(data), name="data"),),
                    shares={"share0": str(shared)}, share_targets={"/src": "share0"}, console=True)
    plan = make_plan(spec, LIMITS)
    devices = plan.devices()
    kinds = [kind for kind, _ in devices]
    assert kinds == ["VZVirtualMachineConfiguration", "VZLinuxBootLoader",
                     "VZVirtioBlockDeviceConfiguration", "VZVirtioBlockDeviceConfiguration",
                     "VZVirtioFileSystemDeviceConfiguration", "VZLinuxRosettaDirectoryShare",
                     "VZVirtioSocketDeviceConfiguration",
                     "VZVirtioConsolePortConfiguration", "VZVirtioConsolePortConfiguration",
                     "VZVirtioNetworkDeviceConfiguration", "VZVirtioEntropyDeviceConfiguration",
                     "VZVirtioTraditionalMemoryBalloonDeviceConfiguration"]
    settings = dict(devices[:2])
    assert settings["VZVirtualMachineConfiguration"] == {"cpus": 4, "memory": 3072 << 20}
    boot = settings["VZLinuxBootLoader"]
    assert boot["kernel"] == str(image / "vmlinuz") and boot["initrd"] == str(image / "initrd.img")
    line = str(boot["command_line"]).split()
    assert line[:3] == ["root=/dev/vda", "rootfstype=squashfs", "console=hvc0"]
    assert "boxpark.api=vsock:4294967295:1024" in line and "boxpark.events=vsock:2:1025" in line
    assert "boxpark.net=dhcp" in line and "boxpark.hostname=mac1" in line
    assert not any(w.startswith("boxpark.secret") for w in line)  # vsock is the VM's own: no secret
    root, disk = devices[2][1], devices[3][1]
    assert root == {"path": str(image / "root.squashfs"), "read_only": True, "identifier": "root", "size": 8192}
    assert disk == {"path": str(data), "read_only": False, "identifier": "data", "size": 1 << 20}
    assert devices[4][1] == {"tag": "share0", "path": str(shared), "read_only": False}
    assert devices[5][1] == {"tag": "rosetta"}
    assert devices[6][1] == {"api_port": 1024, "listen_ports": (1025,)}
    state = tmp_path / "s"
    assert devices[7][1] == {"name": "console", "path": str(state / "console.log"), "is_console": True}
    assert devices[8][1] == {"name": "boxpark.log", "path": str(state / "init.log"), "is_console": False}
    mac = str(devices[9][1]["mac"])
    assert devices[9][1]["attachment"] == "nat"
    assert int(mac[:2], 16) & 0x03 == 0x02  # locally administered, unicast
    assert make_plan(spec, LIMITS).network == plan.network  # stable: the DHCP lease is kept


def test_defaults_and_choices(image: Path, tmp_path: Path) -> None:
    plan = make_plan(spec_for(image, tmp_path), LIMITS)
    assert (plan.cpus, plan.memory) == (2, 2048 << 20)
    assert "console=ttynull" in plan.boot.command_line
    assert make_plan(spec_for(image, tmp_path), LIMITS, rosetta="off").rosetta is None
    absent = VzLimits(**{**LIMITS.__dict__, "rosetta": "not-installed"})
    auto = make_plan(spec_for(image, tmp_path), absent)
    assert auto.rosetta is None and "not installed" in auto.notes[0]
    assert make_plan(spec_for(image, tmp_path, net="none"), LIMITS).network is None
    custom = make_plan(spec_for(image, tmp_path, command_line="root=/dev/vda quiet"), LIMITS)
    assert custom.boot.command_line == "root=/dev/vda quiet"


@pytest.mark.parametrize("kind, data, words", [
    ("gzip", gzip.compress(arm64_image()), "gzip-compressed"),
    ("zstd", b"\x28\xb5\x2f\xfd" + b"\0" * 100, "zstd-compressed"),
    ("xz", b"\xfd7zXZ\x00" + b"\0" * 100, "xz-compressed"),
    ("zimage", b"MZ\0\0zimg" + b"\0" * 16 + b"zstd\0\0\0\0" + b"\0" * 100, "EFI zImage (zstd inside)"),
    ("bzimage", b"\0" * 0x202 + b"HdrS" + b"\0" * 100, "x86 bzImage"),
    ("junk", b"\x7fELF" + b"\0" * 100, "not a raw arm64 Image"),
])
def test_kernel_that_is_not_a_raw_image(image: Path, tmp_path: Path, kind: str, data: bytes, words: str) -> None:
    kernel = tmp_path / f"vmlinuz-{kind}"
    kernel.write_bytes(data)
    assert words in (kernel_problem(str(kernel)) or "")
    with pytest.raises(SpecError) as caught:
        make_plan(spec_for(image, tmp_path, kernel=str(kernel)), LIMITS)
    assert caught.value.field == "kernel" and str(kernel) in str(caught.value) and words in str(caught.value)


def test_raw_image_passes(image: Path, tmp_path: Path) -> None:
    assert kernel_problem(str(image / "vmlinuz")) is None
    short = tmp_path / "short"
    short.write_bytes(b"MZ")
    assert "too short" in (kernel_problem(str(short)) or "")


def test_disk_size_not_a_multiple_of_512(image: Path, tmp_path: Path) -> None:
    data = tmp_path / "odd.img"
    data.write_bytes(b"\0" * 1000)
    with pytest.raises(SpecError) as caught:
        make_plan(spec_for(image, tmp_path, disks=(Disk(str(data)),)), LIMITS)
    assert caught.value.field == "disks[0].path"
    text = str(caught.value)
    assert str(data) in text and "1000 bytes" in text and "truncate -s 1024" in text
    (image / "root.squashfs").write_bytes(b"\0" * 4097)
    with pytest.raises(SpecError) as root:
        make_plan(spec_for(image, tmp_path), LIMITS)
    assert root.value.field == "root" and "4097 bytes" in str(root.value)


def test_qcow2_disk_refused(image: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.qcow2"
    data.write_bytes(b"\0" * 512)
    with pytest.raises(SpecError, match=r"disks\[0\]\.format: VZ attaches raw disk images only, not qcow2"):
        make_plan(spec_for(image, tmp_path, disks=(Disk(str(data), format="qcow2"),)), LIMITS)


@pytest.mark.parametrize("memory, words", [
    (200, "200 MiB is below the guest's minimum of 256 MiB"),
    (32768, "32768 MiB is above VZ's maximum on this Mac of 16384 MiB"),
])
def test_memory_out_of_range(image: Path, tmp_path: Path, memory: int, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        make_plan(spec_for(image, tmp_path, memory=memory), LIMITS)
    assert caught.value.field == "memory" and words in str(caught.value)


def test_memory_below_vz_minimum(image: Path, tmp_path: Path) -> None:
    limits = VzLimits(**{**LIMITS.__dict__, "min_memory": 512 << 20})
    with pytest.raises(SpecError, match="memory: 300 MiB is below VZ's minimum of 512 MiB"):
        make_plan(spec_for(image, tmp_path, memory=300), limits)


@pytest.mark.parametrize("cpus", [9, 16])
def test_cpus_out_of_range(image: Path, tmp_path: Path, cpus: int) -> None:
    with pytest.raises(SpecError, match=f"cpus: {cpus} is outside what VZ allows on this Mac \\(1-8\\)"):
        make_plan(spec_for(image, tmp_path, cpus=cpus), LIMITS)


def test_arch_must_be_arm64(image: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="arch: must be arm64 on Apple silicon.*not 'amd64'"):
        make_plan(spec_for(image, tmp_path, arch="amd64"), LIMITS)
    intel = VzLimits(**{**LIMITS.__dict__, "host_arch": "amd64"})
    with pytest.raises(SpecError, match=r"arch: .*this Mac \(or this Python, if it runs under Rosetta\) is amd64: "
                                        r"use backend = \"qemu\""):
        make_plan(spec_for(image, tmp_path), intel)


def test_rosetta_asked_but_missing(image: Path, tmp_path: Path) -> None:
    for availability, words in (("not-installed", "softwareupdate --install-rosetta"),
                                ("unsupported", "macOS 13 or later")):
        limits = VzLimits(**{**LIMITS.__dict__, "rosetta": availability})
        with pytest.raises(SpecError) as caught:
            make_plan(spec_for(image, tmp_path), limits, rosetta="on")
        assert caught.value.field == "rosetta" and words in str(caught.value)
    shared = tmp_path / "x"
    shared.mkdir()
    with pytest.raises(SpecError, match=r"shares\['rosetta'\]: the tag 'rosetta' is Rosetta's"):
        make_plan(spec_for(image, tmp_path, shares={"rosetta": str(shared)}), LIMITS)


def test_what_vz_cannot_give(image: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="rtc_base: VZ gives the guest no RTC"):
        make_plan(spec_for(image, tmp_path, rtc_base="2020-01-01"), LIMITS)
    with pytest.raises(SpecError, match="events: the guest dials the vz host over vsock"):
        make_plan(spec_for(image, tmp_path, events="tcp:127.0.0.1:5000"), LIMITS)
    for api in ("tcp:127.0.0.1:5000", f"unix:{tmp_path}/a.sock"):  # no forward: the agent dials over vsock
        with pytest.raises(SpecError, match="api: the agent dials the guest's API over vsock"):
            make_plan(spec_for(image, tmp_path, api=api), LIMITS)


def test_rosetta_setup_argv() -> None:
    argv = vzplan.rosetta_setup_argv()
    assert argv[:3] == ["python3", "-SI", "-c"] and argv[-1] == "/run/rosetta/rosetta"
    assert "binfmt.register(sys.argv[1])" in argv[3] and "/usr/lib/boxpark/python" in argv[3]
