"""Debian packages the image takes whole from the host's apt: the cloud kernel and busybox-static.

Resolves the current package behind a name through the host's apt lists (`apt-cache show`), downloads
the .deb with `apt-get download` into the cache and unpacks it with `dpkg-deb -x`. Nothing is ever
installed on the host. The kernel's unpacked tree gets its own `depmod` so that `modules.dep` exists.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import subp
from .subp import BuildError

KERNEL_META = {"amd64": "linux-image-cloud-amd64", "arm64": "linux-image-cloud-arm64"}
APT_HINT = "is this host's Debian mirror reachable? try 'apt-get update'"

# What a backend can boot: arm64 wants the raw `Image` (VZ takes nothing else; its header carries this
# magic at 0x38), x86 a bzImage (its setup header's "HdrS" at 0x202).
ARM64_MAGIC_OFFSET, ARM64_MAGIC = 0x38, b"ARM\x64"
BZIMAGE_MAGIC_OFFSET, BZIMAGE_MAGIC = 0x202, b"HdrS"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZBOOT_MAGIC = b"zimg"  # EFI zboot: a PE stub ("MZ") wrapping a compressed Image


@dataclass(frozen=True)
class DebPackage:
    """One binary package version for one architecture."""

    name: str
    version: str
    arch: str

    @property
    def filename(self) -> str:
        # apt-get download's own naming: the epoch colon is written %3a
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"

    @property
    def key(self) -> str:
        """A file-name-safe identity, for cache entries."""
        return self.filename[: -len(".deb")]


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel package: the image to boot and its modules directory."""

    package: DebPackage
    release: str
    vmlinuz: Path
    moddir: Path


def parse_control_stanzas(text: str) -> list[dict[str, str]]:
    """`apt-cache show` output / control files as a list of {Field: value}, one per stanza."""
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, key = {}, None
            continue
        if line[0] in " \t" and key:
            fields[key] += "\n" + line.strip()
            continue
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip()
            fields[key] = value.strip()
    if fields:
        stanzas.append(fields)
    return stanzas


def parse_control(text: str) -> dict[str, str]:
    """The first stanza only."""
    stanzas = parse_control_stanzas(text)
    return stanzas[0] if stanzas else {}


def kernel_dependency(depends: str) -> tuple[str, str | None]:
    """From the meta package's Depends: the image package (`linux-image-6.1.0-NN-cloud-amd64`) and the
    exact version it pins with `(= V)`, if any."""
    for clause in depends.split(","):
        first = clause.split("|")[0].strip()
        name = re.split(r"[\s(:]", first, maxsplit=1)[0]
        if name.startswith("linux-image-") and any(ch.isdigit() for ch in name):
            pinned = re.search(r"\(\s*=\s*([^)\s]+)\s*\)", first)
            return name, pinned.group(1) if pinned else None
    raise BuildError(f"cannot find the kernel image package in: Depends: {depends}")


def host_arch() -> str:
    return subp.output(["dpkg", "--print-architecture"]).strip()


def check_apt_arch(arch: str) -> None:
    """Packages of a foreign architecture need that architecture added to dpkg and its lists fetched."""
    if arch == host_arch():
        return
    foreign = subp.output(["dpkg", "--print-foreign-architectures"]).split()
    if arch not in foreign:
        raise BuildError(
            f"this host's apt does not know {arch} packages",
            hint=f"dpkg --add-architecture {arch} && apt-get update",
        )


def resolve(name: str, arch: str) -> DebPackage:
    """The candidate version of `name` for `arch` in the host's apt lists."""
    try:
        text = subp.output(["apt-cache", "show", "--no-all-versions", f"{name}:{arch}"], timeout=120)
    except subp.CommandError as exc:
        raise BuildError(
            f"apt knows no package {name} for {arch}",
            hint="run 'apt-get update' (and for a foreign arch: dpkg --add-architecture " + arch + ")",
        ) from exc
    fields = parse_control(text)
    if "Version" not in fields:
        raise BuildError(f"apt knows no installable version of {name} for {arch}", hint="apt-get update")
    return DebPackage(fields.get("Package", name), fields["Version"], fields.get("Architecture", arch))


