"""The initialization phase, after Ready and before the service: data disk, swap, mounts, CA certificates.

The data disk is mounted to give deleted space back to the host wherever its device takes discards
(`mount_options`); what the device offers is kept on the plan for `status`.

Disk resize is crash-safe by construction: the host writes the pending record before boot, *before* the
image grows, every step after is idempotent (growing a file to a size, rebooting, growing a filesystem to
its device), and the record is removed only when the guest's filesystem has the new size. An agent killed
anywhere in between finds the record on the next `up` and finishes the job. A disk is never shrunk: a
smaller `disk.size`, or one below a pending resize, is ignored with a message.

The image grows while the guest runs (DESIGN §1: the resize is the first step after Ready). A backend that
can show a running guest a grown disk does it (`grows_disks_online`: QEMU's block_resize); on one that
cannot (VZ), the host grows the file and reboots the guest, which then sees the new size.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

from .. import protocol
from ..transport import RemoteError
from .client import GuestClient
from .config import Config, Mount, expand, pem_certificates, sorted_mounts
from .spec import SHARES_DIR, MachineSpec
from .state import Machine

if TYPE_CHECKING:
    from .backends.base import Backend

log = logging.getLogger("boxpark.agent.init")

DATA_DEVICE = "/dev/vdb"
DATA_MOUNT = "/var/lib/boxpark"
SWAP_FILE = f"{DATA_MOUNT}/swapfile"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's bundle: Go (dockerd), OpenSSL, curl, Python read it
CA_DIR = "/usr/local/share/ca-certificates/boxpark"  # where update-ca-certificates would find them again


class InitError(Exception):
    """A step of the initialization phase failed; the message names it and says what to do."""


DATA_DISK = "data"  # the data disk's name in the machine spec (machinespec.spec_from_config)
NO_DISCARD = ("the data disk offers no discard: space freed in the guest stays allocated in its image "
              "on the host (status says so too)")
SECTOR = 512  # an image's size is a whole number of sectors (VZ refuses anything else)


@dataclass
class DiskPlan:
    """What the data disk needs after Ready: `size` is what it is to become (never less than it is)."""

    path: Path
    size: int
    new: bool
    resize_pending: bool
    note: str = ""  # for the person running `up` (a size that was not applied, and why)
    discard_max: int | None = None  # after Ready: the most one trim of the disk may cover; 0: it offers none


def prepare_data_disk(machine: Machine, config: Config) -> DiskPlan | None:
    """Before boot: create a new image, or record the resize that is due. Never shrinks, never grows here."""
    size = -(-config.disk_bytes // SECTOR) * SECTOR
    if not size:
        return None
    path = Path(os.path.expanduser(config.disk.path)) if config.disk.path else machine.data_disk
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        machine.pending_resize_file.unlink(missing_ok=True)
        return DiskPlan(path, size, new=True, resize_pending=False)
    current = path.stat().st_size
    pending = _pending_size(machine, path)
    target = max(size, pending, current)
    note = ""
    if current > size or pending > size:
        note = (f"the data disk stays at {target >> 20} MiB: disk.size is {size >> 20} MiB, and a disk is "
                f"never shrunk")
        log.warning("%s", note)
    if target == current and not pending:
        return DiskPlan(path, current, new=False, resize_pending=False, note=note)
    if pending != target:
        machine.write_json(machine.pending_resize_file, {"path": str(path), "size": target, "from": current})
    return DiskPlan(path, target, new=False, resize_pending=True, note=note)


def _pending_size(machine: Machine, path: Path) -> int:
    """The size a resize that did not finish was going to (0: none, or one for another image)."""
    record = machine.read_json(machine.pending_resize_file)
    if not isinstance(record, dict) or record.get("path") != str(path):
        return 0
    try:
        return max(0, int(record["size"]))
    except (KeyError, TypeError, ValueError):
        return 0


async def data_disk(client: GuestClient, machine: Machine, plan: DiskPlan, progress: Callable[[str], None],
                    backend: Backend, reboot: Callable[[str], Awaitable[GuestClient]]) -> GuestClient:
    """After Ready: format a new disk, grow the image, mount it at DATA_MOUNT, grow its filesystem.

    `reboot(why)` reboots the guest and returns a client of the new boot; this returns the client to go
    on with (a new one after a reboot).
    """
    if plan.new:
        progress("formatting the new data disk")
        await _run(client, ["mkfs.ext4", "-q", "-F", "-L", "boxpark-data", "-E",
                            "lazy_itable_init=1,lazy_journal_init=1", DATA_DEVICE], "format the data disk")
    if plan.resize_pending and await device_size(client) < plan.size:
        if backend.grows_disks_online:
            progress(f"growing the data disk to {plan.size >> 20} MiB")
            await backend.grow_disk(DATA_DISK, plan.size)
            await _until_seen(client, plan.size)
        else:
            with open(plan.path, "r+b") as f:  # the record is written: this is safe to repeat or abandon
                if os.fstat(f.fileno()).st_size < plan.size:
                    f.truncate(plan.size)
            client = await reboot(f"grew the data disk image to {plan.size >> 20} MiB; rebooting the guest, "
                                  f"which sees a grown disk only after a reboot on this backend")
            if await device_size(client) < plan.size:
                raise InitError(f"after a reboot the guest still sees a data disk smaller than "
                                f"{plan.size >> 20} MiB")
    plan.discard_max = await discard_max(client)
    log.info("data disk: the device takes discards of up to %d bytes", plan.discard_max)
    options = mount_options(plan.discard_max)
    await client.mount(DATA_DEVICE, DATA_MOUNT, "ext4", options, mkdir=True)
    if plan.resize_pending:
        progress(f"growing the data disk's filesystem to {plan.size >> 20} MiB")
        result = await client.resize_disk(DATA_DEVICE)
        if result.reboot_required:  # a partition table the kernel could not re-read while in use
            client = await reboot("rebooting the guest to finish the data disk's resize")
            await client.mount(DATA_DEVICE, DATA_MOUNT, "ext4", options, mkdir=True)
            result = await client.resize_disk(DATA_DEVICE)
            if result.reboot_required:
                raise InitError("the guest's kernel keeps the data disk's old size even after a reboot")
        machine.pending_resize_file.unlink(missing_ok=True)
        log.info("data disk: %s grown from %d to %d MiB", result.filesystem, result.old_size >> 20,
                 result.new_size >> 20)
    return client


async def discard_max(client: GuestClient, device: str = DATA_DEVICE) -> int:
    """The most one discard of `device` may cover, as the guest's kernel has it; 0 when the disk offers none
    (QEMU's does with discard=unmap; VZ has no setting, and its virtio-blk may or may not offer it)."""
    try:
        data = await client.read_file(f"/sys/class/block/{os.path.basename(device)}/queue/discard_max_bytes")
        return int(data.data)
    except (RemoteError, ValueError):  # a kernel without the file: no discard either
        return 0


def mount_options(discard_max: int) -> list[str]:
    """The data disk's mount options. Where the disk takes discards, ext4 trims what each journal commit
    frees (`discard`): a deleted layer's space is back in the host's file within seconds, with no timer in
    the guest; measured against a periodic fstrim in docs/backends.md ("Disk back to the host")."""
    return ["noatime"] + (["discard"] if discard_max > 0 else [])


async def device_size(client: GuestClient, device: str = DATA_DEVICE) -> int:
    """The size of a block device as the guest's kernel sees it now, in bytes."""
    data = await client.read_file(f"/sys/class/block/{os.path.basename(device)}/size")
    return int(data.data) * 512


async def _until_seen(client: GuestClient, size: int, timeout: float = 30.0) -> None:
    """Wait for the guest's kernel to take a disk's new capacity (virtio sends a config change)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await device_size(client) < size:
        if asyncio.get_running_loop().time() > deadline:
            raise InitError(f"the guest did not see the data disk grow to {size >> 20} MiB within {timeout:g} s")
        await asyncio.sleep(0.1)


async def swap(client: GuestClient, size: int, progress: Callable[[str], None], discard: bool = False) -> str:
    """A swap file of `size` bytes on the data disk, made once, then swapon; with `discard` (the disk gives
    freed space back) swap pages freed in the guest are given back to the disk image too."""
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
    await client.swapon(SWAP_FILE, discard=discard)
    return f"{size >> 20} MiB swap on" + (", freed pages discarded" if discard else "")


def share_sources(spec: MachineSpec, binds: bool) -> dict[str, tuple[str, str, list[str]]]:
    """Guest mount point -> (source, fstype, options) of the guest's Mount call for each share of `spec`:
    its virtiofs tag, or, where the backend `binds_shares` (the sandbox), the directory its preinit bound."""
    return {target: ((f"{SHARES_DIR}/{tag}", "", ["bind"]) if binds else (tag, "virtiofs", []))
            for target, tag in spec.share_targets.items()}


async def mounts(client: GuestClient, mounts_: list[Mount], shares: dict[str, tuple[str, str, list[str]]],
                 progress: Callable[[str], None]) -> list[str]:
    """Mount parent-first; a failure stops `up` with the mount named, unless the mount is optional.

    `shares` says how the guest mounts each virtiofs share (by target): `share_sources`.
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
