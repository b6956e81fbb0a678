"""Image bundles on a small stand-in image: export/import round trips (file, file:// and http on 127.0.0.1),
every single-byte flip refused or harmless, unknown formats and hostile members refused, atomic install,
and the CLI's sentence-and-hint errors. The real image's round trip (and boot) is in tests/vm."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from boxpark.image import bundle
from boxpark.image.subp import BuildError

FILES = {"vmlinuz": b"K" * 3000, "initrd.img": b"I" * 700, "root.squashfs": bytes(range(256)) * 8}


def make_image(directory: Path, arch: str = "arm64", with_docker: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, data in FILES.items():
        (directory / name).write_bytes(data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": 1, "arch": arch, "with_docker": with_docker, "inputs_hash": "ab" * 32, "files": files}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def image_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "built")


@pytest.fixture
def exported(image: Path, tmp_path: Path) -> Path:
    return bundle.export_bundle(image, tmp_path / "b.tar").path


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def write_tar(path: Path, entries: list[tuple[str, bytes]], head: dict[str, object] | None = None) -> Path:
    """A tar of `entries`; `head` replaces bundle.json (its self-checksum recomputed)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in entries:
            if name == "bundle.json" and head is not None:
                head = dict(head)
                head["sha256"] = bundle._self_hash(head)
                data = json.dumps(head).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def head_of(path: Path) -> dict[str, object]:
    return json.loads(dict(members(path))["bundle.json"])


# ------------------------------------------------------------------------------------------ round trips


