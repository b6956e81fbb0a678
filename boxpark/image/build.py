"""`boxpark image build`: the guest image — vmlinuz, initrd.img, root.squashfs, manifest.json.

Puts the pieces together in the order of their cost: resolve every input first (apt lists, the part of our
source the guest runs, msgspec's version — no network; host code is no input), and if the inputs' hash
equals the one in the output's manifest, stop: nothing to do. Otherwise fetch the kernel, reuse or build the cached Debian base (rootfs), write the
initramfs, append boxpark's layer (pylayer) to a copy of the base, and replace the outputs together,
manifest last. One build at a time per cache (a lock file). Errors reach the user as a sentence with a
hint, never a traceback (unless --debug).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..dirs import cache_home
from . import initramfs, kernel, modules, pylayer, rootfs, subp
from .progress import Console, Progress
from .sources import read_host_sources
from .subp import BuildError

# Bump when the assembly below changes the outputs' bytes (the base and layer have their own versions).
BUILDER_VERSION = 1
MANIFEST_FORMAT = 1
ARCHES = ("amd64", "arm64")
OUTPUTS = ("vmlinuz", "initrd.img", "root.squashfs")
DEFAULT_CMDLINE = "root=/dev/vda rootfstype=squashfs console=hvc0"
KEY_PACKAGES = (
    "python3", "python3.11", "docker.io", "containerd", "runc", "iptables", "libc6", "kmod",
    "util-linux", "e2fsprogs", "xfsprogs", "fdisk", "ca-certificates",
)  # fmt: skip


def cache_dir() -> Path:
    """$BOXPARK_CACHE, else $XDG_CACHE_HOME/boxpark, else ~/.cache/boxpark."""
    return cache_home()


def default_image_dir(arch: str, with_docker: bool) -> Path:
    """Where `boxpark image build` puts an image by default: <cache>/images/<arch>[-nodocker]."""
    return cache_dir() / "images" / (arch if with_docker else f"{arch}-nodocker")


def default_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(out_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_current(out_dir: Path, inputs_hash: str) -> bool:
    """The output's manifest names these inputs and every file it lists is there, at its size."""
    return rebuild_reason(out_dir, inputs_hash) is None


def rebuild_reason(out_dir: Path, inputs_hash: str, inputs: dict[str, object] | None = None) -> str | None:
    """Why the image in `out_dir` must be built for these inputs, in words; None if it is up to date.

    With `inputs` (the values `inputs_hash` is made of), a change names the inputs that differ from those
    the manifest records: the user learns whether a kernel update or a code change costs this build.
    """
    manifest = read_manifest(out_dir)
    if manifest is None:
        if any((out_dir / name).exists() for name in OUTPUTS):
            return f"the image in {out_dir} has no manifest (an interrupted build?)"
        return f"first run: no image in {out_dir} yet"
    if manifest.get("inputs_hash") != inputs_hash:
        old = manifest.get("inputs")
        if inputs is None or not isinstance(old, dict):
            return "its inputs changed"
        changes = _changed_inputs(old, inputs)
        return f"inputs changed: {', '.join(changes)}" if changes else "its inputs changed"
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(OUTPUTS):
        return f"the manifest in {out_dir} does not list the image's files"
    for name, meta in files.items():
        try:
            if (out_dir / name).stat().st_size != meta["size"]:
                return f"{out_dir / name} is not the size its manifest records"
        except (OSError, KeyError, TypeError):
            return f"{out_dir / name} is missing"
    return None


def _package(key: object) -> str:
    """`DebPackage.key` (name_version_arch, the epoch's colon as %3a) as a person writes it: name version."""
    name, _, rest = str(key).partition("_")
    version = rest.rpartition("_")[0] or rest
    return f"{name} {version.replace('%3a', ':')}"


