"""The Debian base of the guest's root: debootstrap, packages, kernel modules, trimmed, as a squashfs.

This is the slow, rarely changing layer (a couple of minutes, needs root and the Debian mirror), so it is
built alone and cached by what goes into it (`BaseSpec.key`); boxpark's own code is appended to a copy of it
later (see `pylayer`). Packages come from the host's mirror (`sources`); the guest's apt gets the suite's
updates and security entries too, and the base is upgraded from them when built. Services never start
while packages install (a policy-rc.d says no), and the build tree is removed without crossing mounts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import foreign, modules, subp
from .kernel import Kernel
from .progress import Progress
from .sources import AptSource, guest_sources_list, pick_mirror
from .subp import BuildError

# Bump when the steps below change the base's bytes (package and module lists are hashed into the key already).
BASE_RECIPE_VERSION = 2

SUITE = "bookworm"
BASE_PACKAGES = (
    "python3", "kmod", "util-linux", "fdisk", "e2fsprogs", "xfsprogs", "ca-certificates",
)  # fmt: skip
DOCKER_PACKAGES = ("docker.io", "iptables")

# Where boxpark's Python lives in the guest. The appended layer can only add names at the squashfs
# root (mksquashfs renames clashing names on append), so the code sits in LAYER_DIR and the FHS path
# is a symlink to it.
PYTHON_DIR = "/usr/lib/boxpark/python"
LAYER_TOP = ".boxpark"
LAYER_DIR = f"/{LAYER_TOP}/python"

# The base's compression: lz4 in its high-compression mode, not zstd. Every boot reads the root cold (the
# sandbox mounts it from a fresh loop device, a VM from its disk), and that decompression is CPU paid before
# Ready: a sandbox boot used 191 ms of CPU to Ready with zstd -15 and 149 ms with lz4 -Xhc (medians of 6
# interleaved boots, bench/boot.py's CPU figure), for 185 MB instead of 140 MB (amd64). -Xhc costs build time
# only (67 s here, ~40 s for zstd -15; 200 s on a loaded host): lz4 decompresses as fast either way.
BASE_COMPRESSION = ("-comp", "lz4", "-Xhc")
BASE_COMPRESSION_NAME = "lz4 -Xhc"

INIT_SCRIPT = f"""#!/usr/bin/python3 -SI
# Boxpark guest init (PID 1). Written by boxpark.image; the code lives in {PYTHON_DIR}.
import sys

sys.path.insert(0, "{PYTHON_DIR}")
from boxpark.guest.init import main

main()
"""

POLICY_RC_D = "#!/bin/sh\n# boxpark image build: no service starts while packages install\nexit 101\n"

@dataclass(frozen=True)
class BaseSpec:
    """Everything that decides the base's contents; `key` names its cache entry."""

    arch: str
    with_docker: bool
    kernel_package: str
    kernel_version: str
    suite: str = SUITE

    @property
    def packages(self) -> tuple[str, ...]:
        return BASE_PACKAGES + (DOCKER_PACKAGES if self.with_docker else ())

    @property
    def module_globs(self) -> tuple[str, ...]:
        return modules.ROOT_MODULE_GLOBS + (modules.DOCKER_MODULE_GLOBS if self.with_docker else ())

    def inputs(self) -> dict[str, object]:
        return {
            "recipe": BASE_RECIPE_VERSION,
            "suite": self.suite,
            "arch": self.arch,
            "packages": sorted(self.packages),
            "kernel": [self.kernel_package, self.kernel_version],
            "module_globs": sorted(self.module_globs),
            "boot_modules": [name for name, _ in modules.BOOT_MODULES],
            "init": INIT_SCRIPT,
        }

    @property
    def key(self) -> str:
        return hash_json(self.inputs())[:16]

    @property
    def variant(self) -> str:
        return self.arch if self.with_docker else f"{self.arch}-nodocker"


def hash_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_dpkg_status(text: str) -> dict[str, str]:
    """/var/lib/dpkg/status -> {package: version} of the installed packages."""
    installed: dict[str, str] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and line[0] not in " \t":
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            installed[fields["Package"]] = fields.get("Version", "")
    return installed


def check_can_build_base(arch: str, host_arch: str, progress: Progress) -> None:
    """Root, the tools, and for a foreign arch qemu-user through binfmt_misc (set up here if it can be)."""
    if os.geteuid() != 0:
        raise BuildError(
            "building the Debian base of the image needs root (debootstrap, chroot)",
            hint="run the build as root, e.g. sudo boxpark image build",
        )
    subp.require_tools("debootstrap", "chroot", "mksquashfs", "depmod")
    foreign.ensure_can_run(arch, host_arch, progress)