def resolve_kernel_and_busybox(arch: str) -> tuple[DebPackage, DebPackage]:
    """The cloud kernel image package that the meta package points at now, and busybox-static.

    One apt-cache run (it costs ~1 s where apt keeps no binary cache): the meta package pins its image
    package's version with `(= V)`, so the image package needs no second look-up.
    """
    meta = KERNEL_META.get(arch)
    if meta is None:
        raise BuildError(f"unsupported architecture {arch!r}", hint="use amd64 or arm64")
    try:
        text = subp.output(
            ["apt-cache", "show", "--no-all-versions", f"{meta}:{arch}", f"busybox-static:{arch}"],
            timeout=120,
        )
    except subp.CommandError as exc:
        raise BuildError(
            f"apt knows no {meta} or busybox-static for {arch}",
            hint="run 'apt-get update'"
            + (f" (after dpkg --add-architecture {arch})" if arch != "amd64" else ""),
        ) from exc
    by_name = {s.get("Package"): s for s in parse_control_stanzas(text)}
    meta_fields = by_name.get(meta, {})
    bb = by_name.get("busybox-static", {})
    if "Version" not in meta_fields or "Version" not in bb:
        raise BuildError(f"apt has no installable {meta} or busybox-static for {arch}", hint="apt-get update")
    image, pinned = kernel_dependency(meta_fields.get("Depends", ""))
    kernel = DebPackage(image, pinned, arch) if pinned else resolve(image, arch)
    return kernel, DebPackage("busybox-static", bb["Version"], bb.get("Architecture", arch))


def apt_state() -> str:
    """A fingerprint of what apt's answers depend on (lists, sources, preferences, dpkg's arches)."""
    digest = hashlib.sha256()
    for top in (Path("/var/lib/apt/lists"), Path("/etc/apt"), Path("/var/lib/dpkg/arch")):
        paths = sorted(top.rglob("*")) if top.is_dir() else [top]
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue
            if path.is_file():
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def resolve_cached(arch: str, cache: Path) -> tuple[DebPackage, DebPackage]:
    """resolve_kernel_and_busybox, remembered in the cache for as long as apt's state is unchanged."""
    state = apt_state()
    memo = cache / "resolved.json"
    try:
        saved = json.loads(memo.read_text(encoding="utf-8"))
        if saved.get("apt_state") == state and arch in saved:
            k, b = saved[arch]
            return DebPackage(*k), DebPackage(*b)
    except (OSError, ValueError, TypeError, KeyError):
        saved = {}
    if not isinstance(saved, dict) or saved.get("apt_state") != state:
        saved = {"apt_state": state}
    kernel, busybox = resolve_kernel_and_busybox(arch)
    saved[arch] = [[kernel.name, kernel.version, kernel.arch], [busybox.name, busybox.version, busybox.arch]]
    tmp = memo.with_name(memo.name + ".tmp")
    tmp.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, memo)
    return kernel, busybox


def download(pkg: DebPackage, debs: Path) -> Path:
    """The package's .deb in `debs/`, fetched with `apt-get download` unless it is already there."""
    target = debs / pkg.filename
    if target.exists():
        return target
    debs.mkdir(parents=True, exist_ok=True)
    tmp = debs / f".download-{os.getpid()}"
    subp.remove_tree(tmp)
    tmp.mkdir()
    try:
        subp.run(
            [
                "apt-get",
                "download",
                "-q",
                "-o",
                "APT::Sandbox::User=root",
                f"{pkg.name}:{pkg.arch}={pkg.version}",
            ],
            cwd=tmp,
            timeout=900,
            hint=APT_HINT,
        )
        got = sorted(tmp.glob("*.deb"))
        if len(got) != 1:
            raise BuildError(f"apt-get download {pkg.name} left {len(got)} files, expected one .deb")
        os.replace(got[0], target)
    finally:
        subp.remove_tree(tmp)
    return target