def test_export_writes_the_members_in_order_with_their_hashes(image: Path, exported: Path) -> None:
    got = members(exported)
    assert [name for name, _ in got] == ["bundle.json", "manifest.json", "vmlinuz", "initrd.img", "root.squashfs"]
    head = json.loads(got[0][1])
    assert head["kind"] == "boxpark-image-bundle" and head["format"] == bundle.BUNDLE_FORMAT
    assert (head["arch"], head["with_docker"]) == ("arm64", True)
    for name, data in got[1:]:
        assert head["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert data == (image / name).read_bytes()
    assert not list(exported.parent.glob("*.tmp"))


def test_round_trip_into_another_directory(image: Path, exported: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    info = bundle.import_bundle(exported, tmp_path / "imported" / "arm64", progress=lines.append)
    assert info.path == tmp_path / "imported" / "arm64" and info.arch == "arm64"
    assert info.size == exported.stat().st_size
    assert image_bytes(info.path) == image_bytes(image)
    assert any("100%" in line for line in lines), lines
    assert [p.name for p in (tmp_path / "imported").iterdir()] == ["arm64"]  # no temp dirs left


def test_the_default_image_dir_follows_the_bundle(exported: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOXPARK_CACHE", str(tmp_path / "cache"))
    assert bundle.import_bundle(exported).path == tmp_path / "cache" / "images" / "arm64"
    nodocker = bundle.export_bundle(make_image(tmp_path / "nd", "amd64", False), tmp_path / "nd.tar").path
    assert bundle.import_bundle(nodocker).path == tmp_path / "cache" / "images" / "amd64-nodocker"


def test_an_existing_image_is_replaced_whole(image: Path, exported: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "stale-file").write_text("old")
    bundle.import_bundle(exported, target)
    assert image_bytes(target) == image_bytes(image)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_file_url(image: Path, exported: Path, tmp_path: Path) -> None:
    info = bundle.import_bundle(exported.as_uri(), tmp_path / "via-file-url")
    assert image_bytes(info.path) == image_bytes(image)


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    """Serves tmp_path on 127.0.0.1 (a free port)."""
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_an_http_url_with_progress(image: Path, exported: Path, tmp_path: Path, http_server: str) -> None:
    lines: list[str] = []
    info = bundle.import_bundle(f"{http_server}/b.tar", tmp_path / "via-http", progress=lines.append)
    assert image_bytes(info.path) == image_bytes(image)
    assert any("reading http://127.0.0.1" in line and "100%" in line for line in lines), lines


def test_an_http_error_is_a_sentence(http_server: str, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="the server answered 404") as info:
        bundle.import_bundle(f"{http_server}/missing.tar", tmp_path / "x")
    assert info.value.hint
    with pytest.raises(BuildError, match="only http, https and file URLs"):
        bundle.import_bundle("ftp://127.0.0.1/x.tar", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_truncated_bundle_is_refused(exported: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar"
    cut.write_bytes(exported.read_bytes()[: member_offset(exported, "root.squashfs") + 100])
    with pytest.raises(BuildError, match="truncated in root.squashfs|incomplete"):
        bundle.import_bundle(cut, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_download_cut_short_is_a_sentence(exported: Path, tmp_path: Path) -> None:
    """The server promises the whole length and closes halfway: the read fails, nothing is installed."""
    data = exported.read_bytes()

    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        with pytest.raises(BuildError, match="reading http://127.0.0.1:.* failed|truncated") as info:
            bundle.import_bundle(f"http://127.0.0.1:{server.server_address[1]}/b.tar", tmp_path / "x")
        assert info.value.hint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert not (tmp_path / "x").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b.tar", "built"]


def test_a_compressed_bundle_imports(image: Path, exported: Path, tmp_path: Path) -> None:
    packed = tmp_path / "b.tar.gz"
    packed.write_bytes(gzip.compress(exported.read_bytes()))
    assert image_bytes(bundle.import_bundle(packed, tmp_path / "gz").path) == image_bytes(image)


# ------------------------------------------------------------------------------------------ damage


def flipped(path: Path, offset: int, out: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    out.write_bytes(bytes(data))
    return out


def member_offset(path: Path, name: str) -> int:
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset_data


@pytest.mark.parametrize("name", ["vmlinuz", "initrd.img", "root.squashfs", "manifest.json", "bundle.json"])
def test_a_flipped_byte_is_refused_naming_the_file(exported: Path, tmp_path: Path, name: str) -> None:
    target = make_image(tmp_path / "installed", "amd64")  # an image already there stays untouched
    before = image_bytes(target)
    damaged = flipped(exported, member_offset(exported, name) + 10, tmp_path / "damaged.tar")
    with pytest.raises(BuildError) as info:
        bundle.import_bundle(damaged, target)
    assert name in info.value.message and "damaged" in info.value.message, info.value.message
    assert info.value.hint == "download or export it again"
    assert image_bytes(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar", "built", "damaged.tar", "installed"]


def test_every_single_byte_flip_is_refused_or_harmless(image: Path, exported: Path, tmp_path: Path) -> None:
    """The invariant: a flipped byte either makes import fail with an BuildError, or (in tar padding) changes
    nothing that gets installed. Every byte of bundle.json (header and data), which decides how the rest is
    read; every 11th elsewhere (the payloads are hashed whole), up to the end-of-archive blocks."""
    data = exported.read_bytes()
    with tarfile.open(exported) as tar:
        infos = tar.getmembers()
    head_end = infos[0].offset_data + infos[0].size
    archive_end = infos[-1].offset_data + (infos[-1].size + 511) // 512 * 512 + 1024
    offsets = [*range(head_end), *range(head_end, min(archive_end, len(data)), 11)]
    expected = image_bytes(image)
    damaged = tmp_path / "d.tar"
    refused = 0
    for offset in offsets:
        damaged.write_bytes(data[:offset] + bytes([data[offset] ^ 0x80]) + data[offset + 1:])
        target = tmp_path / "t"
        try:
            bundle.import_bundle(damaged, target)
        except BuildError:
            refused += 1
            assert not target.exists()
            continue
        assert image_bytes(target) == expected, offset
        bundle.subp.remove_tree(target)
    assert refused > len(offsets) // 2


def test_a_newer_format_is_refused(exported: Path, tmp_path: Path) -> None:
    entries = members(exported)
    head = {**head_of(exported), "format": bundle.BUNDLE_FORMAT + 1}
    with pytest.raises(BuildError, match=r"bundle format 2; this boxpark reads format 1") as info:
        bundle.import_bundle(write_tar(tmp_path / "new.tar", entries, head), tmp_path / "x")
    assert "upgrade boxpark" in str(info.value.hint)


@pytest.mark.parametrize("entries, message", [
    (lambda e: e[1:], "does not start with bundle.json"),
    (lambda e: e[:-1], "incomplete: no root.squashfs"),
    (lambda e: e + [("../evil", b"x")], "unexpected member '../evil'"),
    (lambda e: e[:2] + [("/etc/passwd", b"x")] + e[2:], "unexpected member '/etc/passwd'"),
    (lambda e: e + [e[2]], "holds vmlinuz twice"),
])
def test_a_bundle_not_made_by_export_is_refused(exported: Path, tmp_path: Path, entries, message: str) -> None:  # type: ignore[no-untyped-def]
    tar = write_tar(tmp_path / "odd.tar", entries(members(exported)))
    with pytest.raises(BuildError, match=message):
        bundle.import_bundle(tar, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_link_member_is_refused(exported: Path, tmp_path: Path) -> None:
    odd = tmp_path / "link.tar"
    with tarfile.open(exported) as src, tarfile.open(odd, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member in src:
            if member.name == "vmlinuz":
                link = tarfile.TarInfo("vmlinuz")
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
                tar.addfile(link)
            else:
                tar.addfile(member, src.extractfile(member))
    with pytest.raises(BuildError, match="vmlinuz is not a regular file"):
        bundle.import_bundle(odd, tmp_path / "x")


def test_not_a_bundle_at_all(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(BuildError, match="not a boxpark image bundle"):
        bundle.import_bundle(junk, tmp_path / "x")
    with pytest.raises(BuildError, match="cannot read the bundle .*: No such file"):
        bundle.import_bundle(tmp_path / "nope.tar", tmp_path / "x")


def test_a_damaged_image_is_not_exported(image: Path, tmp_path: Path) -> None:
    (image / "root.squashfs").write_bytes(b"\x00" * 2048)
    with pytest.raises(BuildError, match="root.squashfs does not match its manifest"):
        bundle.export_bundle(image, tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists() and not (tmp_path / "out.tar.tmp").exists()
    with pytest.raises(BuildError, match="no image in"):
        bundle.export_bundle(tmp_path / "empty", tmp_path / "out.tar")


# ------------------------------------------------------------------------------------------ CLI


def parse(adder, *argv: str) -> argparse.Namespace:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    adder(parser)
    return parser.parse_args(list(argv))


def test_the_cli_round_trip(image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = parse(bundle.add_export_arguments, "--image-dir", str(image), "-q")
    assert bundle.run_export(args) == 0
    out = capsys.readouterr()
    assert out.out.strip() == f"boxpark-image-arm64-{'ab' * 6}.tar" and out.err == ""
    args = parse(bundle.add_import_arguments, out.out.strip(), "--image-dir", str(tmp_path / "img"))
    assert bundle.run_import(args) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "img") and "imported arm64 image" in out.err
    assert image_bytes(tmp_path / "img") == image_bytes(image)


def test_cli_errors_are_a_sentence_and_a_hint(exported: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    damaged = flipped(exported, member_offset(exported, "root.squashfs") + 1, tmp_path / "damaged.tar")
    args = parse(bundle.add_import_arguments, str(damaged), "--image-dir", str(tmp_path / "img"), "-q")
    assert bundle.run_import(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"boxpark image import: {damaged}: root.squashfs is damaged (its sha256 is ")
    assert err.endswith("\nhint: download or export it again\n") and "Traceback" not in err
    args = parse(bundle.add_export_arguments, "--image-dir", str(tmp_path / "none"), "-o", str(tmp_path / "o"))
    assert bundle.run_export(args) == 1
    err = capsys.readouterr().err
    assert err == (f"boxpark image export: no image in {tmp_path / 'none'} (no readable manifest.json)\n"
                   "hint: build one first: boxpark image build [--arch ARCH]\n")
    args.debug = True
    with pytest.raises(BuildError):
        bundle.run_export(args)