def build_base(
    spec: BaseSpec,
    kernel: Kernel,
    sources: list[AptSource],
    cache: Path,
    work: Path,
    out: Path,
    progress: Progress,
) -> dict[str, object]:
    """Build the base squashfs at `out` (and `out`.json beside it); return what base.json records."""
    mirror = pick_mirror(sources, spec.suite)
    tree = work / "root"
    debs = cache / "debs" / spec.arch
    began = dict(progress.times)
    timed = progress.step

    with timed("debootstrap", f"{spec.suite} {spec.arch} minbase"):
        ds_cache = debs / "debootstrap"
        ds_cache.mkdir(parents=True, exist_ok=True)
        argv = ["debootstrap", "--variant=minbase", f"--arch={spec.arch}", f"--cache-dir={ds_cache}"]
        subp.run(
            [*argv, spec.suite, str(tree), mirror],
            timeout=3600,
            hint=f"is the Debian mirror {mirror} (from this host's apt sources) reachable?",
        )
    with timed("packages", " ".join(spec.packages)):
        _install_packages(spec, tree, sources, debs / "apt")
    installed = parse_dpkg_status((tree / "var/lib/dpkg/status").read_text(encoding="utf-8"))
    python = _python_version(tree)
    with timed("trim"):
        _trim(tree)
        _configure(tree)
    with timed("modules"):
        module_count = _install_modules(spec, kernel, tree)
    with timed("base squashfs", BASE_COMPRESSION_NAME):
        tmp = out.with_name(out.name + ".tmp")
        options = ["-noappend", "-no-progress", "-quiet", *BASE_COMPRESSION]
        subp.run(["mksquashfs", str(tree), str(tmp), *options], timeout=3600)
        os.replace(tmp, out)
    info: dict[str, object] = {
        "key": spec.key,
        "inputs": spec.inputs(),
        "mirror": mirror,
        "python": python,
        "kernel_release": kernel.release,
        "modules": module_count,
        "packages": installed,
        "size": out.stat().st_size,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": {k: v for k, v in progress.times.items() if k not in began},
    }
    tmp_json = out.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_json, out.with_suffix(".json"))
    return info


def _chroot_env() -> dict[str, str]:
    return {
        "DEBIAN_FRONTEND": "noninteractive",
        "DEBCONF_NONINTERACTIVE_SEEN": "true",
        "LC_ALL": "C",
        "LANG": "C",
        "LANGUAGE": "",
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }


def apt_config(tree: Path, arch: str, methods: str) -> str:
    """An apt configuration (for APT_CONFIG) that makes the host's apt work on `tree` as its root.

    apt itself — lists, resolver, downloads, hash checks — runs natively on the host; only dpkg and the
    maintainer scripts run in the chroot (through qemu-user for a foreign arch, where an emulated
    `apt-get update` alone took ~35 s and each later apt start ~75 s on 2 cores). Everything apt reads is
    the tree's: its sources, keyrings, apt.conf.d and dpkg status; the host's apt configuration is not read.
    `methods` is the host's Dir::Bin::methods (its own http method, not the tree's). The tree's
    apt.conf.d is not read either: its one hook, debconf's preconfiguration of every package before
    unpacking, asks nothing when non-interactive and took over a minute under qemu-user.
    """
    if any(c in str(tree) + methods for c in '"\n'):
        raise BuildError(f"cannot use {tree} as a build directory (a quote or newline in its path)")
    return "".join(
        line + "\n"
        for line in (
            f'Dir "{tree}/";',
            f'Dir::State::status "{tree}/var/lib/dpkg/status";',
            'Dir::Etc::parts "/dev/null";',  # no apt.conf.d (see above); the sources are the tree's
            f'Dir::Bin::methods "{methods}";',
            'Dir::Bin::dpkg "/usr/bin/dpkg";',  # run inside the chroot
            f'DPkg::Chroot-Directory "{tree}";',
            f'APT::Architecture "{arch}";',
            f'APT::Architectures {{ "{arch}"; }};',
            'APT::Sandbox::User "root";',
            'APT::Install-Recommends "false";',
            'Acquire::Languages "none";',
            # the tree becomes a squashfs: nothing needs dpkg's fsyncs
            'DPkg::Options { "--force-confold"; "--force-unsafe-io"; };',
        )
    )


def host_apt_methods() -> str:
    """The host apt's Dir::Bin::methods directory."""
    out = subp.output(["apt-config", "shell", "M", "Dir::Bin::methods/d"]).strip()
    path = out.partition("=")[2].strip("'\"")
    if not path or not os.path.isdir(path):
        raise BuildError("cannot find the host apt's methods directory (apt-config: Dir::Bin::methods)",
                         hint="is apt installed? apt-get install apt")
    return path


