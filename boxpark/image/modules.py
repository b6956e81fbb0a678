"""Kernel modules: which ones the guest needs, and the order to load them in.

Debian's cloud kernel builds the drivers a guest boots with as modules (virtio, squashfs, overlay, vsock),
and busybox's insmod knows nothing of dependencies, so the order is worked out here, at build time, from
the kernel's own `modules.dep` (which depmod writes) and `modules.builtin`. Pure logic over those files.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .subp import BuildError

# Loaded by the initramfs, before the root is mounted: what booting and the init's first steps need.
# (name, required) — an optional module may be missing (e.g. virtio_mmio on a kernel that builds it in).
BOOT_MODULES: tuple[tuple[str, bool], ...] = (
    ("virtio_pci", True),
    ("virtio_mmio", False),
    ("virtio_blk", True),
    ("virtio_console", True),
    ("virtio_net", True),
    ("virtio_rng", True),
    ("virtio_balloon", True),  # free page reporting from the first page freed: memory back to the host
    ("squashfs", True),
    ("overlay", True),
    ("vsock", True),
    ("vmw_vsock_virtio_transport", True),
    ("fuse", True),
    ("virtiofs", True),
    ("ext4", True),
    ("qemu_fw_cfg", False),  # QEMU hands the machine secret over with -fw_cfg; VZ has none
)

# Copied into the root's /lib/modules for modprobe (dockerd and the kernel's request_module load them
# on demand). Paths are globs relative to /lib/modules/<release>/.
ROOT_MODULE_GLOBS: tuple[str, ...] = (
    "kernel/fs/xfs/*",
    "kernel/fs/ext4/*",
    "kernel/drivers/block/loop.ko*",
    "kernel/drivers/net/tun.ko*",
    "kernel/drivers/net/dummy.ko*",
    # binfmt_misc: foreign-arch programs through an interpreter (Rosetta on a Mac, qemu-user elsewhere)
    "kernel/fs/binfmt_misc.ko*",
    # vsock_loopback: a guest process reaches the guest's own vsock listeners at CID 1, so the API over
    # AF_VSOCK (the Mac's path) is tested under QEMU, whose host here has no vhost-vsock (tests/vm/test_vsock.py)
    "kernel/net/vmw_vsock/vsock_loopback.ko*",
)
DOCKER_MODULE_GLOBS: tuple[str, ...] = (
    "kernel/fs/overlayfs/*",
    "kernel/net/netfilter/*",
    "kernel/net/netfilter/ipvs/*",
    "kernel/net/ipv4/netfilter/*",
    "kernel/net/ipv6/netfilter/*",
    "kernel/net/bridge/*",
    "kernel/net/bridge/netfilter/*",
    "kernel/net/802/*",
    "kernel/net/llc/*",
    "kernel/net/sched/cls_cgroup.ko*",
    # overlay networks' encryption (dockerd warns at start when it cannot open an XFRM socket)
    "kernel/net/xfrm/xfrm_user.ko*",
    "kernel/net/xfrm/xfrm_algo.ko*",
    "kernel/net/ipv4/esp4.ko*",
    "kernel/net/ipv6/esp6.ko*",
    "kernel/drivers/net/veth.ko*",
    "kernel/drivers/net/macvlan.ko*",
    "kernel/drivers/net/ipvlan/*",
    "kernel/drivers/net/vxlan/*",
    "kernel/drivers/net/vxlan.ko*",
)

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str) -> str:
    """`kernel/drivers/char/hw_random/virtio-rng.ko.xz` -> `virtio_rng` (the kernel treats - and _ alike)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """`path: dep dep ...` lines -> {path: [dep paths]} (each module's dependencies, transitively)."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        head, sep, tail = line.partition(":")
        if sep and head.strip():
            deps[head.strip()] = tail.split()
    return deps


def parse_builtin(text: str) -> set[str]:
    """modules.builtin (one path per line) -> names of modules compiled into the kernel image."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


@dataclass
class ModuleIndex:
    """The modules of one kernel release: dependency lists by path, paths by name, built-in names."""

    deps: dict[str, list[str]]
    builtin: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.by_name = {module_name(path): path for path in self.deps}

    @classmethod
    def load(cls, moddir: Path) -> ModuleIndex:
        """Read <moddir>/modules.dep (run depmod first) and modules.builtin."""
        try:
            deps = parse_modules_dep((moddir / "modules.dep").read_text(encoding="utf-8"))
        except OSError as exc:
            raise BuildError(f"cannot read the kernel's module list: {exc}") from None
        builtin_file = moddir / "modules.builtin"
        builtin = parse_builtin(builtin_file.read_text(encoding="utf-8")) if builtin_file.exists() else set()
        return cls(deps, builtin)

    def glob(self, patterns: Iterable[str]) -> list[str]:
        """Names of the modules whose paths match any of the glob patterns, in path order."""
        pats = list(patterns)
        return [
            module_name(path)
            for path in sorted(self.deps)
            if any(fnmatch.fnmatchcase(path, pat) for pat in pats)
        ]

    def load_order(self, wanted: Iterable[tuple[str, bool] | str]) -> list[str]:
        """Module paths to load, each after everything it depends on, each once.

        `wanted` holds names, or (name, required) pairs. A name built into the kernel is skipped; a required
        name that is neither built in nor a module is an error.
        """
        order: list[str] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(path: str) -> None:
            if path in done:
                return
            if path in visiting:
                raise BuildError(f"kernel modules depend on each other in a cycle at {path}")
            visiting.add(path)
            for dep in self.deps.get(path, []):
                visit(dep)
            visiting.discard(path)
            done.add(path)
            order.append(path)

        missing = []
        for item in wanted:
            name, required = (item, True) if isinstance(item, str) else item
            name = name.replace("-", "_")
            if name in self.builtin:
                continue
            path = self.by_name.get(name)
            if path is None:
                if required:
                    missing.append(name)
                continue
            visit(path)
        if missing:
            raise BuildError(
                f"the kernel has no module (and no built-in driver) named: {', '.join(missing)}",
                hint="is this a Debian cloud kernel? the image builder expects its module set",
            )
        return order
