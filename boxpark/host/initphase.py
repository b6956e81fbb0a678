"""The initialization phase, after Ready and before the service: data disk, swap, mounts, CA certificates.

Disk resize is crash-safe by construction: the host writes the pending record *before* it grows the image
file, every step after is idempotent (growing a file to a size, growing a filesystem to its device), and
the record is removed only when the guest's filesystem has the new size. An agent killed anywhere in
between finds the record on the next `up` and finishes the job; a disk is never shrunk.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import protocol
from ..transport import RemoteError
from .client import GuestClient
from .config import Config, Mount, expand, pem_certificates, sorted_mounts
from .state import Machine

log = logging.getLogger("boxpark.agent.init")

DATA_DEVICE = "/dev/vdb"
DATA_MOUNT = "/var/lib/boxpark"
SWAP_FILE = f"{DATA_MOUNT}/swapfile"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's bundle: Go (dockerd), OpenSSL, curl, Python read it
CA_DIR = "/usr/local/share/ca-certificates/boxpark"  # where update-ca-certificates would find them again


class InitError(Exception):
    """A step of the initialization phase failed; the message names it and says what to do."""


@dataclass
class DiskPlan:
    """What the host did to the data disk image before boot, for the guest-side steps after Ready."""

    path: Path
    size: int
    new: bool
    resize_pending: bool


def prepare_data_disk(machine: Machine, config: Config) -> DiskPlan | None:
    """Before boot: create the image, or grow it (recording the pending resize first). Never shrinks."""
    size = config.disk_bytes
    if not size:
        return None
    path = Path(os.path.expanduser(config.disk.path)) if config.disk.path else machine.data_disk
    pending = machine.read_json(machine.pending_resize_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        machine.pending_resize_file.unlink(missing_ok=True)
        return DiskPlan(path, size, new=True, resize_pending=False)
    current = path.stat().st_size
    if current > size and not pending:
        log.warning("the data disk is %d MiB, larger than disk.size %d MiB: disks are never shrunk",
                    current >> 20, size >> 20)
        return DiskPlan(path, current, new=False, resize_pending=False)
    if current < size or pending:
        target = max(size, int(pending.get("size", 0)) if isinstance(pending, dict) else 0, current)
        machine.write_json(machine.pending_resize_file, {"path": str(path), "size": target, "from": current})
        with open(path, "r+b") as f:
            f.truncate(target)
        return DiskPlan(path, target, new=False, resize_pending=True)
    return DiskPlan(path, current, new=False, resize_pending=False)


async def data_disk(client: GuestClient, machine: Machine, plan: DiskPlan,
                    progress: Callable[[str], None]) -> None:
    """After Ready: format a new disk, finish a pending resize, mount it at DATA_MOUNT."""
    if plan.new:
        progress("formatting the new data disk")
        await _run(client, ["mkfs.ext4", "-q", "-F", "-L", "boxpark-data", "-E",
                            "lazy_itable_init=1,lazy_journal_init=1", DATA_DEVICE], "format the data disk")
    await client.mount(DATA_DEVICE, DATA_MOUNT, "ext4", ["noatime"], mkdir=True)
    if plan.resize_pending:
        progress(f"growing the data disk's filesystem to {plan.size >> 20} MiB")
        result = await client.resize_disk(DATA_DEVICE)
        if result.reboot_required:
            raise InitError("the guest needs a reboot to finish the disk resize")  # not for a whole-disk fs
        machine.pending_resize_file.unlink(missing_ok=True)
        log.info("data disk: %s grown from %d to %d MiB", result.filesystem, result.old_size >> 20,
                 result.new_size >> 20)


async def swap(client: GuestClient, size: int, progress: Callable[[str], None]) -> str:
    """A swap file of `size` bytes on the data disk, made once, then swapon."""
    if not size:
        return "no swap (swap.size = 0)"
    try:
        existing = await client.stat(SWAP_FILE)
    except RemoteError as exc:
        if exc.code != protocol.ErrorCode.NOT_FOUND:
            raise
        existing = None
    if existing is None or existing.size != size:
        progress(f"making a {size >> 20} MiB swap file")
        await _run(client, ["rm", "-f", SWAP_FILE], "remove the old swap file")
        await _run(client, ["fallocate", "-l", str(size), SWAP_FILE], "allocate the swap file")
        await _run(client, ["chmod", "600", SWAP_FILE], "protect the swap file")
        await _run(client, ["mkswap", SWAP_FILE], "mkswap")
    await client.swapon(SWAP_FILE)
    return f"{size >> 20} MiB swap on"


async def mounts(client: GuestClient, mounts_: list[Mount], shares: dict[str, tuple[str, str, list[str]]],
                 progress: Callable[[str], None]) -> list[str]:
    """Mount parent-first; a failure stops `up` with the mount named, unless the mount is optional.

    `shares` says how the guest mounts each virtiofs share (by target): the backend's `share_sources`.
    """
    done = []
    for mount in sorted_mounts(mounts_):
        options = list(mount.options) + (["ro"] if mount.read_only else [])
        try:
            if mount.type == "virtiofs":
                source, fstype, how = shares[mount.target]
                await client.mount(source, mount.target, fstype, how + options, mkdir=True)
            else:
                await client.mount(mount.source, mount.target, mount.type, options, mkdir=True)
        except (RemoteError, KeyError) as exc:
            message = f"mount {mount.source} on {mount.target} failed: {exc}"
            if mount.optional:
                log.warning("%s (optional: going on)", message)
                continue
            raise InitError(message) from None
        progress(f"mounted {mount.source} on {mount.target}")
        done.append(mount.target)
    return done


async def _run(client: GuestClient, argv: list[str], what: str) -> None:
    result = await client.exec(argv, timeout=300)
    if result.code != 0:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        raise InitError(f"could not {what}: {argv[0]} exited with {result.code}"
                        + (f": {detail[-1]}" if detail else ""))


async def trust_certificates(client: GuestClient, files: list[str], progress: Callable[[str], None]) -> int:
    """Add the PEM certificates of `files` (host paths) to the guest's CA bundle; the number added.

    The guest's root is a fresh overlay on every boot, so this runs on every `up` and never piles up.
    Appending to the bundle is what update-ca-certificates would do, without its seconds of rehashing;
    the files are also left in CA_DIR, so a later update-ca-certificates in the guest keeps them.
    """
    if not files:
        return 0
    blocks: list[bytes] = []
    for i, name in enumerate(files):
        try:
            found = pem_certificates(Path(expand(name)).read_bytes())
        except OSError as exc:
            raise InitError(f"cannot read the CA certificate {name}: {exc.strerror}") from None
        blocks += found
        await client.write_file(f"{CA_DIR}/{i}-{Path(name).stem}.crt", b"".join(found), parents=True)
    await client.write_file(CA_BUNDLE, b"\n" + b"".join(blocks), append=True, parents=True)
    progress(f"{len(blocks)} extra CA certificate{'s' if len(blocks) != 1 else ''} trusted")
    return len(blocks)