def _install_packages(spec: BaseSpec, tree: Path, sources: list[AptSource], apt_cache: Path) -> None:
    """The suite's updates and security fixes, then the packages (no recommends), by the host's apt
    working on the tree (see `apt_config`).

    The .debs are kept in the builder's cache between base builds by moving them in and out of the
    tree's apt archive directory (no bind mount to clean up).
    """
    listing = guest_sources_list(sources, spec.suite)
    if listing:
        (tree / "etc/apt/sources.list").write_text(listing, encoding="utf-8")
    policy = tree / "usr/sbin/policy-rc.d"
    policy.write_text(POLICY_RC_D, encoding="utf-8")
    policy.chmod(0o755)
    archives = tree / "var/cache/apt/archives"
    archives.mkdir(parents=True, exist_ok=True)
    apt_cache.mkdir(parents=True, exist_ok=True)
    for deb in apt_cache.glob("*.deb"):
        os.replace(deb, archives / deb.name)
    config = tree.parent / "apt.conf"
    config.write_text(apt_config(tree, spec.arch, host_apt_methods()), encoding="utf-8")
    env = {**_chroot_env(), "APT_CONFIG": str(config)}
    hint = "is the Debian mirror (from this host's apt sources) reachable?"
    apt = ["apt-get", "-q", "-y"]
    try:
        subp.run([*apt, "update"], env=env, timeout=1800, hint=hint)
        subp.run([*apt, "dist-upgrade"], env=env, timeout=1800, hint=hint)
        subp.run([*apt, "install", "--no-install-recommends", *spec.packages], env=env, timeout=3600, hint=hint)
    finally:
        # Keep exactly this build's packages for the next base build.
        for old in apt_cache.glob("*.deb"):
            old.unlink()
        for deb in archives.glob("*.deb"):
            os.replace(deb, apt_cache / deb.name)
        policy.unlink(missing_ok=True)
        config.unlink(missing_ok=True)


def _python_version(tree: Path) -> str:
    found = sorted(
        p.name[len("python") :]
        for p in (tree / "usr/lib").glob("python3.*")
        if re.fullmatch(r"python3\.\d+", p.name) and (p / "os.py").exists()
    )
    if not found:
        raise BuildError("the root has no python3 standard library")
    return found[-1]


TRIM_DIRS = (
    "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian", "usr/share/linda",
    "usr/share/bug", "usr/share/doc-base", "var/lib/apt/lists", "var/cache/apt", "var/cache/debconf",
    "var/log",
)  # fmt: skip


def _trim(tree: Path) -> None:
    """Drop what a VM never reads: manuals, translations, apt's lists and caches, logs; keep licences."""
    for rel in TRIM_DIRS:
        top = tree / rel
        if not top.is_dir() or top.is_symlink():
            continue
        for child in top.iterdir():
            if rel == "var/cache/debconf" and not child.name.endswith("-old"):
                continue
            if rel == "var/log" and child.is_dir() and not child.is_symlink():
                for sub in child.rglob("*"):  # keep the directories packages made, empty
                    if sub.is_file() or sub.is_symlink():
                        sub.unlink()
                continue
            subp.remove_tree(child)
    doc = tree / "usr/share/doc"
    if doc.is_dir():
        for pkg in doc.iterdir():
            if pkg.is_symlink() or not pkg.is_dir():
                continue
            for child in pkg.iterdir():
                if child.name != "copyright":
                    subp.remove_tree(child)
    for old in (tree / "var/lib/dpkg").glob("*-old"):
        old.unlink()


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def _configure(tree: Path) -> None:
    """The few files the guest needs from us: /sbin/init, the code's path, no host leftovers."""
    _write(tree / "usr/sbin/init", INIT_SCRIPT, 0o755)  # /sbin is a symlink to usr/sbin
    link = tree / PYTHON_DIR.lstrip("/")
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(LAYER_DIR)
    _write(tree / "etc/hostname", "boxpark\n")
    _write(tree / "etc/resolv.conf", "")  # debootstrap copied the host's; the guest writes its own
    _write(tree / "etc/fstab", "# the boxpark init mounts everything itself\n")


def _install_modules(spec: BaseSpec, kernel: Kernel, tree: Path) -> int:
    """Copy the modules the root needs (with their dependencies) and depmod them for the root."""
    index = modules.ModuleIndex.load(kernel.moddir)
    wanted: list[tuple[str, bool] | str] = [*modules.BOOT_MODULES, *index.glob(spec.module_globs)]
    paths = index.load_order(wanted)
    dest = tree / "lib/modules" / kernel.release  # /lib is a symlink to usr/lib
    if dest.exists():
        subp.remove_tree(dest)
    dest.mkdir(parents=True)
    for rel in paths:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(kernel.moddir / rel, dest / rel)
    chosen = {modules.module_name(p) for p in paths}
    order = kernel.moddir / "modules.order"
    if order.exists():
        text = order.read_text(encoding="utf-8")
        lines = [ln for ln in text.splitlines() if ln.strip() and modules.module_name(ln.strip()) in chosen]
        (dest / "modules.order").write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    for name in ("modules.builtin", "modules.builtin.modinfo"):
        if (kernel.moddir / name).exists():
            shutil.copy2(kernel.moddir / name, dest / name)
    subp.run(["depmod", "-b", tree, kernel.release], timeout=300)
    return len(paths)
