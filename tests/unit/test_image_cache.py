"""What decides a rebuild: the base's key, the boxpark layer's source hash, the output's manifest."""

from __future__ import annotations

import fcntl
import io
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from boxpark.image import build, pylayer, rootfs
from boxpark.image.kernel import DebPackage, kernel_dependency, parse_control_stanzas
from boxpark.image.progress import Console, Progress
from boxpark.image.rootfs import BaseSpec, parse_dpkg_status
from boxpark.image.subp import BuildError

SPEC = BaseSpec("amd64", True, "linux-image-6.1.0-57-cloud-amd64", "6.1.192-3")


def test_base_key_is_stable_and_names_its_variant() -> None:
    assert SPEC.key == BaseSpec("amd64", True, "linux-image-6.1.0-57-cloud-amd64", "6.1.192-3").key
    assert len(SPEC.key) == 16
    assert SPEC.variant == "amd64"
    assert replace(SPEC, with_docker=False).variant == "amd64-nodocker"


@pytest.mark.parametrize(
    "change",
    [
        {"arch": "arm64"},
        {"with_docker": False},
        {"kernel_version": "6.1.193-1"},
        {"kernel_package": "linux-image-6.1.0-58-cloud-amd64"},
        {"suite": "trixie"},
    ],
)
def test_base_key_changes_with_each_input(change: dict[str, object]) -> None:
    assert replace(SPEC, **change).key != SPEC.key  # type: ignore[arg-type]


def test_base_key_changes_with_the_recipe_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = SPEC.key
    monkeypatch.setattr(rootfs, "BASE_RECIPE_VERSION", rootfs.BASE_RECIPE_VERSION + 1)
    assert SPEC.key != before


def test_docker_packages_only_with_docker() -> None:
    assert "docker.io" in SPEC.packages and "iptables" in SPEC.packages
    assert "docker.io" not in replace(SPEC, with_docker=False).packages
    assert "python3" in replace(SPEC, with_docker=False).packages


def make_package(root: Path) -> Path:
    pkg = root / "boxpark"
    (pkg / "guest").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "guest" / "init.py").write_text("def main():\n    pass\n")
    return pkg


def test_source_hash_follows_content_not_caches(tmp_path: Path) -> None:
    pkg = make_package(tmp_path)
    first = pylayer.source_hash(pkg)
    (pkg / "guest" / "__pycache__").mkdir()
    (pkg / "guest" / "__pycache__" / "init.cpython-311.pyc").write_bytes(b"junk")
    (pkg / "guest" / "init.py~").write_text("editor backup")
    (pkg / ".mypy_cache").mkdir()
    assert pylayer.source_hash(pkg) == first
    (pkg / "guest" / "init.py").write_text("def main():\n    return 1\n")
    assert pylayer.source_hash(pkg) != first
    files = [rel for rel, _ in pylayer.source_files(pkg)]
    assert files == ["boxpark/__init__.py", "boxpark/guest/init.py"]


def test_stage_compiles_for_the_guest_path(tmp_path: Path) -> None:
    import sys
    import zipfile

    pkg = make_package(tmp_path)
    wheel = tmp_path / "msgspec-0.0-cp311-cp311-manylinux_2_17_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("msgspec/__init__.py", "X = 1\n")
        zf.writestr("msgspec-0.0.dist-info/METADATA", "Name: msgspec\n")
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    info = pylayer.stage(tmp_path / "layer", pkg, wheel, python)
    top = tmp_path / "layer" / ".boxpark" / "python"
    assert (top / "boxpark" / "guest" / "init.py").is_file()
    assert (top / "msgspec" / "__init__.py").is_file()
    assert info.compiled
    pycs = sorted(p.name for p in top.rglob("*.pyc"))
    assert len(pycs) == 3
    assert [p.name for p in (tmp_path / "layer").iterdir()] == [".boxpark"]  # one root entry for the append


def test_stage_refuses_code_that_does_not_compile(tmp_path: Path) -> None:
    import sys
    import zipfile

    pkg = make_package(tmp_path)
    (pkg / "guest" / "broken.py").write_text("def (:\n")
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("msgspec/__init__.py", "")
    with pytest.raises(BuildError, match="broken.py"):
        pylayer.stage(tmp_path / "layer", pkg, wheel, f"{sys.version_info[0]}.{sys.version_info[1]}")


