"""QEMU's decisions and argv, with no I/O beyond cheap probes: what the qemu backend starts, unit-tested whole.

`qemu_args(spec, plan)` turns a spec and the host-side decisions (`Plan`: binary, accelerator, transport,
ports, file descriptors) into QEMU's argv. `settings` are the `boxpark.*` words the guest's init reads from
its command line (docs/boot.md). KVM: see `kvm_usable`; this host's /dev/kvm is PVM-only (stock kernels
hang under it), which the probe recognises.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..spec import MachineSpec, host_arch
from .base import API_PORT

GUEST_API_PORT = API_PORT
SECRET_FWCFG = "opt/boxpark/secret"
USER_NET_GUEST = "10.0.2.15/24"
USER_NET_HOST = "10.0.2.2"  # slirp's gateway: the host's loopback, seen from the guest
USER_NET_DNS = "10.0.2.3"
DEFAULT_CPUS = 2
DEFAULT_MEMORY = 2048
# TCG's translation cache in MiB (-accel tcg,tb-size; KVM has none): QEMU's default, 1 GiB on a 64-bit host,
# fills with the guest's code as it runs and stays resident (~560 MiB of an idle machine's RSS after boot and
# dockerd's start). 128 took ~370 MiB off the idle RSS with no boot slowdown that showed (docs/backends.md).
TCG_TB_SIZE = 128
BINARIES = {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}
# qboot: a minimal x86 firmware that only boots the -kernel QEMU hands over (Debian's qemu-system-data has
# it). Under TCG it reaches the kernel 1-2 s before SeaBIOS does, which probes and runs option ROMs first.
QBOOT = "/usr/share/qemu/qboot.rom"
# Kernel words for a fast boot (bench/boot.py measures them): the crypto self-tests of every algorithm
# built in (~0.3 s under TCG) are for hardware that may be faulty, not for emulated CPUs.
FAST_KERNEL_ARGS = "cryptomgr.notests"


def kvm_usable(arch: str) -> tuple[bool, str]:
    """Whether to use KVM for an `arch` guest, and why. `BOXPARK_KVM=1`/`0` decides outright.

    Otherwise a cheap probe that boots nothing: same architecture, /dev/kvm opens read-write, and (on x86)
    a hardware KVM module is loaded — kvm_intel or kvm_amd — and kvm_pvm is not. A PVM-only /dev/kvm (as on
    this project's build hosts) answers every ioctl yet hangs a stock kernel, so it must not be picked.
    """
    forced = os.environ.get("BOXPARK_KVM")
    if forced in ("0", "1"):
        return forced == "1", f"BOXPARK_KVM={forced}"
    if arch != host_arch():
        return False, f"a {arch} guest on a {host_arch()} host"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return False, f"/dev/kvm: {exc.strerror}"
    if arch == "amd64":
        if os.path.exists("/sys/module/kvm_pvm"):
            return False, "/dev/kvm is PVM (kvm_pvm), which does not boot stock kernels"
        if not (os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd")):
            return False, "neither kvm_intel nor kvm_amd is loaded"
    return True, "/dev/kvm works"


def vsock_usable() -> bool:
    """vhost-vsock needs /dev/vhost-vsock on the host and AF_VSOCK in Python."""
    return os.path.exists("/dev/vhost-vsock") and hasattr(socket, "AF_VSOCK")


@dataclass
class Plan:
    """The host-side decisions `qemu_args` needs; everything a spec does not say."""

    binary: str
    accel: str = "tcg"  # tcg or kvm
    cpu: str | None = None  # -cpu; None: the default for the machine and accelerator
    transport: str = "user"  # user (tcp over slirp) or vsock
    api_port: int = 0  # user: the host port forwarded to the guest's API (0: QEMU picks one)
    events_port: int = 0  # the host port (or vsock port) the guest dials for the event stream
    cid: int = 0  # vsock: the guest's CID
    qmp_fd: int = -1  # a listening unix socket for QMP (made by us)
    secret_file: str | None = None  # user: handed over with -fw_cfg
    firmware: str | None = None  # -bios; None: QEMU's default (SeaBIOS on x86)
    kernel: str | None = None  # the file to boot instead of spec.kernel (x86: the PVH ELF unpacked from it)
    kernel_args: str = ""  # words added to the kernel command line (the default one, not a user's override)
    share_sockets: dict[str, str] = field(default_factory=dict)  # tag -> virtiofsd's socket path
    extra: list[str] = field(default_factory=list)  # more raw QEMU arguments, at the end


def default_cpu(arch: str, accel: str) -> str | None:
    if accel == "kvm":
        return "host"
    if arch == "arm64":
        return "cortex-a72"  # `max` is ~3x slower under TCG (pointer authentication emulation)
    return None  # x86 TCG: qemu64 (measured against max in bench/boot.py)


def firmware(arch: str) -> str | None:
    """qboot for an x86 guest where it is installed, else None (QEMU's default firmware)."""
    return QBOOT if arch == "amd64" and os.path.exists(QBOOT) else None


def settings(spec: MachineSpec, plan: Plan) -> dict[str, str]:
    """The `boxpark.*` settings the guest needs from this backend."""
    if plan.transport == "vsock":
        values = {"api": f"vsock:4294967295:{GUEST_API_PORT}", "events": f"vsock:2:{plan.events_port}"}
    else:
        # api_peers: the host's forwarded connections come from slirp's gateway (it rewrites the host's
        # loopback to it); the guest's containers reach 0.0.0.0:1024 too, from their own addresses.
        values = {"api": f"tcp:0.0.0.0:{GUEST_API_PORT}", "api_peers": USER_NET_HOST,
                  "events": f"tcp:{USER_NET_HOST}:{plan.events_port}", "secret": f"fwcfg:{SECRET_FWCFG}"}
    values["net"] = spec.net or f"static:{USER_NET_GUEST},{USER_NET_HOST},{USER_NET_DNS}"
    values["hostname"] = spec.name
    return values


def qemu_args(spec: MachineSpec, plan: Plan) -> list[str]:
    """QEMU's argv for `spec` under `plan` (pure: no I/O)."""
    cpus = spec.cpus or DEFAULT_CPUS
    memory = spec.memory or DEFAULT_MEMORY
    state = Path(spec.state_dir)
    args = [plan.binary]
    if spec.arch == "amd64":
        args += ["-machine", "q35"]
    else:
        args += ["-machine", "virt" + (",gic-version=max" if plan.accel == "kvm" else "")]
    args += ["-accel", f"tcg,tb-size={TCG_TB_SIZE}" if plan.accel == "tcg" else plan.accel]
    cpu = plan.cpu or default_cpu(spec.arch, plan.accel)
    if cpu:
        args += ["-cpu", cpu]
    args += ["-smp", str(cpus), "-m", f"{memory}M",
             "-nographic", "-nodefaults", "-no-user-config", "-no-reboot", "-S"]
    if spec.shares:  # vhost-user needs the guest's memory shared with virtiofsd
        args += ["-object", f"memory-backend-memfd,id=mem,size={memory}M,share=on", "-numa", "node,memdev=mem"]
    rtc = f"base={spec.rtc_base}" + (",clock=vm" if spec.rtc_clock == "vm" else "")
    args += ["-rtc", rtc]
    assert spec.kernel is not None
    if plan.firmware:
        args += ["-bios", plan.firmware]
    args += ["-kernel", plan.kernel or spec.kernel]
    if spec.initrd:
        args += ["-initrd", spec.initrd]
    extra = "panic=-1" + (f" {plan.kernel_args}" if plan.kernel_args else "")
    args += ["-append", spec.kernel_command_line(settings(spec, plan), extra=extra)]
    # The root first, so it is /dev/vda; extra disks follow as vdb, vdc, … (PCI slot order).
    args += ["-drive", f"file={_opt(spec.root)},if=none,id=root,format=raw,readonly=on",
             "-device", "virtio-blk-pci,drive=root,serial=root"]
    for i, disk in enumerate(spec.disks):
        name = disk.name or f"disk{i + 1}"
        args += ["-drive", f"file={_opt(disk.path)},if=none,id={name},format={disk.format},"
                           f"readonly={'on' if disk.read_only else 'off'}"
                           # The image stays sparse: the guest's trims punch holes in it, and blocks
                           # written as zeroes become holes too (docs/backends.md, "Disk back to the host").
                           + ("" if disk.read_only else ",discard=unmap,detect-zeroes=unmap"),
                 "-device", f"virtio-blk-pci,drive={name},serial={name}"]
    # Console (hvc0) and the init's log port: both always captured in the state directory.
    args += ["-device", "virtio-serial-pci,id=vser",
             "-chardev", f"file,id=console,path={_opt(str(state / 'console.log'))}",
             "-device", "virtconsole,chardev=console,bus=vser.0",
             "-chardev", f"file,id=initlog,path={_opt(str(state / 'init.log'))}",
             "-device", "virtserialport,chardev=initlog,bus=vser.0,name=boxpark.log"]
    args += ["-device", "virtio-rng-pci"]
    # The guest hands freed pages back by itself (free page reporting, CONFIG_PAGE_REPORTING); the balloon's
    # target moves only at the agent's word (host/balloon.py), to squeeze out the page cache.
    args += ["-device", "virtio-balloon-pci,id=balloon,free-page-reporting=on"]
    if plan.transport == "vsock":
        args += ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0",
                 "-device", f"vhost-vsock-pci,guest-cid={plan.cid}"]
    else:
        args += ["-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{plan.api_port}-:{GUEST_API_PORT}",
                 "-device", "virtio-net-pci,netdev=net0"]
    if plan.secret_file:
        args += ["-fw_cfg", f"name={SECRET_FWCFG},file={_opt(plan.secret_file)}"]
    for i, (tag, path) in enumerate(sorted(plan.share_sockets.items())):
        args += ["-chardev", f"socket,id=fs{i},path={_opt(path)}",
                 "-device", f"vhost-user-fs-pci,chardev=fs{i},tag={tag}"]
    if plan.qmp_fd >= 0:
        args += ["-chardev", f"socket,id=qmp,fd={plan.qmp_fd},server=on,wait=off",
                 "-mon", "chardev=qmp,mode=control"]
    # A second QMP monitor for people and tests (the backend keeps the first): state/qmp-user.sock.
    args += ["-chardev", f"socket,id=qmpuser,path={_opt(str(state / 'qmp-user.sock'))},server=on,wait=off",
             "-mon", "chardev=qmpuser,mode=control"]
    return args + plan.extra


def _opt(value: str) -> str:
    """A value inside a QEMU option list: commas are doubled."""
    return value.replace(",", ",,")


