"""Kernel module selection and load order, resolved at build time from modules.dep."""

from __future__ import annotations

import pytest

from boxpark.image.modules import ModuleIndex, module_name, parse_builtin, parse_modules_dep
from boxpark.image.subp import BuildError

DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/bridge/br_netfilter.ko: kernel/net/bridge/bridge.ko kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/llc/llc.ko:
kernel/net/netfilter/nf_tables.ko: kernel/net/netfilter/nfnetlink.ko
kernel/net/netfilter/nfnetlink.ko:
"""
BUILTIN = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n"


def index() -> ModuleIndex:
    return ModuleIndex(parse_modules_dep(DEP), parse_builtin(BUILTIN))


def position(order: list[str], name: str) -> int:
    return [module_name(p) for p in order].index(name)


def test_module_name_strips_suffixes_and_normalises_dashes() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert module_name("kernel/fs/overlayfs/overlay.ko") == "overlay"
    assert module_name("kernel/fs/fuse/fuse.ko.zst") == "fuse"


def test_parse_modules_dep() -> None:
    deps = parse_modules_dep(DEP)
    assert deps["kernel/net/llc/llc.ko"] == []
    assert deps["kernel/net/bridge/bridge.ko"] == ["kernel/net/802/stp.ko", "kernel/net/llc/llc.ko"]


def test_every_module_comes_after_its_dependencies() -> None:
    idx = index()
    order = idx.load_order(["br_netfilter", "virtio_pci", "virtio_blk", "virtio_rng"])
    for path in order:
        for dep in idx.deps[path]:
            assert order.index(dep) < order.index(path), (dep, path)
    assert (
        position(order, "llc")
        < position(order, "stp")
        < position(order, "bridge")
        < position(order, "br_netfilter")
    )


def test_each_module_once_and_requests_keep_their_order() -> None:
    order = index().load_order(["virtio_blk", "virtio_pci", "virtio_blk", "virtio"])
    assert len(order) == len(set(order))
    assert position(order, "virtio_blk") < position(order, "virtio_pci")


def test_builtin_modules_are_skipped_and_dashes_accepted() -> None:
    order = index().load_order(["ext4", "jbd2", "virtio-rng"])
    names = [module_name(p) for p in order]
    assert "ext4" not in names and "jbd2" not in names
    assert names[-1] == "virtio_rng"


def test_missing_required_module_is_an_error_optional_is_skipped() -> None:
    assert index().load_order([("virtio_mmio", False), ("llc", True)]) == ["kernel/net/llc/llc.ko"]
    with pytest.raises(BuildError, match="virtio_mmio"):
        index().load_order([("virtio_mmio", True)])


def test_cycle_is_reported() -> None:
    idx = ModuleIndex({"a.ko": ["b.ko"], "b.ko": ["a.ko"]})
    with pytest.raises(BuildError, match="cycle"):
        idx.load_order(["a"])


def test_glob_selects_by_path() -> None:
    assert index().glob(["kernel/net/bridge/*", "kernel/net/llc/*"]) == ["br_netfilter", "bridge", "llc"]
    assert index().glob(["kernel/drivers/char/hw_random/virtio-rng.ko*"]) == ["virtio_rng"]