def write_image(out: Path, inputs_hash: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in build.OUTPUTS:
        (out / name).write_bytes(name.encode())
        files[name] = {"size": len(name), "sha256": "x"}
    (out / "manifest.json").write_text(json.dumps({"inputs_hash": inputs_hash, "files": files}))


def test_is_current_needs_same_inputs_and_every_file_at_its_size(tmp_path: Path) -> None:
    write_image(tmp_path, "abc")
    assert build.is_current(tmp_path, "abc")
    assert not build.is_current(tmp_path, "abd")
    (tmp_path / "initrd.img").write_bytes(b"changed size")
    assert not build.is_current(tmp_path, "abc")
    write_image(tmp_path, "abc")
    (tmp_path / "vmlinuz").unlink()
    assert not build.is_current(tmp_path, "abc")
    (tmp_path / "manifest.json").write_text("{not json")
    assert not build.is_current(tmp_path, "abc")
    assert not build.is_current(tmp_path / "missing", "abc")


def test_default_image_dir_follows_boxpark_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BOXPARK_CACHE", str(tmp_path))
    assert build.default_image_dir("amd64", True) == tmp_path / "images" / "amd64"
    assert build.default_image_dir("arm64", False) == tmp_path / "images" / "arm64-nodocker"
    monkeypatch.delenv("BOXPARK_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert build.default_image_dir("amd64", True) == Path.home() / ".cache" / "boxpark" / "images" / "amd64"


def test_unknown_arch_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="riscv64"):
        build.build_image(tmp_path, arch="riscv64")


def test_kernel_dependency_takes_the_pinned_image_package() -> None:
    depends = "linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3), something-else"
    assert kernel_dependency(depends) == ("linux-image-6.1.0-57-cloud-amd64", "6.1.192-3")
    assert kernel_dependency("linux-image-6.1.0-9-cloud-arm64") == ("linux-image-6.1.0-9-cloud-arm64", None)
    with pytest.raises(BuildError):
        kernel_dependency("linux-base, initramfs-tools")


def test_control_stanzas_and_dpkg_status() -> None:
    text = "Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nVersion: 2\n"
    stanzas = parse_control_stanzas(text)
    assert [s["Package"] for s in stanzas] == ["a", "b"]
    assert stanzas[0]["Description"] == "x\nmore"
    status = (
        "Package: python3\nStatus: install ok installed\nVersion: 3.11.2-1+b1\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n"
    )
    assert parse_dpkg_status(status) == {"python3": "3.11.2-1+b1"}


def test_deb_filename_encodes_the_epoch_like_apt() -> None:
    pkg = DebPackage("busybox-static", "1:1.35.0-4", "amd64")
    assert pkg.filename == "busybox-static_1%3a1.35.0-4_amd64.deb"
    assert ":" not in pkg.key


def test_init_script_runs_the_guest_init_from_the_layer() -> None:
    first, *rest = rootfs.INIT_SCRIPT.splitlines()
    # the kernel passes everything after the interpreter as ONE argument: "-S -I" would not parse
    assert first == "#!/usr/bin/python3 -SI"
    assert f'sys.path.insert(0, "{rootfs.PYTHON_DIR}")' in rest
    assert "from boxpark.guest.init import main" in rest


# ------------------------------------------------------------------------- why it builds (rebuild_reason)

INPUTS: dict[str, object] = {  # as _resolve_inputs makes them (and the manifest of a real image records)
    "builder": 1,
    "base": "967843ecd5aa42f7",
    "kernel": "linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64",
    "busybox": "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64",
    "initramfs_init": "09d4d208",
    "boot_modules": ["virtio_pci", "virtio_mmio?"],
    "layer": [2, "aefea110", "0.23.0"],
}


def write_built_image(out: Path, inputs: dict[str, object]) -> None:
    write_image(out, rootfs.hash_json(inputs))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "inputs": inputs}))


def test_the_reason_is_none_for_an_up_to_date_image(tmp_path: Path) -> None:
    write_built_image(tmp_path, INPUTS)
    assert build.rebuild_reason(tmp_path, rootfs.hash_json(INPUTS), INPUTS) is None


