"""Boxpark's own layer of the root: the part of the `boxpark` package the guest runs, and msgspec, compiled.

Only what the guest runs goes in (`GUEST_MODULES`: the contract, the transport, the relay and `guest/`), and
only that is hashed into the image's inputs: an edit to host code (the CLI, the agent, this builder)
rebuilds nothing. The guest never imports anything else of the package; a unit test imports every shipped
module from a staged copy to prove it.

This is the layer that changes with every edit, so it is kept out of the Debian base and *appended* to a
copy of the base squashfs (`mksquashfs LAYER IMAGE` without -noappend): only the new files get
compressed, and a code change rebuilds in seconds instead of recompressing ~400 MB. An append can only
add names at the squashfs root, hence the layer lives in /.boxpark/python and the base carries the
symlink /usr/lib/boxpark/python -> /.boxpark/python (see rootfs). The modules are compiled to
unchecked-hash .pyc files for the guest's Python (same minor version as ours, or none are made): a
read-only root never has them rewritten, and they need no source stat on import.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import py_compile
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import subp
from .rootfs import LAYER_DIR, PYTHON_DIR
from .subp import BuildError

# Bump when the staging below changes the layer's bytes.
LAYER_RECIPE_VERSION = 2

GUEST_MODULES = ("__init__", "protocol", "transport", "relay", "guest")
"""The top-level modules of `boxpark` the guest runs; each ships as `NAME.py` or as the package `NAME/`."""

WHEEL_MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}
SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".swp", "~")


def package_dir() -> Path:
    """The `boxpark` package being run: the source that goes into the guest."""
    import boxpark

    return Path(boxpark.__file__).resolve().parent


def _shipped(path: Path) -> bool:
    """Whether a top-level entry of the package is one of the `GUEST_MODULES`."""
    if path.is_dir():
        return path.name in GUEST_MODULES
    return path.suffix == ".py" and path.stem in GUEST_MODULES


def source_files(root: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every file the guest gets from the package, sorted; no caches or leftovers."""
    found: list[Path] = []
    for top in root.iterdir():
        if not _shipped(top):
            continue
        if top.is_file():
            found.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
            found += [Path(dirpath) / name for name in filenames
                      if not (name.endswith(SKIP_SUFFIXES) or name.startswith("."))]
    return sorted((path.relative_to(root.parent).as_posix(), path) for path in found)


def source_hash(root: Path) -> str:
    """sha256 over the shipped files' names, exec bits and contents (`source_files`: nothing else)."""
    digest = hashlib.sha256()
    for rel, path in source_files(root):
        data = path.read_bytes()
        digest.update(f"{rel}\0{len(data)}\0{os.access(path, os.X_OK)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def msgspec_version() -> str:
    """The msgspec version the guest gets: the one boxpark runs with here."""
    try:
        return importlib.metadata.version("msgspec")
    except importlib.metadata.PackageNotFoundError:
        raise BuildError("msgspec is not installed for this Python", hint="pip install msgspec") from None


def fetch_msgspec_wheel(version: str, python: str, arch: str, wheels: Path) -> Path:
    """A msgspec wheel for the guest's CPython and arch, from the cache or else from PyPI via pip."""
    tag = "cp" + python.replace(".", "")
    machine = WHEEL_MACHINE[arch]
    pattern = f"msgspec-{version}-{tag}-{tag}-*{machine}.whl"
    cached = sorted(wheels.glob(pattern))
    if cached:
        return cached[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = wheels / f".download-{os.getpid()}"
    subp.remove_tree(tmp)
    tmp.mkdir()
    platforms = ["--platform", f"manylinux_2_17_{machine}", "--platform", f"manylinux2014_{machine}"]
    argv = [
        sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
        "--only-binary=:all:", "--no-deps", "--python-version", python, "--implementation", "cp",
        "--abi", tag, *platforms, "-d", str(tmp), f"msgspec=={version}",
    ]  # fmt: skip
    try:
        subp.run(argv, timeout=600, hint=f"PyPI must be reachable (or put {pattern} in {wheels})")
        got = sorted(tmp.glob("*.whl"))
        if len(got) != 1:
            raise BuildError(f"pip downloaded {len(got)} msgspec wheels, expected one")
        os.replace(got[0], wheels / got[0].name)
        return wheels / got[0].name
    except subp.CommandError as exc:
        if "No module named pip" in exc.stderr:
            raise BuildError(
                f"{sys.executable} has no pip (needed once, to fetch the guest's msgspec wheel)",
                hint="apt-get install python3-pip, or run the build with a Python that has pip",
            ) from None
        raise
    finally:
        subp.remove_tree(tmp)


@dataclass(frozen=True)
class LayerInfo:
    files: int
    bytes: int
    compiled: bool


def stage(layer_root: Path, source: Path, wheel: Path, python: str) -> LayerInfo:
    """Lay out the layer under `layer_root` (whose one top entry becomes /.boxpark in the guest)."""
    target = layer_root / LAYER_DIR.lstrip("/")
    if layer_root.exists():
        subp.remove_tree(layer_root)
    target.mkdir(parents=True)
    for rel, path in source_files(source):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        dest.chmod(0o755 if os.access(path, os.X_OK) else 0o644)
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.infolist():
            name = member.filename
            if member.is_dir() or name.startswith("/") or ".." in name.split("/"):
                continue
            dest = target / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(zf.read(member))
            dest.chmod(0o755 if (member.external_attr >> 16) & 0o111 else 0o644)
    compiled = f"{sys.version_info[0]}.{sys.version_info[1]}" == python
    if compiled:
        _compile(target)
    for dirpath, _, _ in os.walk(layer_root):
        os.chmod(dirpath, 0o755)
    files = [p for p in layer_root.rglob("*") if p.is_file()]
    return LayerInfo(len(files), sum(p.stat().st_size for p in files), compiled)


def _compile(target: Path) -> None:
    for path in sorted(target.rglob("*.py")):
        rel = path.relative_to(target).as_posix()
        cfile = importlib.util.cache_from_source(str(path))
        try:
            py_compile.compile(
                str(path),
                cfile=cfile,
                dfile=f"{PYTHON_DIR}/{rel}",
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        except py_compile.PyCompileError as exc:
            raise BuildError(f"{rel} does not compile: {exc.msg.strip()}") from None
        os.chmod(cfile, 0o644)


def append(base: Path, layer_root: Path, out: Path) -> None:
    """Write `out` = the base squashfs with the layer appended (compressed like the base)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.copyfile(base, tmp)
    try:
        subp.run(
            ["mksquashfs", layer_root, tmp, "-all-root", "-no-recovery", "-no-progress", "-quiet"],
            timeout=600,
        )
        size = tmp.stat().st_size
        if size % 512:
            raise BuildError(f"root.squashfs is {size} bytes, not a multiple of 512 (VZ refuses it)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
