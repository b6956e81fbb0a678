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
    "busybox", "cpio", "debugfs", "docker", "docker-compose", "dockerd", "dpkg-deb", "dumpe2fs", "file", "iptables", "losetup",
    "mkfs.ext4", "mkfs.xfs", "mkswap", "mksquashfs", "nsenter", "openssl", "partx", "qemu-system-aarch64",
    "qemu-system-x86_64", "setpriv", "sfdisk", "slirp4netns", "socat", "ssh-add", "ssh-agent", "ssh-keygen",
    "systemd-notify", "unshare",
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


STUB_PYTHON = """#!/bin/sh
# Stands in for python3: `-m venv DIR` makes DIR/bin/python (this script); `-m pip` floods stderr like pip
# with an old setuptools does, and fails the install of boxpark when STUB_PIP_FAILS is set.
case "$1 $2" in
  "--version ") echo "Python 3.99.0"; exit 0 ;;
  "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit $? ;;
  "-m pip")
    i=0
    while [ $i -lt 200 ]; do i=$((i + 1)); echo "SetuptoolsDeprecationWarning: project.license as a TOML table ($i)" >&2; done
    case "$*" in *" -e "*) if [ -n "$STUB_PIP_FAILS" ]; then echo "ERROR: No matching distribution found" >&2; exit 1; fi ;; esac
    exit 0 ;;
esac
exit 2
"""


def run_setup_with_a_stub_python(tmp_path: Path, fails: bool) -> subprocess.CompletedProcess[str]:
    """scripts/setup in a copy of the checkout, with `python3` and so pip being STUB_PYTHON.

    A stub, because what is tested is what setup shows of the installers' output, and the real pip's noise
    (and whether it fails) depends on its version and on the network.
    """
    missing = sorted(p for p in setup_packages() if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True).stdout != "install ok installed")
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout
    if missing or (os.geteuid() == 0 and "arm64" not in foreign.split()):
        pytest.skip(f"setup would install Debian packages here ({missing or 'the arm64 architecture'})")
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, checkout / "scripts" / "setup")
    shutil.copy(SETUP.parents[1] / "pyproject.toml", checkout / "pyproject.toml")
    stub = tmp_path / "python3"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHON": str(stub), "TMPDIR": str(tmp_path / "tmp")}
    if fails:
        env["STUB_PIP_FAILS"] = "1"
    return subprocess.run(["bash", str(checkout / "scripts" / "setup")], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg: setup checks its packages with it")
def test_setup_says_what_it_does_in_a_line_each_and_not_what_pip_says(tmp_path: Path) -> None:
    result = run_setup_with_a_stub_python(tmp_path, fails=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # `eval "$(scripts/up)"` reads stdout
    assert result.stderr.splitlines() == [
        "setup: creating the virtual environment .venv with Python 3.99.0",
        "setup: upgrading pip in .venv",
        "setup: installing boxpark and its test tools into .venv (pip install -e '.[test]')",
    ]
    assert (tmp_path / "checkout" / ".venv" / ".boxpark-installed").exists()
    assert list((tmp_path / "tmp").iterdir()) == []  # the log goes when all went well


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg: setup checks its packages with it")
def test_setup_shows_the_end_of_a_failed_steps_output_and_keeps_the_log(tmp_path: Path) -> None:
    result = run_setup_with_a_stub_python(tmp_path, fails=True)
    assert result.returncode == 1
    [log] = (tmp_path / "tmp").iterdir()
    lines = result.stderr.splitlines()
    assert lines[3] == ("setup: this failed: .venv/bin/python -m pip install -q -e .[test]; "
                        f"its last lines (all of them in {log}):")
    assert lines[-1] == "ERROR: No matching distribution found" and len(lines) == 4 + 40
    assert log.read_text().count("SetuptoolsDeprecationWarning") == 400  # both pip runs, in full
    assert not (tmp_path / "checkout" / ".venv" / ".boxpark-installed").exists()


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