def _changed_inputs(old: dict[str, object], new: dict[str, object]) -> list[str]:
    """The inputs that differ between two manifests' `inputs`, each in words (`_resolve_inputs` names them)."""
    changes: list[str] = []
    differs = {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}
    if "builder" in differs:
        changes.append(f"the image recipe (builder version {old.get('builder')} → {new.get('builder')})")
    if "kernel" in differs:
        old_kernel = _package(old["kernel"]) if "kernel" in old else "none"
        changes.append(f"the kernel ({old_kernel} → {_package(new.get('kernel'))})")
    if "base" in differs:  # the base's key covers its packages, its recipe and the kernel
        changes.append("the Debian base (for the new kernel)" if "kernel" in differs
                       else "the Debian base (its package list or recipe)")
    if "busybox" in differs:
        old_busybox = _package(old["busybox"]) if "busybox" in old else "none"
        changes.append(f"busybox ({old_busybox} → {_package(new.get('busybox'))})")
    if "initramfs_init" in differs:
        changes.append("the initramfs script")
    if "boot_modules" in differs:
        changes.append("the boot modules")
    if "layer" in differs:
        old_layer, new_layer = old.get("layer"), new.get("layer")
        if isinstance(old_layer, list) and isinstance(new_layer, list) and len(old_layer) == len(new_layer) == 3:
            if old_layer[0] != new_layer[0]:
                changes.append(f"boxpark's layer recipe (version {old_layer[0]} → {new_layer[0]})")
            if old_layer[1] != new_layer[1]:
                changes.append("boxpark's guest code")
            if old_layer[2] != new_layer[2]:
                changes.append(f"msgspec ({old_layer[2]} → {new_layer[2]})")
        else:
            changes.append("boxpark's layer")
    known = {"builder", "kernel", "base", "busybox", "initramfs_init", "boot_modules", "layer"}
    changes += [f"{key}" for key in sorted(differs - known)]
    return changes


