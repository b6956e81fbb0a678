"""The home share in the spec: a tag like any virtiofs mount, owned by the home's owner, handed to each backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boxpark.host import config as cfg
from boxpark.host.machinespec import spec_from_config
from boxpark.host.backends.sandbox import share_arguments
from boxpark.host.state import Machine


@pytest.fixture
def image(tmp_path: Path) -> Path:
    directory = tmp_path / "image"
    directory.mkdir()
    for name in ("root.squashfs", "vmlinuz", "initrd.img"):
        (directory / name).write_bytes(b"hsqs" + bytes(1020))
    (directory / "manifest.json").write_text('{"arch": "%s", "root": "root.squashfs", "kernel": "vmlinuz", '
                                             '"initrd": "initrd.img"}' % cfg.host_arch())
    return directory


def spec_for(tmp_path: Path, image: Path, toml: str, monkeypatch):
    monkeypatch.setenv("BOXPARK_HOME", str(tmp_path / "boxpark-home"))
    config = cfg.loads(f'image = "{image}"\n{toml}')
    return spec_from_config(config, Machine.named("t"))


def test_the_home_is_a_share_owned_by_its_owner(tmp_path, image, monkeypatch) -> None:
    home = tmp_path / "me"
    home.mkdir()
    other = tmp_path / "data"
    other.mkdir()
    if os.geteuid() == 0:
        os.chown(home, 1234, 4321)
    owner = (home.stat().st_uid, home.stat().st_gid)
    spec = spec_for(tmp_path, image, f'[home]\npath = "{home}"\n[[mounts]]\nsource = "{other}"\ntarget = "/data"',
                    monkeypatch)
    assert spec.shares == {"share0": str(other), "share1": str(home)}
    assert spec.share_targets == {"/data": "share0", str(home): "share1"}
    assert spec.share_owners == ({"share1": owner} if owner[0] else {})  # root's own home: no mapping


def test_no_home_share_when_turned_off(tmp_path, image, monkeypatch) -> None:
    spec = spec_for(tmp_path, image, f'[home]\npath = "{tmp_path}"\nshare = false', monkeypatch)
    assert spec.shares == {} and spec.share_owners == {}


def test_the_sandbox_hands_the_preinit_each_share_and_its_namespace_fd(tmp_path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    assert share_arguments({"share0": str(link), "share1": "/srv"}, {"share1": 7}) == [
        f"share0={tmp_path}", "share1:7=/srv"]