def extract(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's files into `dest` (once: an existing `dest` is reused)."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    subp.remove_tree(tmp)
    tmp.mkdir(parents=True)
    try:
        subp.run(["dpkg-deb", "-x", deb, tmp], timeout=600)
        os.replace(tmp, dest)
    finally:
        subp.remove_tree(tmp)
    return dest


def fetch_kernel(pkg: DebPackage, cache: Path) -> Kernel:
    """Download and unpack the kernel package, and depmod its modules (in the cache, never the host)."""
    deb = download(pkg, cache / "debs" / pkg.arch)
    tree = cache / "kernels" / pkg.key
    fresh = not tree.is_dir()
    extract(deb, tree)
    moddirs = [p for base in ("lib/modules", "usr/lib/modules") for p in sorted((tree / base).glob("*"))]
    if len(moddirs) != 1:
        raise BuildError(f"{deb.name}: expected one /lib/modules/<release> directory, found {len(moddirs)}")
    moddir = moddirs[0]
    release = moddir.name
    vmlinuz = next(
        (
            p
            for p in (tree / "boot" / f"vmlinuz-{release}", tree / "usr/lib/boot" / f"vmlinuz-{release}")
            if p.exists()
        ),
        None,
    )
    if vmlinuz is None:
        raise BuildError(f"{deb.name} has no vmlinuz-{release}")
    if fresh or not (moddir / "modules.dep").exists():
        basedir = moddir.parent.parent.parent  # <tree> or <tree>/usr
        subp.run(["depmod", "-b", basedir, release], timeout=300)
    return Kernel(pkg, release, bootable_image(vmlinuz, pkg.arch, tree / "boot-image"), moddir)


def image_format(head: bytes) -> str:
    """What a kernel file is, from its first bytes: arm64-image, bzimage, zboot, gzip, zstd or unknown."""
    if head[ARM64_MAGIC_OFFSET : ARM64_MAGIC_OFFSET + 4] == ARM64_MAGIC:
        return "arm64-image"
    if head[BZIMAGE_MAGIC_OFFSET : BZIMAGE_MAGIC_OFFSET + 4] == BZIMAGE_MAGIC:
        return "bzimage"
    if head[:2] == b"MZ" and head[4:8] == ZBOOT_MAGIC:
        return "zboot"
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC:
        return "zstd"
    return "unknown"


def decompress_kernel(data: bytes) -> bytes:
    """The payload of a gzip, zstd or EFI zboot kernel (one layer; the caller checks what comes out)."""
    kind = image_format(data[:0x240])
    if kind == "zboot":
        # The zboot header: "MZ", 2 bytes, "zimg", payload offset and size (u32 LE), 8 bytes, the
        # compression's name (NUL-padded) at 0x18.
        offset, size = struct.unpack_from("<II", data, 8)
        method = data[0x18:0x20].rstrip(b"\0").decode("ascii", "replace")
        payload = data[offset : offset + size]
        if method == "gzip":
            return _gunzip(payload)
        if method == "zstd":
            return _unzstd(payload)
        raise BuildError(f"the kernel is an EFI zboot image compressed with {method!r}, which boxpark cannot unpack")
    if kind == "gzip":
        return _gunzip(data)
    if kind == "zstd":
        return _unzstd(data)
    raise BuildError(f"the kernel is neither a boot image nor gzip/zstd-compressed ({kind})")


def _gunzip(data: bytes) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        # A kernel's gzip stream may be followed by padding that gzip.decompress takes for a bad member.
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _unzstd(data: bytes) -> bytes:
    return subp.run(["zstd", "-d", "-c", "-q"], input=data, timeout=120).stdout


def bootable_image(vmlinuz: Path, arch: str, dest: Path) -> Path:
    """The kernel as a backend boots it: `vmlinuz` itself when it already is one, else its unpacked
    payload, written once to `dest`. For arm64 that is the raw `Image` (VZ boots nothing else)."""
    want = "arm64-image" if arch == "arm64" else "bzimage"
    with open(vmlinuz, "rb") as f:
        head = f.read(0x240)
    kind = image_format(head)
    if kind == want:
        return vmlinuz
    if kind in ("arm64-image", "bzimage"):
        raise BuildError(f"{vmlinuz.name} is a {kind} kernel, not one for {arch}")
    if dest.exists() and image_format(dest.read_bytes()[:0x240]) == want:
        return dest
    raw = decompress_kernel(vmlinuz.read_bytes())
    if image_format(raw[:0x240]) != want:
        raise BuildError(
            f"{vmlinuz.name} unpacks ({kind}) to something that is not an {arch} boot image "
            f"(no {ARM64_MAGIC if arch == 'arm64' else BZIMAGE_MAGIC!r} magic)",
        )
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, dest)
    return dest


def fetch_busybox(pkg: DebPackage, cache: Path) -> Path:
    """The static busybox binary from the busybox-static package."""
    deb = download(pkg, cache / "debs" / pkg.arch)
    tree = extract(deb, cache / "busybox" / pkg.key)
    for rel in ("bin/busybox", "usr/bin/busybox"):
        if (tree / rel).is_file():
            return tree / rel
    raise BuildError(f"{deb.name} has no busybox binary")