def test_the_reason_of_a_first_run_names_the_missing_image(tmp_path: Path) -> None:
    out = tmp_path / "images" / "amd64"
    assert build.rebuild_reason(out, rootfs.hash_json(INPUTS), INPUTS) == f"first run: no image in {out} yet"


def test_an_image_without_its_manifest_is_an_interrupted_build_not_a_first_run(tmp_path: Path) -> None:
    write_built_image(tmp_path, INPUTS)
    (tmp_path / "manifest.json").unlink()
    reason = build.rebuild_reason(tmp_path, rootfs.hash_json(INPUTS), INPUTS)
    assert reason == f"the image in {tmp_path} has no manifest (an interrupted build?)"


def test_a_file_of_the_wrong_size_is_named(tmp_path: Path) -> None:
    write_built_image(tmp_path, INPUTS)
    (tmp_path / "root.squashfs").write_bytes(b"truncated?")
    reason = build.rebuild_reason(tmp_path, rootfs.hash_json(INPUTS), INPUTS)
    assert reason == f"{tmp_path / 'root.squashfs'} is not the size its manifest records"
    (tmp_path / "root.squashfs").unlink()
    assert build.rebuild_reason(tmp_path, rootfs.hash_json(INPUTS), INPUTS) == f"{tmp_path / 'root.squashfs'} is missing"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"layer": [2, "0123abcd", "0.23.0"]}, "inputs changed: boxpark's guest code"),
        ({"layer": [3, "aefea110", "0.23.0"]}, "inputs changed: boxpark's layer recipe (version 2 → 3)"),
        ({"layer": [2, "aefea110", "0.24.0"]}, "inputs changed: msgspec (0.23.0 → 0.24.0)"),
        ({"builder": 2}, "inputs changed: the image recipe (builder version 1 → 2)"),
        ({"base": "0000000000000000"}, "inputs changed: the Debian base (its package list or recipe)"),
        (
            {"kernel": "linux-image-6.1.0-58-cloud-amd64_6.1.193-1_amd64", "base": "1111111111111111"},
            "inputs changed: the kernel (linux-image-6.1.0-57-cloud-amd64 6.1.192-3 → "
            "linux-image-6.1.0-58-cloud-amd64 6.1.193-1), the Debian base (for the new kernel)",
        ),
        (
            {"busybox": "busybox-static_1%3a1.36.1-1_amd64"},
            "inputs changed: busybox (busybox-static 1:1.35.0-4+deb12u1+b1 → busybox-static 1:1.36.1-1)",
        ),
        ({"initramfs_init": "ffff"}, "inputs changed: the initramfs script"),
        ({"boot_modules": ["virtio_pci"]}, "inputs changed: the boot modules"),
        ({"firmware": "new"}, "inputs changed: firmware"),  # an input this function does not know yet
    ],
)
def test_the_reason_of_changed_inputs_names_each_change(tmp_path: Path, change: dict[str, object],
                                                        reason: str) -> None:
    write_built_image(tmp_path, INPUTS)
    new = {**INPUTS, **change}
    assert build.rebuild_reason(tmp_path, rootfs.hash_json(new), new) == reason


def test_a_manifest_without_inputs_still_gives_a_reason(tmp_path: Path) -> None:
    write_image(tmp_path, "old-hash")  # a manifest from before it recorded its inputs
    assert build.rebuild_reason(tmp_path, rootfs.hash_json(INPUTS), INPUTS) == "its inputs changed"


def test_waiting_for_another_build_is_said_even_by_ups_held_console(tmp_path: Path) -> None:
    stream = io.StringIO()
    entered = threading.Event()
    with open(tmp_path / ".build.lock", "w") as other_build:
        fcntl.flock(other_build, fcntl.LOCK_EX)
        with Console(stream, hold=True) as console:

            def locked_build() -> None:
                with build._locked(tmp_path, Progress(console)):
                    entered.set()

            thread = threading.Thread(target=locked_build)
            thread.start()
            deadline = time.monotonic() + 60
            while "waiting for another build" not in stream.getvalue():
                assert time.monotonic() < deadline, "the wait was never said"
                time.sleep(0.01)
            assert not entered.is_set()
            fcntl.flock(other_build, fcntl.LOCK_UN)
            thread.join(60)
    assert entered.is_set()
    assert stream.getvalue().endswith(f"] waiting for another build using {tmp_path} ...\n")

