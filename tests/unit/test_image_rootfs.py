"""The host's apt working on the build tree: the configuration that keeps apt native and the host's own
apt configuration out (the build itself is exercised in tests/vm)."""

from __future__ import annotations

from pathlib import Path

import pytest

from boxpark.image import rootfs
from boxpark.image.subp import BuildError


def test_apt_config_points_everything_at_the_tree() -> None:
    text = rootfs.apt_config(Path("/cache/tmp/base/root"), "arm64", "/usr/lib/apt/methods/")
    lines = text.splitlines()
    assert 'Dir "/cache/tmp/base/root/";' in lines
    assert 'Dir::State::status "/cache/tmp/base/root/var/lib/dpkg/status";' in lines
    assert 'DPkg::Chroot-Directory "/cache/tmp/base/root";' in lines
    assert 'Dir::Bin::methods "/usr/lib/apt/methods/";' in lines  # the host's, native
    assert 'Dir::Bin::dpkg "/usr/bin/dpkg";' in lines  # the tree's, inside the chroot
    assert 'Dir::Etc::parts "/dev/null";' in lines  # no apt.conf.d: no debconf preconfiguration hook
    assert 'APT::Architecture "arm64";' in lines and 'APT::Architectures { "arm64"; };' in lines
    assert 'DPkg::Options { "--force-confold"; "--force-unsafe-io"; };' in lines
    assert text.endswith("\n")


def test_apt_config_refuses_a_path_it_cannot_quote() -> None:
    with pytest.raises(BuildError, match="quote or newline"):
        rootfs.apt_config(Path('/tmp/a"b/root'), "amd64", "/usr/lib/apt/methods/")


def test_host_apt_methods_is_a_directory() -> None:
    import shutil

    if shutil.which("apt-config") is None:
        pytest.skip("no apt on this host")
    assert Path(rootfs.host_apt_methods()).is_dir()
