"""The machine spec: validation names the field, the command line is built (or replaced) as documented."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from boxpark.host.spec import (Disk, MissingImageError, MachineSpec, SpecError, image_manifest, kernel_arch,
                               spec_from_image)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    names = {"root": "root.squashfs", "kernel": "vmlinuz", "initrd": "initrd.img", "disk": "data.img"}
    paths = {}
    for key, name in names.items():
        path = tmp_path / name
        path.write_bytes(b"hsqs" + bytes(1020))
        paths[key] = str(path)
    (tmp_path / "share").mkdir()
    paths["share"] = str(tmp_path / "share")
    paths["state"] = str(tmp_path / "state")
    return paths


def make(files: dict[str, str], **fields: object) -> MachineSpec:
    values: dict[str, object] = {"root": files["root"], "state_dir": files["state"], "kernel": files["kernel"],
                                 "initrd": files["initrd"]}
    values.update(fields)
    return MachineSpec(**values)  # type: ignore[arg-type]


def field_of(spec: MachineSpec) -> str:
    with pytest.raises(SpecError) as info:
        spec.validate()
    assert str(info.value).startswith(info.value.field + ": ")
    return info.value.field


def test_a_complete_spec_is_valid(files: dict[str, str]) -> None:
    spec = make(files, cpus=2, memory=1024, disks=(Disk(files["disk"]),), shares={"src": files["share"]},
                share_targets={"/src": "src"}, rtc_base="2030-01-02T03:04:05", settings={"log": "debug"})
    assert spec.validate() is spec


@pytest.mark.parametrize("fields, field", [
    ({"arch": "riscv64"}, "arch"),
    ({"cpus": 0}, "cpus"),
    ({"cpus": 65}, "cpus"),
    ({"cpus": True}, "cpus"),
    ({"memory": 64}, "memory"),
    ({"root": "/nonexistent/root.squashfs"}, "root"),
    ({"kernel": "/nonexistent/vmlinuz"}, "kernel"),
    ({"initrd": "/nonexistent/initrd"}, "initrd"),
    ({"state_dir": "relative/state"}, "state_dir"),
    ({"state_dir": "/" + "x" * 120}, "state_dir"),
    ({"command_line": ""}, "command_line"),
    ({"command_line": "root=/dev/vda\nmore"}, "command_line"),
    ({"disks": (Disk("/nonexistent/disk.img"),)}, "disks[0].path"),
    ({"shares": {"bad tag": "/"}}, "shares['bad tag']"),
    ({"shares": {"src": "/nonexistent/dir"}}, "shares['src']"),
    ({"share_targets": {"/src": "nosuchtag"}}, "share_targets['/src']"),
    ({"share_owners": {"nosuchtag": (1000, 1000)}}, "share_owners['nosuchtag']"),
    ({"api": "carrier-pigeon:1"}, "api"),
    ({"events": "tcp:nohost"}, "events"),
    ({"settings": {"boxpark.log": "debug"}}, "settings['boxpark.log']"),
    ({"settings": {"log": "two words"}}, "settings['log']"),
    ({"net": "static 10.0.0.1"}, "net"),
    ({"rtc_base": "yesterday"}, "rtc_base"),
    ({"rtc_clock": "sundial"}, "rtc_clock"),
    ({"name": "Not A Name"}, "name"),
])
def test_a_wrong_field_is_named(files: dict[str, str], fields: dict[str, object], field: str) -> None:
    assert field_of(make(files, **fields)) == field


def test_disk_checks_name_format_and_writability(files: dict[str, str]) -> None:
    assert field_of(make(files, disks=(Disk(files["disk"], format="vmdk"),))) == "disks[0].format"  # type: ignore[arg-type]
    assert field_of(make(files, disks=(Disk(files["disk"], name="a b"),))) == "disks[0].name"
    same = (Disk(files["disk"], name="x"), Disk(files["disk"], name="x", read_only=True))
    assert field_of(make(files, disks=same)) == "disks[1].name"
    if os.geteuid() != 0:  # root may write anything
        os.chmod(files["disk"], 0o444)
        assert field_of(make(files, disks=(Disk(files["disk"]),))) == "disks[0].path"
        assert make(files, disks=(Disk(files["disk"], read_only=True),)).validate()


def test_the_default_command_line_carries_the_backend_settings(files: dict[str, str]) -> None:
    spec = make(files)
    line = spec.kernel_command_line({"api": "tcp:0.0.0.0:1024", "net": "none"}, extra="panic=-1")
    assert line == ("root=/dev/vda rootfstype=squashfs console=ttynull panic=-1 "
                    "boxpark.api=tcp:0.0.0.0:1024 boxpark.net=none")


def test_console_on_means_hvc0(files: dict[str, str]) -> None:
    words = make(files, console=True).kernel_command_line({}).split()
    assert "console=hvc0" in words and "console=ttynull" not in words


def test_spec_settings_override_the_backend_ones(files: dict[str, str]) -> None:
    spec = make(files, settings={"net": "dhcp", "log": "debug"})
    words = spec.kernel_command_line({"net": "none", "api": "unix:/a"}).split()
    assert "boxpark.net=dhcp" in words and "boxpark.net=none" not in words
    assert "boxpark.log=debug" in words and "boxpark.api=unix:/a" in words


def test_an_override_replaces_the_whole_line(files: dict[str, str]) -> None:
    spec = make(files, command_line="root=/dev/vdz quiet", settings={"log": "debug"})
    assert spec.kernel_command_line({"api": "tcp:0.0.0.0:1024"}, extra="panic=-1") == "root=/dev/vdz quiet"


def test_kernel_arch_reads_the_header(tmp_path: Path) -> None:
    bz = bytearray(0x400)
    bz[0x202:0x206] = b"HdrS"
    image = bytearray(0x400)
    image[0x38:0x3C] = b"ARM\x64"
    (tmp_path / "bz").write_bytes(bz)
    (tmp_path / "image").write_bytes(image)
    (tmp_path / "junk").write_bytes(b"\x7fELF" + bytes(100))
    assert kernel_arch(str(tmp_path / "bz")) == "amd64"
    assert kernel_arch(str(tmp_path / "image")) == "arm64"
    assert kernel_arch(str(tmp_path / "junk")) is None
    assert kernel_arch(str(tmp_path / "missing")) is None


def test_spec_from_image_takes_the_files_and_the_arch(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.mkdir()
    for name in ("vmlinuz", "initrd.img", "root.squashfs"):
        (image / name).write_bytes(b"x")
    (image / "manifest.json").write_text(json.dumps({"arch": "arm64"}))
    spec = spec_from_image(image, tmp_path / "state", memory=512)
    assert (spec.root, spec.kernel, spec.initrd) == (str(image / "root.squashfs"), str(image / "vmlinuz"),
                                                     str(image / "initrd.img"))
    assert spec.arch == "arm64" and spec.memory == 512 and spec.state_dir == str(tmp_path / "state")


def test_a_missing_image_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(MissingImageError, match="run: boxpark image build"):
        image_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(MissingImageError, match="no vmlinuz.*run: boxpark image build"):
        image_manifest(tmp_path)


def test_a_share_owner_is_a_user_other_than_root(files: dict[str, str]) -> None:
    for owner in ((0, 0), (1000,), (-1, 5), (1000, "1000")):
        spec = make(files, shares={"src": files["share"]}, share_owners={"src": owner})
        assert field_of(spec) == "share_owners['src']", owner
    assert make(files, shares={"src": files["share"]}, share_owners={"src": (1000, 0)}).validate()
