"""scripts/setup installs every host command the tests call (on a fresh Debian machine, not just this one)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup"

# The host commands tests run (argv[0] of their subprocesses, or what they look up with shutil.which).
TEST_COMMANDS = (
    "busybox", "cpio", "debugfs", "docker", "dockerd", "dpkg-deb", "dumpe2fs", "file", "iptables", "losetup",
    "mkfs.ext4", "mkfs.xfs", "mkswap", "mksquashfs", "nsenter", "openssl", "partx", "qemu-system-aarch64",
    "qemu-system-x86_64", "setpriv", "sfdisk", "slirp4netns", "socat", "systemd-notify", "unshare",
    "unsquashfs", "xfs_db", "xfs_info", "zstd",
)


def setup_packages() -> set[str]:
    body = re.search(r"^packages=\((.*?)^\)", SETUP.read_text(), re.DOTALL | re.MULTILINE)
    assert body, "scripts/setup has no packages=( … ) list"
    return {word for line in body[1].splitlines() for word in line.split("#", 1)[0].split()}


def packages_of(commands: tuple[str, ...]) -> dict[str, str]:
    """The Debian package that holds each installed command (its real file: iptables is an alternative)."""
    paths: dict[str, str] = {}
    for command in commands:  # every copy on PATH (a /usr/local one may shadow the package's)
        for directory in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]:
            if os.access(os.path.join(directory, command), os.X_OK):
                real = os.path.realpath(os.path.join(directory, command))
                paths[real] = command
                paths[real.removeprefix("/usr")] = command  # dpkg may know it by its path before /usr was merged
    listed = subprocess.run(["dpkg", "-S", *paths], capture_output=True, text=True)  # 1 if some path is unknown
    owners: dict[str, str] = {}
    for line in listed.stdout.splitlines():
        packages, _, path = line.partition(": ")
        if path in paths:
            owners.setdefault(paths[path], packages.split(",")[0].split(":")[0])
    return owners


def essential(package: str) -> bool:
    """Debian's Essential packages are on every system: setup need not name them (dpkg itself, for one)."""
    found = subprocess.run(["dpkg-query", "-W", "-f=${Essential}", package], capture_output=True, text=True)
    return found.stdout.strip() == "yes"


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg (a Debian host) to map commands to packages")
def test_setup_installs_the_package_of_every_command_the_tests_call() -> None:
    packages = setup_packages()
    owners = packages_of(TEST_COMMANDS)
    unknown = [c for c in TEST_COMMANDS if c not in owners]
    missing = {c: p for c, p in owners.items() if p not in packages and not essential(p)}
    assert not missing, f"scripts/setup does not install these commands' packages: {missing}"
    assert not unknown, f"no installed package provides {unknown}: install it and add its package to scripts/setup"


def test_the_package_license_is_an_spdx_expression_for_a_setuptools_that_reads_one() -> None:
    """A license table makes every install print setuptools' deprecation notice (setuptools >= 77 reads a string)."""
    import tomllib

    from packaging.requirements import Requirement

    licenses = pytest.importorskip("packaging.licenses", reason="needs packaging >= 24.2 (SPDX expressions)")
    pyproject = tomllib.loads((SETUP.parents[1] / "pyproject.toml").read_text())
    license_ = pyproject["project"]["license"]
    assert isinstance(license_, str), f"project.license is {license_!r}: write it as an SPDX string"
    assert licenses.canonicalize_license_expression(license_) == license_
    setuptools = [Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools and not any(setuptools[0].specifier.contains(v) for v in ("64", "76.1")), setuptools
