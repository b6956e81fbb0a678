"""Image bundles: one file that carries a built image to a host that cannot build it (a Mac: no debootstrap).

A bundle is a plain ustar archive whose members come in this order:

    bundle.json     the format version, arch, docker or not, and each member's size and sha256, plus
                    the sha256 of its own other fields (so a damaged bundle.json is told apart from a
                    damaged file)
    manifest.json   the image's own manifest (what `boxpark image build` wrote)
    vmlinuz, initrd.img, root.squashfs

Not compressed: ~90 % of the bytes are root.squashfs, zstd already, and initrd.img is gzip; only arm64's raw
`Image` kernel (27 MB, ~10 MB compressed) would shrink, while compressing costs seconds at both ends and the
stdlib a Mac imports with has no zstd before Python 3.14. (Import reads gzip/bz2/xz-compressed bundles too,
for whoever publishes them compressed.)

Import reads the bundle once, as a stream (a URL is never stored first), into a temporary directory beside
the target, hashing as it writes; it installs nothing unless the format version is known and every member
is present, alone, regular, and of its declared size and sha256; then it renames the directory into place.
Export holds each file open from hashing to writing, so a concurrent build cannot mix two images.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tarfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from . import subp
from .build import ARCHES, OUTPUTS, _locked, cache_dir, default_arch, default_image_dir, read_manifest
from .progress import Progress, to_stderr
from .subp import BuildError

BUNDLE_FORMAT = 1
KIND = "boxpark-image-bundle"
BUNDLE_JSON = "bundle.json"
MEMBERS = ("manifest.json", *OUTPUTS)  # after bundle.json, in this order
MAX_JSON = 1 << 20
CHUNK = 1 << 20
DOWNLOAD_TIMEOUT = 60.0  # seconds without a byte


@dataclass(frozen=True)
class BundleInfo:
    """What export wrote or import installed."""

    path: Path  # the bundle (export) or the image directory (import)
    arch: str
    with_docker: bool
    size: int  # bytes of the bundle
    seconds: float


def default_bundle_name(manifest: dict[str, Any]) -> str:
    arch = str(manifest.get("arch", "unknown"))
    variant = arch if manifest.get("with_docker", True) else f"{arch}-nodocker"
    return f"boxpark-image-{variant}-{str(manifest.get('inputs_hash', ''))[:12] or 'unknown'}.tar"


def _self_hash(fields: dict[str, Any]) -> str:
    body = {k: v for k, v in fields.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ export


def export_bundle(image_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                  progress: Callable[[str], None] | None = None) -> BundleInfo:
    """Write the image in `image_dir` as a bundle to `out` (via `out`.tmp, renamed when complete).

    Every file is checked against the image's manifest first: a damaged image is refused, not exported.
    """
    p = Progress(progress)
    src = Path(image_dir)
    manifest = read_manifest(src)
    if manifest is None:
        raise BuildError(f"no image in {src} (no readable manifest.json)",
                         hint="build one first: boxpark image build [--arch ARCH]")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(OUTPUTS):
        raise BuildError(f"the manifest in {src} does not list {', '.join(OUTPUTS)}",
                         hint="rebuild the image: boxpark image build --force")
    target = Path(out)
    with contextlib.ExitStack() as stack:
        handles: dict[str, BinaryIO] = {}
        for name in MEMBERS:
            try:
                handles[name] = stack.enter_context(open(src / name, "rb"))
            except OSError as exc:
                raise BuildError(f"cannot read {src / name}: {exc.strerror}",
                                 hint="rebuild the image: boxpark image build --force") from None
        sums: dict[str, dict[str, Any]] = {}
        with p.step("hash", f"{src}"):
            for name, f in handles.items():
                size, digest = _hash_stream(f)
                f.seek(0)
                sums[name] = {"size": size, "sha256": digest}
                if name in OUTPUTS and files[name].get("sha256") != digest:
                    raise BuildError(f"the image in {src} is damaged: {name} does not match its manifest",
                                     hint="rebuild it: boxpark image build --force")
        head: dict[str, Any] = {
            "kind": KIND,
            "format": BUNDLE_FORMAT,
            "arch": manifest.get("arch"),
            "with_docker": manifest.get("with_docker", True),
            "inputs_hash": manifest.get("inputs_hash"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": sums,
        }
        head["sha256"] = _self_hash(head)
        head_bytes = (json.dumps(head, indent=2, sort_keys=True) + "\n").encode()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        mtime = int(time.time())
        try:
            with p.step("write", str(target)), tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                tar.addfile(_tarinfo(BUNDLE_JSON, len(head_bytes), mtime), io.BytesIO(head_bytes))
                for name, f in handles.items():
                    tar.addfile(_tarinfo(name, sums[name]["size"], mtime), f)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    size = target.stat().st_size
    p.say(f"exported {target} ({size / 2**20:.1f} MiB)")
    return BundleInfo(target, str(head["arch"]), bool(head["with_docker"]), size, round(p.elapsed(), 2))


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uname = info.gname = "root"
    return info


def _hash_stream(f: IO[bytes]) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    while chunk := f.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


# ------------------------------------------------------------------------------------------ import


class _Counting(io.RawIOBase):
    """A readable stream that counts what passes and reports progress (every 10 %, or every 32 MiB)."""

    def __init__(self, raw: IO[bytes], total: int | None, say: Callable[[str], None], what: str) -> None:
        self._raw = raw
        self.total = total
        self.done = 0
        self._say = say
        self._what = what
        self._next = 0
        self._began = time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        import http.client

        try:
            data = self._raw.read(len(buffer))
        except (OSError, http.client.HTTPException) as exc:  # a reset or stalled download, a bad disk
            raise BuildError(f"reading {self._what.removeprefix('reading ')} failed: {exc or type(exc).__name__}",
                             hint="check the network (or the file) and try again") from None
        n = len(data)
        buffer[:n] = data
        self.done += n
        if self.done >= self._next and n:
            self.report()
        return n

    def report(self) -> None:
        mib = self.done / 2**20
        rate = mib / max(time.monotonic() - self._began, 1e-3)
        if self.total:
            self._say(f"{self._what}: {100 * self.done // self.total:3d}% ({mib:.0f} of "
                      f"{self.total / 2**20:.0f} MiB, {rate:.0f} MiB/s)")
            self._next = self.done + max(self.total // 10, 1)
        else:
            self._say(f"{self._what}: {mib:.0f} MiB ({rate:.0f} MiB/s)")
            self._next = self.done + (32 << 20)


@contextlib.contextmanager
def _open_source(source: str) -> Iterator[tuple[IO[bytes], int | None, str]]:
    """(stream, length if known, a name for messages) for a path or an http(s)/file URL."""
    import urllib.error
    import urllib.request  # ~25 ms: only when importing

    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("http", "https", "file"):
        try:
            response = urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT)  # noqa: S310 (schemes checked)
        except urllib.error.HTTPError as exc:
            raise BuildError(f"cannot download {source}: the server answered {exc.code} {exc.reason}",
                             hint="check the address") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BuildError(f"cannot download {source}: {reason}",
                             hint="check the address and that this host can reach it") from None
        with response:
            length = response.headers.get("Content-Length")
            yield response, int(length) if length and length.isdigit() else None, source
        return
    if "://" in source:
        raise BuildError(f"cannot import from {source}: only http, https and file URLs are supported",
                         hint="download it first, then import the file")
    try:
        f = open(source, "rb")
    except OSError as exc:
        raise BuildError(f"cannot read the bundle {source}: {exc.strerror}") from None
    with f:
        yield f, os.fstat(f.fileno()).st_size, source


def import_bundle(source: str | os.PathLike[str], image_dir: str | os.PathLike[str] | None = None,
                  progress: Callable[[str], None] | None = None) -> BundleInfo:
    """Verify the bundle at `source` (a path, or an http/https/file URL) and install it as an image.

    `image_dir` defaults to where `boxpark image build` would put that arch's image. Nothing is changed
    unless the whole bundle checks out; an image already there is replaced in one rename.
    """
    p = Progress(progress)
    text = os.fspath(source)
    with _open_source(text) as (raw, length, what):
        stream = _Counting(raw, length, p.say, f"reading {what}")
        reader = io.BufferedReader(stream, CHUNK)
        try:
            tar = tarfile.open(fileobj=reader, mode="r|*")
        except tarfile.TarError as exc:
            raise BuildError(f"{what} is not a boxpark image bundle (not a tar archive: {exc})") from None
        with tar:
            members = iter(_members(tar, what))
            first = next(members, None)
            if first is None or first.name != BUNDLE_JSON:
                raise BuildError(f"{what} is not a boxpark image bundle (it does not start with {BUNDLE_JSON})",
                                 hint="make bundles with: boxpark image export")
            head = _read_head(tar, first, what)
            arch, with_docker = head["arch"], head["with_docker"]
            target = Path(image_dir) if image_dir is not None else default_image_dir(arch, with_docker)
            target = target.expanduser().absolute()
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.import-{os.getpid()}"
            subp.remove_tree(tmp)
            tmp.mkdir()
            try:
                _unpack(tar, members, head, tmp, what)
                stream.report()
                _check_image(tmp, head, what)
                with _maybe_locked(target, p):
                    _install(tmp, target)
            finally:
                subp.remove_tree(tmp)
    p.say(f"imported {arch} image into {target}")
    return BundleInfo(target, arch, with_docker, stream.done, round(p.elapsed(), 2))


def _members(tar: tarfile.TarFile, what: str) -> Iterator[tarfile.TarInfo]:
    try:
        yield from tar
    except tarfile.TarError as exc:
        raise BuildError(f"{what} is damaged or truncated ({exc})",
                         hint="download or export it again") from None
    except (EOFError, OSError) as exc:
        raise BuildError(f"{what} is damaged or truncated ({exc})",
                         hint="download or export it again") from None


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, what: str) -> bytes:
    f = tar.extractfile(member)
    assert f is not None
    try:
        return f.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BuildError(f"{what} is truncated in {member.name} ({exc})", hint="download or export it again") from None


def _read_head(tar: tarfile.TarFile, member: tarfile.TarInfo, what: str) -> dict[str, Any]:
    damaged = f"{what}: {BUNDLE_JSON} is damaged"
    if not member.isreg() or member.size > MAX_JSON:
        raise BuildError(f"{damaged} (not a small regular file)", hint="download or export it again")
    try:
        head = json.loads(_read_member(tar, member, what))
    except (ValueError, UnicodeDecodeError):
        raise BuildError(f"{damaged} (not valid JSON)", hint="download or export it again") from None
    if not isinstance(head, dict) or head.get("kind") != KIND:
        raise BuildError(f"{what} is not a boxpark image bundle ({BUNDLE_JSON} says otherwise)")
    version = head.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BuildError(f"{damaged} (no valid format version)", hint="download or export it again")
    if version > BUNDLE_FORMAT:
        raise BuildError(f"{what} is bundle format {version}; this boxpark reads format {BUNDLE_FORMAT}",
                         hint="upgrade boxpark, or export the image with the boxpark version you have")
    if head.get("sha256") != _self_hash(head):
        raise BuildError(f"{damaged} (its own checksum does not match)", hint="download or export it again")
    files = head.get("files")
    if (head.get("arch") not in ARCHES or not isinstance(head.get("with_docker"), bool)
            or not isinstance(files, dict) or set(files) != set(MEMBERS)
            or not all(isinstance(files[n].get("size"), int) and isinstance(files[n].get("sha256"), str)
                       for n in MEMBERS)):
        raise BuildError(f"{damaged} (arch or the file list is wrong)", hint="download or export it again")
    return head


def _unpack(tar: tarfile.TarFile, members: Iterator[tarfile.TarInfo], head: dict[str, Any], tmp: Path,
            what: str) -> None:
    """Write each member to `tmp`, checking its name, type, size and sha256."""
    files = head["files"]
    seen: set[str] = set()
    for member in members:
        name = member.name
        if name not in MEMBERS:
            raise BuildError(f"{what} holds an unexpected member {name!r}", hint="make bundles with: boxpark image export")
        if name in seen:
            raise BuildError(f"{what} holds {name} twice", hint="make bundles with: boxpark image export")
        seen.add(name)
        if not member.isreg():
            raise BuildError(f"{what}: {name} is not a regular file", hint="make bundles with: boxpark image export")
        declared = files[name]
        if member.size != declared["size"]:
            raise BuildError(f"{what}: {name} is {member.size} bytes, but {BUNDLE_JSON} says {declared['size']}",
                             hint="the bundle is damaged; download or export it again")
        source = tar.extractfile(member)
        assert source is not None
        digest = hashlib.sha256()
        with open(tmp / name, "wb") as out:
            try:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)  # OSError here (disk full) is ours, not the bundle's: it passes
            except (tarfile.TarError, EOFError) as exc:
                raise BuildError(f"{what} is truncated in {name} ({exc})",
                                 hint="download or export it again") from None
        if digest.hexdigest() != declared["sha256"]:
            raise BuildError(f"{what}: {name} is damaged (its sha256 is {digest.hexdigest()[:16]}…, the bundle "
                             f"says {declared['sha256'][:16]}…)", hint="download or export it again")
    missing = [n for n in MEMBERS if n not in seen]
    if missing:
        raise BuildError(f"{what} is incomplete: no {', '.join(missing)}", hint="download or export it again")


def _check_image(tmp: Path, head: dict[str, Any], what: str) -> None:
    """The unpacked image agrees with itself: the manifest names the bundle's arch and files."""
    manifest = read_manifest(tmp)
    if manifest is None:
        raise BuildError(f"{what}: manifest.json is not an image manifest")
    files = manifest.get("files")
    if manifest.get("arch") != head["arch"] or not isinstance(files, dict):
        raise BuildError(f"{what}: manifest.json is for {manifest.get('arch')!r}, the bundle for {head['arch']!r}")
    for name in OUTPUTS:
        if not isinstance(files.get(name), dict) or files[name].get("sha256") != head["files"][name]["sha256"]:
            raise BuildError(f"{what}: manifest.json and {BUNDLE_JSON} disagree about {name}")
    size = (tmp / "root.squashfs").stat().st_size
    if size % 512:
        raise BuildError(f"{what}: root.squashfs is {size} bytes, not a multiple of 512 (VZ refuses it)")


