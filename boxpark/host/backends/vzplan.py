"""The vz backend's plan: every Virtualization.framework object and setting for a spec, as plain data.

`make_plan(spec, limits)` reads the spec, checks everything VZ would refuse or boot wrong — a kernel
that is not a raw arm64 `Image`, a disk whose size is not a whole number of 512-byte sectors, memory or
CPUs outside VZ's range, a qcow2 disk, an RTC setting VZ cannot give — and returns a `VzPlan`, raising a
`SpecError` naming the value otherwise. No PyObjC here: on macOS `vz.py` executes the plan (one VZ object
per entry) and reads `VzLimits` from VZVirtualMachineConfiguration; here tests pass the limits in.

The guest sees what the qemu backend gives it, so the init needs no VZ special case: the root on
/dev/vda, extra disks after it with their names as serials, the console on hvc0 and a port named
`boxpark.log` (both to files in the state directory), the API on vsock port 1024, the event stream
dialled to vsock CID 2 (the host). Differences: NAT networking (the guest asks DHCP), no RTC (the
agent's time push sets the clock), and Rosetta as a virtiofs share tagged `rosetta`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Literal

from ..spec import Disk, MachineSpec, SpecError

GUEST_API_PORT = 1024  # the guest's API on vsock (as under qemu)
EVENTS_PORT = 1025  # where the host's VZVirtioSocketListener takes the guest's event-stream dials
HOST_CID = 2  # VZ's host, as the guest sees it
ANY_CID = 4294967295  # VMADDR_CID_ANY: the guest's API listens on every CID
DEFAULT_CPUS = 2
DEFAULT_MEMORY_MIB = 2048
GUEST_MIN_MEMORY_MIB = 256  # the kernel, the unpacked initramfs and the init; dockerd wants more
SECTOR = 512
ROSETTA_TAG = "rosetta"  # the guest mounts it at /run/rosetta (boxpark.guest.binfmt)
ROSETTA_DIR = "/run/rosetta"
GUEST_PYTHON = ("python3", "-SI", "-c")
GUEST_LIBRARY = "/usr/lib/boxpark/python"
ARM64_MAGIC_OFFSET = 56
ARM64_MAGIC = b"ARM\x64"

RosettaChoice = Literal["auto", "on", "off"]
RosettaAvailability = Literal["installed", "not-installed", "unsupported"]


class PlanError(SpecError):
    """The spec asks for what VZ cannot do; `field` names it (a `SpecError`, so callers catch one kind)."""


@dataclass(frozen=True)
class VzLimits:
    """What this Mac's VZ allows (VZVirtualMachineConfiguration's class properties, and the host)."""

    min_memory: int  # bytes
    max_memory: int
    min_cpus: int
    max_cpus: int
    rosetta: RosettaAvailability = "unsupported"  # VZLinuxRosettaDirectoryShare.availability
    host_arch: str = "arm64"


@dataclass(frozen=True)
class BootLoader:
    """VZLinuxBootLoader."""

    kernel: str
    initrd: str | None
    command_line: str


@dataclass(frozen=True)
class BlockDevice:
    """VZVirtioBlockDeviceConfiguration over VZDiskImageStorageDeviceAttachment; `identifier` is the serial."""

    path: str
    read_only: bool
    identifier: str
    size: int


@dataclass(frozen=True)
class DirectoryShare:
    """VZVirtioFileSystemDeviceConfiguration(tag) with a VZSingleDirectoryShare of `path`."""

    tag: str
    path: str
    read_only: bool = False


@dataclass(frozen=True)
class RosettaShare:
    """VZVirtioFileSystemDeviceConfiguration(tag) with a VZLinuxRosettaDirectoryShare."""

    tag: str = ROSETTA_TAG


@dataclass(frozen=True)
class ConsolePort:
    """A port of the VZVirtioConsoleDeviceConfiguration, written to `path` (VZFileHandleSerialPortAttachment).

    Port 0 is the console (hvc0); the others are found in the guest by `name` under /sys/class/virtio-ports.
    """

    name: str
    path: str
    is_console: bool = False


@dataclass(frozen=True)
class Network:
    """VZVirtioNetworkDeviceConfiguration with a VZNATNetworkDeviceAttachment (the guest asks DHCP)."""

    mac: str
    attachment: Literal["nat"] = "nat"


@dataclass(frozen=True)
class SocketDevice:
    """VZVirtioSocketDeviceConfiguration: the host listens on `listen_ports`, dials the guest on `api_port`."""

    api_port: int = GUEST_API_PORT
    listen_ports: tuple[int, ...] = (EVENTS_PORT,)


@dataclass(frozen=True)
class VzPlan:
    """Everything the executor makes, in the order it makes it; `devices()` lists them for people and tests."""

    name: str
    cpus: int
    memory: int  # bytes
    boot: BootLoader
    disks: tuple[BlockDevice, ...]  # the root first: /dev/vda, then /dev/vdb, …
    shares: tuple[DirectoryShare, ...]
    rosetta: RosettaShare | None
    socket: SocketDevice
    console: tuple[ConsolePort, ...]
    network: Network | None
    entropy: bool = True  # VZVirtioEntropyDeviceConfiguration
    balloon: bool = True  # VZVirtioTraditionalMemoryBalloonDeviceConfiguration
    notes: list[str] = field(default_factory=list)  # what the plan decided and why (e.g. Rosetta off)

    def devices(self) -> list[tuple[str, dict[str, object]]]:
        """(VZ class, settings) for every object the executor creates."""
        out: list[tuple[str, dict[str, object]]] = [
            ("VZVirtualMachineConfiguration", {"cpus": self.cpus, "memory": self.memory}),
            ("VZLinuxBootLoader", {"kernel": self.boot.kernel, "initrd": self.boot.initrd,
                                   "command_line": self.boot.command_line}),
        ]
        for disk in self.disks:
            out.append(("VZVirtioBlockDeviceConfiguration", {"path": disk.path, "read_only": disk.read_only,
                                                             "identifier": disk.identifier, "size": disk.size}))
        for share in self.shares:
            out.append(("VZVirtioFileSystemDeviceConfiguration", {"tag": share.tag, "path": share.path,
                                                                  "read_only": share.read_only}))
        if self.rosetta is not None:
            out.append(("VZLinuxRosettaDirectoryShare", {"tag": self.rosetta.tag}))
        out.append(("VZVirtioSocketDeviceConfiguration", {"api_port": self.socket.api_port,
                                                          "listen_ports": self.socket.listen_ports}))
        for port in self.console:
            out.append(("VZVirtioConsolePortConfiguration", {"name": port.name, "path": port.path,
                                                             "is_console": port.is_console}))
        if self.network is not None:
            out.append(("VZVirtioNetworkDeviceConfiguration", {"attachment": self.network.attachment,
                                                               "mac": self.network.mac}))
        if self.entropy:
            out.append(("VZVirtioEntropyDeviceConfiguration", {}))
        if self.balloon:
            out.append(("VZVirtioTraditionalMemoryBalloonDeviceConfiguration", {}))
        return out


# ------------------------------------------------------------------------------------ checks


def kernel_problem(path: str) -> str | None:
    """Why `path` is not a kernel VZLinuxBootLoader boots on arm64 (a raw `Image`), or None when it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if head[:2] == b"\x1f\x8b":
        return f"{path} is gzip-compressed; VZ boots only a raw arm64 Image: gunzip it (the image build does)"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return f"{path} is zstd-compressed; VZ boots only a raw arm64 Image: zstd -d it"
    if head[:6] == b"\xfd7zXZ\x00":
        return f"{path} is xz-compressed; VZ boots only a raw arm64 Image: xz -d it"
    if head[:2] == b"MZ" and head[4:8] == b"zimg":
        kind = head[24:32].rstrip(b"\0").decode("ascii", "replace") or "compressed"
        return (f"{path} is an EFI zImage ({kind} inside); VZ boots only a raw arm64 Image: "
                f"extract the payload (the image build does)")
    if len(head) >= 0x3C and head[ARM64_MAGIC_OFFSET:ARM64_MAGIC_OFFSET + 4] == ARM64_MAGIC:
        return None
    if len(head) < 64:
        return f"{path} is too short to be a kernel ({len(head)} bytes)"
    try:
        with open(path, "rb") as f:
            f.seek(0x202)
            if f.read(4) == b"HdrS":
                return f"{path} is an x86 bzImage; the vz backend boots an arm64 Image"
    except OSError:
        pass
    return (f"{path} is not a raw arm64 Image (no \"ARM\\x64\" magic at offset {ARM64_MAGIC_OFFSET}); "
            f"use the arm64 image's vmlinuz")


