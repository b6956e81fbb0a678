"""The arm64 image — what a Mac boots — built here through qemu-user and booted under TCG on the qemu backend.

One machine (`qemu-system-aarch64 -M virt -cpu cortex-a72 -accel tcg`) is shared by every test: Ready and
exec (`uname -m` is aarch64), the raw `Image` kernel VZ needs, dockerd READY, and Rosetta's guest side with
qemu-x86_64-static standing in for /run/rosetta/rosetta: registered through `boxpark.guest.binfmt` (run in
the guest over the API), an x86_64 busybox runs, and so does `docker run --platform linux/amd64` (the one
container run: each costs ~16 s under TCG). The factory fails a test on any traceback in the guest's logs.

Needs (Debian): qemu-system-arm (qemu-system-aarch64), qemu-user-static (the build, and the arm64 build of
qemu-x86_64-static it downloads for the guest), debootstrap, squashfs-tools, and `dpkg --add-architecture
arm64 && apt-get update`. A cold image build takes minutes (cached by its inputs after that).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boxpark import protocol
from boxpark.host.backends.qemu import QemuBackend
from boxpark.image import kernel
from boxpark.image.build import cache_dir
from tests.machines import Machine, Machines, image_dir

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None,
                       reason="qemu-system-aarch64 not installed (apt-get install qemu-system-arm)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the image and its tools need root"),
]

INTERPRETER = "/run/rosetta/rosetta"  # where VZ's Rosetta share puts it; qemu-x86_64-static stands in here
EM_AARCH64, EM_X86_64 = 183, 62
DOCKER = "docker -H unix:///run/docker.sock"



def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF", data[:4]
    return int.from_bytes(data[18:20], "little")


# ------------------------------------------------------------------------------------------ host assets


def busybox(arch: str) -> bytes:
    """busybox-static for `arch`, from the image builder's cache (downloaded once)."""
    _, pkg = kernel.resolve_cached(arch, cache_dir())
    return kernel.fetch_busybox(pkg, cache_dir()).read_bytes()


def qemu_x86_64_for_arm64() -> bytes:
    """qemu-x86_64-static built for arm64 (it runs in the guest): one file out of qemu-user-static:arm64."""
    pkg = kernel.resolve("qemu-user-static", "arm64")
    kept = cache_dir() / "test-assets" / f"qemu-x86_64-static_{pkg.key}"
    if not kept.exists():
        deb = kernel.download(pkg, cache_dir() / "debs" / "arm64")
        fsys = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(fsys)) as tar:
            member = tar.extractfile("./usr/bin/qemu-x86_64-static")
            assert member is not None
            data = member.read()
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.with_suffix(".tmp").write_bytes(data)
        os.replace(kept.with_suffix(".tmp"), kept)
    return kept.read_bytes()


