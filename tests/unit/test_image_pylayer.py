"""The boxpark layer ships only what the guest runs and hashes only that; the guest imports nothing else.

A host edit must rebuild nothing and a guest edit must rebuild the layer, so the image's input hash is taken
for real (apt's view of the kernel included) from frozen copies of this package. The staged layer is the
image's: every module in it is imported by a bare Python (`-S -I`) that sees nothing but the layer.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import msgspec
import pytest

from boxpark.image import build, pylayer


def tree(root: Path, files: list[str]) -> Path:
    pkg = root / "boxpark"
    for rel in files:
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {rel}\n")
    return pkg


@pytest.mark.parametrize("protocol, transport", [("protocol.py", "transport.py"),
                                                 ("protocol/__init__.py", "transport/__init__.py")])
def test_only_the_guest_modules_ship_as_modules_or_packages(tmp_path: Path, protocol: str, transport: str) -> None:
    guest = ["__init__.py", protocol, transport, "relay.py", "guest/__init__.py", "guest/init.py",
             "guest/sub/deep.py"]
    if protocol.endswith("/__init__.py"):
        guest += ["protocol/calls.py", "transport/channel.py"]
    host = ["cli.py", "cli/__init__.py", "dirs.py", "schema.py", "py.typed", "errors.py", "host/__init__.py",
            "host/agent.py", "host/backends/qemu.py", "image/build.py", "image/initramfs-init.sh",
            "relay_host.py", "guests.py", "protocols/x.py"]
    pkg = tree(tmp_path, guest + host)
    assert [rel for rel, _ in pylayer.source_files(pkg)] == sorted(f"boxpark/{rel}" for rel in guest)


def copy_package(into: Path) -> Path:
    """A frozen copy of this boxpark package (the shared work tree may change under a test)."""
    source = into / "boxpark"
    shutil.copytree(pylayer.package_dir(), source, ignore=shutil.ignore_patterns("__pycache__"))
    return source


def module_file(pkg: Path, name: str) -> Path:
    """`name.py`, or `name/__init__.py` once it is a package."""
    return pkg / f"{name}.py" if (pkg / f"{name}.py").is_file() else pkg / name / "__init__.py"


def test_a_host_edit_rebuilds_nothing_and_a_guest_edit_rebuilds_the_layer(tmp_path: Path) -> None:
    if shutil.which("apt-cache") is None or shutil.which("dpkg") is None:
        pytest.skip("the image's inputs name the kernel from apt: this machine has no apt/dpkg")
    pkg = copy_package(tmp_path / "src")
    cache = tmp_path / "cache"
    cache.mkdir()

    def inputs_hash() -> str:
        return build._resolve_inputs(build.default_arch(), True, cache, pkg).hash

    def edit(path: Path) -> bytes:
        before = path.read_bytes()
        path.write_bytes(before + b"\n# edited by test_image_pylayer\n")
        return before

    first = inputs_hash()
    for host in ("host/agent.py", "image/build.py", "dirs.py"):
        edit(pkg / host)
    edit(module_file(pkg, "cli"))
    assert inputs_hash() == first
    for guest in (pkg / "guest/init.py", module_file(pkg, "protocol"), module_file(pkg, "transport"),
                  pkg / "relay.py", pkg / "__init__.py"):
        before = edit(guest)
        assert inputs_hash() != first, guest
        guest.write_bytes(before)
    assert inputs_hash() == first


def msgspec_wheel(into: Path) -> Path:
    """The installed msgspec as a wheel, so that the staged layer is whole without PyPI."""
    wheel = into / "msgspec.whl"
    root = Path(msgspec.__file__).parent
    with zipfile.ZipFile(wheel, "w") as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                zf.write(path, f"msgspec/{path.relative_to(root).as_posix()}")
    return wheel


IMPORT_ALL = r"""
import importlib, json, sys
sys.path[:] = [sys.argv[1]] + [p for p in sys.path if "-packages" not in p]
names = json.loads(sys.argv[2])
for name in names:
    importlib.import_module(name)
import boxpark
print(json.dumps({"boxpark": boxpark.__file__, "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "boxpark")}))
"""


def test_every_shipped_module_imports_from_the_layer_alone(tmp_path: Path) -> None:
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    pylayer.stage(tmp_path / "layer", pylayer.package_dir(), msgspec_wheel(tmp_path), python)
    top = tmp_path / "layer" / pylayer.LAYER_DIR.lstrip("/")
    shipped = sorted(path.relative_to(top).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
                     for path in (top / "boxpark").rglob("*.py"))
    assert "boxpark.guest.init" in shipped and "boxpark.guest.server" in shipped
    assert not any(name.startswith(("boxpark.host", "boxpark.cli", "boxpark.image")) for name in shipped)
    result = subprocess.run([sys.executable, "-S", "-I", "-c", IMPORT_ALL, str(top), json.dumps(shipped)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["boxpark"] == str(top / "boxpark" / "__init__.py")
    assert set(out["loaded"]) <= set(shipped)


def imported_names(path: Path, package: str) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) of every import in the file, relative ones resolved, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((module, [alias.name for alias in node.names]))
    return found


def test_no_shipped_module_imports_what_is_not_shipped_even_lazily() -> None:
    root = pylayer.package_dir()
    tops = {entry.name.removesuffix(".py") for entry in root.iterdir() if entry.name != "__pycache__"}
    for rel, path in pylayer.source_files(root):
        dotted = rel.removesuffix(".py").replace("/", ".")
        package = dotted.removesuffix(".__init__") if rel.endswith("__init__.py") else dotted.rpartition(".")[0]
        for module, names in imported_names(path, package):
            parts = module.split(".")
            if parts[0] != "boxpark":
                continue
            wanted = parts[1:2] or [name for name in names if name in tops]
            for top in wanted:
                assert top in pylayer.GUEST_MODULES, f"{rel} imports boxpark.{top}, which the image does not ship"
