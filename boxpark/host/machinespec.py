"""A configured machine's spec: boxpark.toml and the machine's directory turned into a `MachineSpec`.

The bridge from the user's configuration to the backend contract, on the agent's side: backends take a
spec and never read the configuration, the machine state or the image builder themselves.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .config import Config, expand
from .spec import Disk, MachineSpec, spec_from_image
from .state import Machine


def spec_from_config(config: Config, machine: Machine, data_disk: str | os.PathLike[str] | None = None) -> MachineSpec:
    """The spec of a configured machine (boxpark.toml): its image, sizes, data disk and virtiofs shares.

    The backend's files (sockets, secret, QEMU's log, pid files, console.log, init.log) go to
    `machine.backend_dir`; console.log and init.log are linked from the machine's directory too.
    The data disk comes first among the extra disks (/dev/vdb). Each virtiofs mount (the home share last)
    gets a tag `shareN`; `spec.share_targets` maps its guest mount point to the tag. On the home share the
    guest's root acts as the home's owner (`spec.share_owners`), where the backend can do it.
    """
    state = Path(machine.backend_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    arch = config.guest_arch
    image = expand(config.image) if config.image else _default_image_dir(arch)
    fields: dict[str, Any] = {"arch": arch, "console": config.console, "name": machine.name}
    fields.update(cpus=config.cpus, memory=config.memory_bytes // (1024 * 1024))  # the sandbox: its cgroup's limits
    if config.backend != "sandbox":
        if config.kernel:
            fields["kernel"] = expand(config.kernel)
        if config.initrd:
            fields["initrd"] = expand(config.initrd)
    else:
        fields.update(kernel=None, initrd=None)
    if config.cmdline:
        fields["command_line"] = config.cmdline
    if data_disk is not None:
        fields["disks"] = (Disk(str(data_disk), name="data"),)
    shares: dict[str, str] = {}
    targets: dict[str, str] = {}
    owners: dict[str, tuple[int, int]] = {}
    home = config.home_mount()
    for mount in config.all_mounts():
        if mount.type == "virtiofs":
            tag = f"share{len(shares)}"
            shares[tag] = expand(mount.source)
            targets[mount.target] = tag
            if mount == home:
                owner = _owner(home.source)
                if owner is not None:
                    owners[tag] = owner
    fields.update(shares=shares, share_targets=targets, share_owners=owners)
    spec = spec_from_image(image, state, **fields)
    for name in ("console.log", "init.log"):
        link = Path(machine.dir) / name
        if not link.exists() or link.is_symlink():
            with contextlib.suppress(OSError):
                link.unlink(missing_ok=True)
                link.symlink_to(state / name)
    return spec


def _owner(directory: str) -> tuple[int, int] | None:
    """The home's (uid, gid): the guest's root acts as them on the home share; None for root's own home."""
    try:
        info = os.stat(directory)
    except OSError:
        return None
    return (info.st_uid, info.st_gid) if info.st_uid != 0 else None


def _default_image_dir(arch: str) -> str:
    try:
        from ..image.build import default_image_dir
    except ImportError:
        from ..dirs import cache_home

        return str(cache_home() / "images" / arch)
    return str(default_image_dir(arch, with_docker=True))
