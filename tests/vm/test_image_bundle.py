"""The real image through a bundle: `boxpark image export`, then `import` into another image directory
(from a file, and over http from 127.0.0.1), and the imported image boots (sandbox backend: the fastest;
its init reports Ready and runs a command). A bundle with one flipped byte in the root is refused, naming
root.squashfs, and leaves the target untouched. Sizes and times are printed as metrics, not asserted.
(The stand-in-image cases, every flipped byte among them, are in tests/unit/test_image_bundle.py.)
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boxpark.image import bundle
from boxpark.image.subp import BuildError
from tests.machines import Machines, image_dir

pytestmark = [pytest.mark.sandbox, pytest.mark.skipif(os.geteuid() != 0, reason="the image and sandbox need root")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = image_dir("amd64")
    out = tmp_path_factory.mktemp("bundle") / "amd64.tar"
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "boxpark", "image", "export", "--image-dir", str(image),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    print(f"\nexport: {out.stat().st_size / 2**20:.1f} MiB in {time.monotonic() - began:.2f} s (as a command)")
    return out


def test_export_then_import_boots(exported: Path, tmp_path: Path, machines: Machines) -> None:
    target = tmp_path / "imported" / "amd64"
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "boxpark", "image", "import", str(exported),
                           "--image-dir", str(target)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    print(f"import (file): {time.monotonic() - began:.2f} s (as a command)")
    assert proc.stdout.strip() == str(target) and "100%" in proc.stderr
    original = image_dir("amd64")
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest == json.loads((original / "manifest.json").read_text())
    for name, meta in manifest["files"].items():
        assert (target / name).stat().st_size == meta["size"]
    machine = machines.boot("sandbox", image=target)
    assert machine.spec.root == str(target / "root.squashfs")
    result = machine.api(lambda c: c.exec(["cat", "/usr/lib/boxpark/python/boxpark/__init__.py"]))
    assert result.code == 0 and b"__version__" in result.stdout


@pytest.fixture
def served(exported: Path) -> Iterator[str]:
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(exported.parent))  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{exported.name}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_import_over_http(served: str, tmp_path: Path) -> None:
    lines: list[str] = []
    began = time.monotonic()
    info = bundle.import_bundle(served, tmp_path / "img", progress=lines.append)
    print(f"import (http on 127.0.0.1): {time.monotonic() - began:.2f} s")
    assert info.arch == "amd64" and (info.path / "root.squashfs").exists()
    assert any(f"reading {served}" in line and "100%" in line for line in lines), lines


def test_a_flipped_byte_in_the_root_is_refused(exported: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.tar"
    data = bytearray(exported.read_bytes())
    import tarfile

    with tarfile.open(exported) as tar:
        root = tar.getmember("root.squashfs")
    data[root.offset_data + root.size // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    target = tmp_path / "img"
    proc = subprocess.run([sys.executable, "-m", "boxpark", "image", "import", str(damaged), "--image-dir",
                           str(target), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"boxpark image import: {damaged}: root.squashfs is damaged"), proc.stderr
    assert proc.stderr.endswith("hint: download or export it again\n") and "Traceback" not in proc.stderr
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["damaged.tar"]
    with pytest.raises(BuildError, match="root.squashfs is damaged"):
        bundle.import_bundle(damaged, target)