def docker_archive(binary: bytes, arch: str, tag: str) -> bytes:
    """A `docker load` archive of one image, `tag`, for linux/`arch`: one layer holding /bin/busybox.

    (docker 20.10's `import --platform` records the daemon's arch, whatever it is told: hence load.)
    """
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(binary), 0o755
        tar.addfile(info, io.BytesIO(binary))
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({"architecture": arch, "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": ["layer/layer.tar"]}]).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (("layer/layer.tar", layer_bytes), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def load_image(vm: Machine, arch: str) -> str:
    """busybox for `arch` as the docker image bp/busybox:`arch` in the guest's dockerd."""
    tag = f"bp/busybox:{arch}"
    vm.api(lambda c: c.write_file(f"/run/t/{arch}.tar", docker_archive(busybox(arch), arch, tag), parents=True))
    vm.sh(f"{DOCKER} load -q -i /run/t/{arch}.tar")
    assert vm.sh(f"{DOCKER} image inspect -f '{{{{.Architecture}}}}' {tag}") == f"{arch}\n"
    return tag


# ------------------------------------------------------------------------------------------ the machine


@pytest.fixture(scope="module")
def vm(module_machines: Machines) -> Machine:
    image = image_dir("arm64")  # built if missing or stale: minutes cold (qemu-user), instant when cached
    return module_machines.boot("qemu", image=image, arch="arm64", memory=1536, console=True)


@pytest.fixture(scope="module")
def dockerd(vm: Machine) -> Iterator[protocol.NotifyMessage]:
    began = time.monotonic()
    ready = vm.start_dockerd(timeout=180)
    print(f"dockerd READY {time.monotonic() - began:.1f} s after launch")  # a metric, not asserted
    yield ready
    vm.stop_dockerd()


@pytest.fixture(scope="module")
def x86_64_interpreter(vm: Machine) -> str:
    """qemu-x86_64-static at Rosetta's path, registered with binfmt_misc by boxpark.guest.binfmt in the guest."""
    vm.api(lambda c: c.write_file(INTERPRETER, qemu_x86_64_for_arm64(), mode=0o755, parents=True))
    out = vm.sh("exec python3 -SI -c 'import sys; sys.path.insert(0, \"/usr/lib/boxpark/python\"); "
                 "from boxpark.guest import binfmt; print(binfmt.register(sys.argv[1]))' " + INTERPRETER)
    assert out == "True\n"
    return INTERPRETER


# ------------------------------------------------------------------------------------------ tests


def test_boots_to_ready(vm: Machine) -> None:
    assert vm.ready is not None and vm.ready.arch == "aarch64"
    assert [s.name for s in vm.ready.timeline if s.error] == [], vm.ready.timeline
    backend = vm.backend
    assert isinstance(backend, QemuBackend) and backend.plan is not None and backend.plan.accel == "tcg"
    assert backend.argv[backend.argv.index("-machine") + 1] == "virt"
    assert backend.argv[backend.argv.index("-cpu") + 1] == "cortex-a72"
    from boxpark.host.boot import format_timeline

    print(format_timeline(backend, vm.ready))  # the metric (compared A/B in bench/boot.py), not asserted


def test_exec_says_aarch64(vm: Machine) -> None:
    result = vm.api(lambda c: c.exec(["uname", "-m"]))
    assert (result.code, result.stdout) == (0, b"aarch64\n")


def test_the_image_is_what_vz_boots(vm: Machine) -> None:
    image = Path(vm.spec.kernel or "").parent
    head = Path(vm.spec.kernel or "").read_bytes()[:64]
    assert head[0x38:0x3C] == b"ARM\x64"  # the raw Image, not compressed
    assert (image / "root.squashfs").stat().st_size % 512 == 0
    # the guest's msgspec is the aarch64 build (the init imports it, so Ready already proved it loads)
    so = vm.sh("ls /usr/lib/boxpark/python/msgspec/_core*.so").split()[0]
    assert "aarch64" in so
    assert elf_machine(vm.api(lambda c: c.read_file(so, length=64)).data) == EM_AARCH64


def test_dockerd_is_ready(vm: Machine, dockerd: protocol.NotifyMessage) -> None:
    assert dockerd.fields.get("READY") == "1"
    assert vm.sh(f"{DOCKER} version --format '{{{{.Server.Arch}}}}'") == "arm64\n"


def test_an_x86_64_program_runs_through_the_registered_interpreter(vm: Machine, x86_64_interpreter: str) -> None:
    entry = vm.sh("cat /proc/sys/fs/binfmt_misc/rosetta")
    assert "enabled" in entry and f"interpreter {x86_64_interpreter}" in entry and "flags: OCF" in entry, entry
    x86_busybox = busybox("amd64")
    assert elf_machine(x86_busybox) == EM_X86_64
    vm.api(lambda c: c.write_file("/run/t/busybox-x86_64", x86_busybox, mode=0o755, parents=True))
    assert vm.sh("/run/t/busybox-x86_64 uname -m") == "x86_64\n"
    # registering again keeps the entry as it is
    out = vm.sh("exec python3 -SI -c 'import sys; sys.path.insert(0, \"/usr/lib/boxpark/python\"); "
                 "from boxpark.guest import binfmt; print(binfmt.register(sys.argv[1]))' " + x86_64_interpreter)
    assert out == "False\n"


def test_docker_runs_an_amd64_image(vm: Machine, dockerd: protocol.NotifyMessage, x86_64_interpreter: str) -> None:
    """`docker run --platform linux/amd64`: the container's root has no interpreter; the F flag makes it work."""
    tag = load_image(vm, "amd64")
    out = vm.sh(f"{DOCKER} run --rm --network none --platform linux/amd64 {tag} /bin/busybox uname -m")
    assert out == "x86_64\n"