def _disk_size(key: str, path: str) -> int:
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise PlanError(key, f"cannot stat {path}: {exc.strerror}") from None
    if size == 0:
        raise PlanError(key, f"{path} is empty")
    if size % SECTOR:
        raise PlanError(key, f"{path} is {size} bytes, not a multiple of {SECTOR}: VZ refuses it; pad it "
                             f"(truncate -s {(size + SECTOR - 1) // SECTOR * SECTOR} {path})")
    return size


def mac_address(seed: str) -> str:
    """A stable, locally administered unicast MAC from `seed`: the same machine keeps its DHCP lease."""
    digest = bytearray(hashlib.sha256(seed.encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in digest)


def guest_settings(spec: MachineSpec) -> dict[str, str]:
    """The `boxpark.*` settings the guest needs from the vz backend."""
    return {"api": f"vsock:{ANY_CID}:{GUEST_API_PORT}", "events": f"vsock:{HOST_CID}:{EVENTS_PORT}",
            "net": spec.net or "dhcp", "hostname": spec.name}


def rosetta_setup_argv(interpreter: str = f"{ROSETTA_DIR}/rosetta") -> list[str]:
    """What the host runs in the guest, after mounting the share, to register Rosetta for x86_64 ELF."""
    code = (f"import sys; sys.path.insert(0, {GUEST_LIBRARY!r}); from boxpark.guest import binfmt; "
            f"print(binfmt.register(sys.argv[1]))")
    return [*GUEST_PYTHON, code, interpreter]


# ------------------------------------------------------------------------------------ the plan


def make_plan(spec: MachineSpec, limits: VzLimits, *, rosetta: RosettaChoice = "auto") -> VzPlan:
    """The plan for `spec` on a Mac with `limits`; `SpecError` naming the first value VZ cannot take."""
    spec.validate()
    notes: list[str] = []
    if limits.host_arch != "arm64":
        raise PlanError("arch", f"the vz backend runs arm64 guests on Apple silicon; this Mac (or this Python, "
                                f"if it runs under Rosetta) is {limits.host_arch}: use backend = \"qemu\"")
    if spec.arch != "arm64":
        raise PlanError("arch", f"must be arm64 on Apple silicon (VZ runs the host's architecture), not "
                                f"{spec.arch!r}; amd64 programs run in the arm64 guest through Rosetta")
    if not spec.kernel:
        raise PlanError("kernel", "the vz backend boots a kernel: set kernel (and initrd)")
    problem = kernel_problem(spec.kernel)
    if problem:
        raise PlanError("kernel", problem)

    cpus = DEFAULT_CPUS if spec.cpus is None else spec.cpus
    if not limits.min_cpus <= cpus <= limits.max_cpus:
        raise PlanError("cpus", f"{cpus} is outside what VZ allows on this Mac "
                                f"({limits.min_cpus}-{limits.max_cpus})")
    memory_mib = DEFAULT_MEMORY_MIB if spec.memory is None else spec.memory
    memory = memory_mib * 1024 * 1024
    if memory_mib < GUEST_MIN_MEMORY_MIB:
        raise PlanError("memory", f"{memory_mib} MiB is below the guest's minimum of {GUEST_MIN_MEMORY_MIB} MiB")
    if memory < limits.min_memory:
        raise PlanError("memory", f"{memory_mib} MiB is below VZ's minimum of {limits.min_memory >> 20} MiB")
    if memory > limits.max_memory:
        raise PlanError("memory", f"{memory_mib} MiB is above VZ's maximum on this Mac of "
                                  f"{limits.max_memory >> 20} MiB")

    if spec.rtc_base != "utc" or spec.rtc_clock != "host":
        raise PlanError("rtc_base" if spec.rtc_base != "utc" else "rtc_clock",
                        "VZ gives the guest no RTC (the host pushes its time): leave rtc_base=utc, rtc_clock=host")
    if spec.events is not None:
        raise PlanError("events", f"the guest dials the vz host over vsock (port {EVENTS_PORT}); "
                                  f"leave events unset, not {spec.events!r}")
    if spec.api is not None:
        raise PlanError("api", f"the agent dials the guest's API over vsock (port {GUEST_API_PORT}); "
                               f"leave api unset, not {spec.api!r}")

    disks = [BlockDevice(spec.root, True, "root", _disk_size("root", spec.root))]
    for i, disk in enumerate(spec.disks):
        disks.append(_block_device(i, disk))

    shares = tuple(DirectoryShare(tag, path) for tag, path in sorted(spec.shares.items()))
    share = None
    if ROSETTA_TAG in spec.shares:
        raise PlanError(f"shares[{ROSETTA_TAG!r}]", f"the tag {ROSETTA_TAG!r} is Rosetta's; pick another")
    if rosetta not in ("auto", "on", "off"):
        raise PlanError("rosetta", f"auto, on or off, not {rosetta!r}")
    if rosetta != "off":
        if limits.rosetta == "installed":
            share = RosettaShare()
        elif rosetta == "on":
            how = ("install it: softwareupdate --install-rosetta --agree-to-license"
                   if limits.rosetta == "not-installed" else "this Mac or macOS has none (macOS 13 or later)")
            raise PlanError("rosetta", f"Rosetta for Linux is {limits.rosetta.replace('-', ' ')}: {how}")
        else:
            notes.append(f"Rosetta is {limits.rosetta.replace('-', ' ')}: amd64 containers will not run")

    state = spec.state
    console = (ConsolePort("console", str(state / "console.log"), is_console=True),
               ConsolePort("boxpark.log", str(state / "init.log")))
    network = None if spec.net == "none" else Network(mac_address(f"{spec.name}:{spec.state_dir}"))
    line = spec.kernel_command_line(guest_settings(spec), extra="panic=-1")
    return VzPlan(name=spec.name, cpus=cpus, memory=memory, boot=BootLoader(spec.kernel, spec.initrd, line),
                  disks=tuple(disks), shares=shares, rosetta=share, socket=SocketDevice(), console=console,
                  network=network, notes=notes)


def _block_device(i: int, disk: Disk) -> BlockDevice:
    key = f"disks[{i}]"
    if disk.format != "raw":
        raise PlanError(f"{key}.format", f"VZ attaches raw disk images only, not {disk.format} "
                                         f"(qemu-img convert -O raw {disk.path} OUT.img)")
    return BlockDevice(disk.path, disk.read_only, disk.name or f"disk{i + 1}", _disk_size(f"{key}.path", disk.path))