@contextlib.contextmanager
def _maybe_locked(target: Path, p: Progress) -> Iterator[None]:
    """Hold the build lock while replacing an image in the build cache (a build may be writing it)."""
    cache = cache_dir().absolute()
    if cache in target.parents:
        with _locked(cache, p):
            yield
    else:
        yield


def _install(tmp: Path, target: Path) -> None:
    """Put `tmp` at `target`: one rename, or with an image there, rename it aside first and delete it after."""
    os.chmod(tmp, 0o755)
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    subp.remove_tree(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    subp.remove_tree(old)


# ------------------------------------------------------------------------------------------ CLI


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `boxpark image export`."""
    parser.add_argument("--arch", choices=ARCHES, default=None,
                        help="which image (default: this host's arch); ignored with --image-dir")
    parser.add_argument("--no-docker", dest="with_docker", action="store_false", default=True,
                        help="the image built with --no-docker")
    parser.add_argument("--image-dir", metavar="DIR", type=Path,
                        help="export the image in DIR (default: the one `boxpark image build` makes)")
    parser.add_argument("--out", "-o", metavar="FILE", type=Path,
                        help="the bundle to write (default: ./boxpark-image-<arch>-<inputs>.tar)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `boxpark image import`."""
    parser.add_argument("source", metavar="FILE|URL", help="a bundle file, or an http(s):// or file:// URL")
    parser.add_argument("--image-dir", metavar="DIR", type=Path,
                        help="install into DIR (default: where `boxpark image build` puts that arch's image)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def run_export(args: argparse.Namespace) -> int:
    """Run `boxpark image export`; print the bundle's path on stdout. Returns the exit code."""
    def go() -> Path:
        image = args.image_dir or default_image_dir(args.arch or default_arch(), args.with_docker)
        out = args.out
        if out is None:
            manifest = read_manifest(Path(image)) or {}
            out = Path(default_bundle_name(manifest))
        return export_bundle(image, out, None if args.quiet else to_stderr).path

    return _cli("export", args, go)


def run_import(args: argparse.Namespace) -> int:
    """Run `boxpark image import`; print the image directory on stdout. Returns the exit code."""
    return _cli("import", args,
                lambda: import_bundle(args.source, args.image_dir, None if args.quiet else to_stderr).path)


def _cli(command: str, args: argparse.Namespace, go: Callable[[], Path]) -> int:
    try:
        result = go()
    except BuildError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"boxpark image {command}: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    except OSError as exc:  # the output directory is not writable, the disk is full, ...
        if getattr(args, "debug", False):
            raise
        print(f"boxpark image {command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"boxpark image {command}: interrupted", file=sys.stderr)
        return 130
    print(result)
    return 0