@contextlib.contextmanager
def _locked(cache: Path, progress: Progress) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.announce(f"waiting for another build using {cache} ...")  # even in `up`: no silent wait
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_image(
    out_dir: str | os.PathLike[str],
    *,
    arch: str = "amd64",
    with_docker: bool = True,
    progress: Callable[[str], None] | None = None,
    cache: str | os.PathLike[str] | None = None,
    force: bool = False,
    refresh_base: bool = False,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Build (or find up to date) the guest image in `out_dir`; return `out_dir`.

    `progress` gets one human-readable line per step (None: silent); a `progress.Console` also shows the
    running step live on a terminal, and holds its lines back until there is something to build. `cache` defaults to cache_dir().
    `force` rebuilds even when the inputs are unchanged; `refresh_base` also rebuilds the cached Debian
    base, picking up Debian's updates. `source` is the `boxpark` package directory to install (default:
    the one running this code); only its guest part goes in (`pylayer.GUEST_MODULES`).
    """
    if arch not in ARCHES:
        raise BuildError(f"unsupported architecture {arch!r}", hint=f"use one of: {', '.join(ARCHES)}")
    out = Path(out_dir).expanduser().absolute()
    cache_root = Path(cache).expanduser().absolute() if cache is not None else cache_dir().absolute()
    p = Progress(progress)
    subp.require_tools("dpkg", "apt-cache", "apt-get", "dpkg-deb", "depmod", "mksquashfs")
    with _locked(cache_root, p):
        with p.step("inputs", f"{arch}, {'with' if with_docker else 'no'} docker"):
            i = _resolve_inputs(arch, with_docker, cache_root, source)
        if refresh_base:
            reason: str | None = "forced, with a fresh Debian base (--refresh-base)"
        elif force:
            reason = "forced (--force)"
        else:
            reason = rebuild_reason(out, i.hash, i.values)
        if reason is None:
            p.say(f"up to date: {out} (inputs {i.hash[:12]})")
            return out
        p.building(reason)
        tmp_root = cache_root / "tmp"
        subp.remove_tree(tmp_root)  # left by an interrupted build (we hold the lock)
        tmp_root.mkdir(parents=True)
        try:
            return _build(out, cache_root, tmp_root, p, i, refresh_base)
        finally:
            subp.remove_tree(tmp_root)


@dataclass(frozen=True)
class _Inputs:
    """Everything the image is made from, resolved without building anything."""

    host_arch: str
    spec: rootfs.BaseSpec
    kpkg: kernel.DebPackage
    bbpkg: kernel.DebPackage
    source: Path
    source_hash: str
    msgspec_version: str
    values: dict[str, object]
    hash: str


def _resolve_inputs(
    arch: str, with_docker: bool, cache: Path, source: str | os.PathLike[str] | None
) -> _Inputs:
    host_arch = kernel.host_arch()
    kernel.check_apt_arch(arch)
    kpkg, bbpkg = kernel.resolve_cached(arch, cache)
    src = Path(source).absolute() if source is not None else pylayer.package_dir()
    if src.name != "boxpark" or not (src / "__init__.py").is_file():
        raise BuildError(f"{src} is not a boxpark package directory")
    source_hash = pylayer.source_hash(src)
    msgspec_version = pylayer.msgspec_version()
    spec = rootfs.BaseSpec(arch, with_docker, kpkg.name, kpkg.version)
    values: dict[str, object] = {
        "builder": BUILDER_VERSION,
        "base": spec.key,
        "kernel": kpkg.key,
        "busybox": bbpkg.key,
        "initramfs_init": hashlib.sha256(initramfs.init_script()).hexdigest(),
        "boot_modules": [name if required else name + "?" for name, required in modules.BOOT_MODULES],
        "layer": [pylayer.LAYER_RECIPE_VERSION, source_hash, msgspec_version],
    }
    return _Inputs(
        host_arch, spec, kpkg, bbpkg, src, source_hash, msgspec_version, values, rootfs.hash_json(values)
    )


def _build(out: Path, cache: Path, tmp: Path, p: Progress, i: _Inputs, refresh_base: bool) -> Path:
    spec, kpkg, bbpkg = i.spec, i.kpkg, i.bbpkg
    base_dir = cache / "bases" / f"{spec.variant}-{spec.key}"
    base_sq = base_dir / "base.squashfs"
    base_json = base_sq.with_suffix(".json")
    build_base = refresh_base or not (base_sq.exists() and base_json.exists())
    if build_base:
        rootfs.check_can_build_base(spec.arch, i.host_arch, p)  # before any download: fail fast

    with p.step("kernel", f"{kpkg.name} {kpkg.version}"):
        kern = kernel.fetch_kernel(kpkg, cache)

    if build_base:
        base_dir.mkdir(parents=True, exist_ok=True)
        p.say(f"building the Debian base {base_dir.name} (once per package set and kernel)")
        base_work = tmp / "base"
        base_work.mkdir()
        try:
            base = rootfs.build_base(spec, kern, read_host_sources(), cache, base_work, base_sq, p)
        finally:
            subp.remove_tree(base_work)
        _prune_bases(cache / "bases", spec.variant, keep=base_dir)
    else:
        base = json.loads(base_json.read_text(encoding="utf-8"))
        p.say(f"base: cached {base_dir.name} ({base_sq.stat().st_size / 2**20:.0f} MiB)")

    out.mkdir(parents=True, exist_ok=True)
    new = {name: out / f"{name}.new" for name in OUTPUTS}

    with p.step("initramfs", f"busybox {bbpkg.version} + boot modules"):
        initrd_modules = _initramfs(cache, spec.arch, kern, bbpkg, i.values, new["initrd.img"])

    python = str(base["python"])
    with p.step(
        "boxpark layer", f"boxpark {i.source_hash[:12]}, msgspec {i.msgspec_version}, python {python}"
    ):
        wheel = pylayer.fetch_msgspec_wheel(i.msgspec_version, python, spec.arch, cache / "wheels")
        layer = pylayer.stage(tmp / "layer", i.source, wheel, python)
        pylayer.append(base_sq, tmp / "layer", new["root.squashfs"])

    with p.step("finish"):
        tmp_kernel = new["vmlinuz"]
        tmp_kernel.write_bytes(kern.vmlinuz.read_bytes())
        files: dict[str, dict[str, Any]] = {
            name: {"size": path.stat().st_size, "sha256": sha256_file(path)} for name, path in new.items()
        }
        (out / "manifest.json").unlink(missing_ok=True)  # no manifest vouches for a half-replaced set
        for name, path in new.items():
            os.replace(path, out / name)
    packages = base.get("packages", {})
    assert isinstance(packages, dict)
    manifest = {
        "format": MANIFEST_FORMAT,
        "builder_version": BUILDER_VERSION,
        "inputs_hash": i.hash,
        "inputs": i.values,
        "arch": spec.arch,
        "with_docker": spec.with_docker,
        "suite": spec.suite,
        "cmdline": DEFAULT_CMDLINE,
        "files": files,
        "kernel": {"package": kpkg.name, "version": kpkg.version, "release": kern.release},
        "initramfs": {"busybox": bbpkg.version, "modules": initrd_modules, "compression": "gzip"},
        "root": {
            "base": base_dir.name,
            "base_built": base.get("built"),
            "base_seconds": base.get("seconds"),
            "compression": rootfs.BASE_COMPRESSION_NAME,
            "init": "/sbin/init",
            "python": python,
            "python_dir": rootfs.PYTHON_DIR,
            "boxpark_source_sha256": i.source_hash,
            "boxpark_files": layer.files,
            "pyc": layer.compiled,
            "msgspec": i.msgspec_version,
            "modules": base.get("modules"),
            "versions": {name: packages[name] for name in KEY_PACKAGES if name in packages},
            "packages": packages,
        },
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": {**p.times, "total": round(p.elapsed(), 2)},
    }
    tmp_manifest = out / "manifest.json.new"
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, out / "manifest.json")
    sizes = ", ".join(f"{name} {files[name]['size'] / 2**20:.1f} MiB" for name in OUTPUTS)
    p.say(f"built {out}: {sizes}")
    return out


def _initramfs(
    cache: Path,
    arch: str,
    kern: kernel.Kernel,
    bbpkg: kernel.DebPackage,
    inputs: dict[str, object],
    out: Path,
) -> list[str]:
    """Write the initramfs to `out` from the cache, building it there first if its inputs are new.

    Returns the module names it loads, in order.
    """
    key = rootfs.hash_json(
        [
            BUILDER_VERSION,
            inputs["kernel"],
            inputs["busybox"],
            inputs["initramfs_init"],
            inputs["boot_modules"],
        ]
    )[:16]
    store = cache / "initramfs"
    cached, meta = store / f"{arch}-{key}.img", store / f"{arch}-{key}.json"
    if not (cached.exists() and meta.exists()):
        store.mkdir(parents=True, exist_ok=True)
        busybox = kernel.fetch_busybox(bbpkg, cache)
        boot_paths = modules.ModuleIndex.load(kern.moddir).load_order(modules.BOOT_MODULES)
        info = initramfs.build(cached, busybox=busybox, moddir=kern.moddir, module_paths=boot_paths)
        meta.write_text(json.dumps({"modules": info.modules}) + "\n", encoding="utf-8")
        for old in store.glob(f"{arch}-*"):
            if not old.name.startswith(f"{arch}-{key}."):
                old.unlink()
    shutil.copyfile(cached, out)
    names = json.loads(meta.read_text(encoding="utf-8"))["modules"]
    return [str(n) for n in names]


def _prune_bases(bases: Path, variant: str, keep: Path) -> None:
    """Drop older bases of the same arch/variant: each is ~130 MB and only the newest is used."""
    for old in bases.glob(f"{variant}-*"):
        if old != keep and old.name[len(variant) + 1 :].isalnum():
            subp.remove_tree(old)


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `boxpark image build`."""
    parser.add_argument(
        "--arch", choices=ARCHES, default=default_arch(), help="guest architecture (default: this host's)"
    )
    docker = parser.add_mutually_exclusive_group()
    docker.add_argument(
        "--with-docker",
        dest="with_docker",
        action="store_true",
        default=True,
        help="include docker.io, iptables and their kernel modules (default)",
    )
    docker.add_argument("--no-docker", dest="with_docker", action="store_false", help="leave Docker out")
    parser.add_argument(
        "--out",
        "-o",
        metavar="DIR",
        type=Path,
        help="output directory (default: $BOXPARK_CACHE, else $XDG_CACHE_HOME/boxpark or ~/.cache/boxpark, then images/<arch>[-nodocker])",
    )
    parser.add_argument(
        "--cache-dir", metavar="DIR", type=Path, help="cache (default: $BOXPARK_CACHE, else $XDG_CACHE_HOME/boxpark or ~/.cache/boxpark)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the inputs are unchanged")
    parser.add_argument(
        "--refresh-base",
        action="store_true",
        help="rebuild the cached Debian base too, picking up Debian's updates",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that a SIGTERM'd build stops its commands and removes its work tree


def run(args: argparse.Namespace) -> int:
    """Run `boxpark image build`; print the image directory on stdout. Returns the exit code."""
    signal.signal(signal.SIGTERM, _terminate)
    arch = getattr(args, "arch", None) or default_arch()
    with_docker = getattr(args, "with_docker", True)
    cache = getattr(args, "cache_dir", None)
    out = getattr(args, "out", None)
    if out is None:
        out = (
            (Path(cache) / "images" / (arch if with_docker else f"{arch}-nodocker"))
            if cache
            else default_image_dir(arch, with_docker)
        )
    console = None if getattr(args, "quiet", False) else Console(sys.stderr)
    try:
        try:
            result = build_image(
                out,
                arch=arch,
                with_docker=with_docker,
                progress=console,
                cache=cache,
                force=getattr(args, "force", False),
                refresh_base=getattr(args, "refresh_base", False),
            )
        finally:
            if console is not None:
                console.close()  # the live line goes before any message below
    except BuildError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"boxpark image build: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the output directory is not writable, or the disk is full
        if getattr(args, "debug", False):
            raise
        print(f"boxpark image build: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("boxpark image build: interrupted", file=sys.stderr)
        return 130
    print(result)
    return 0
