"""The machine spec: one description of a guest that every backend takes (qemu, sandbox, vz).

A spec says what to boot (kernel, initramfs, root image, disks, shares), how big (cpus, memory), how it
talks (console, addresses) and where its files go (the state directory). It never starts anything;
`validate()` checks it whole and raises `SpecError` naming the field. What a backend cannot do with a valid
spec (the sandbox has no extra disks, for example) that backend refuses in its own `check()`.

The kernel command line is built here, from the spec and the `boxpark.*` settings a backend needs
(docs/boot.md is the reference for those): `command_line=None` gives the default, a string replaces it
whole, verbatim.
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import BoxparkError
from ..transport import TransportError, parse_address

ARCHES = ("amd64", "arm64")
DEFAULT_KERNEL_ARGS = "root=/dev/vda rootfstype=squashfs"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the NUL
SOCKET_NAMES = ("events.sock", "api.sock", "qmp.sock")  # the longest name a backend puts in the state dir
SHARES_DIR = "/run/boxpark/shares"  # where a backend that binds shares (the sandbox) shows the guest each, by tag

_SETTING_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,35}$")  # virtiofs tags are at most 36 bytes
_DISK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,19}$")  # a virtio-blk serial is at most 20 bytes
_RTC_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2})?$")


class SpecError(ValueError):
    """The spec is wrong: `field` names it, the message says what to change."""

    def __init__(self, field_: str, reason: str) -> None:
        super().__init__(f"{field_}: {reason}")
        self.field = field_
        self.reason = reason


def host_arch() -> str:
    """This machine's architecture in Debian's words (amd64, arm64)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


@dataclass(frozen=True)
class Disk:
    """An extra block device after the root (/dev/vdb, /dev/vdc, … in order); `name` is its serial."""

    path: str
    read_only: bool = False
    format: Literal["raw", "qcow2"] = "raw"
    name: str = ""  # the guest sees it in /sys/block/vdX/serial; default disk1, disk2, …


@dataclass
class MachineSpec:
    """What to boot. Paths are host paths; `state_dir` holds console.log, init.log, sockets and the secret."""

    root: str  # the root image (squashfs), the guest's /dev/vda
    state_dir: str
    kernel: str | None = None  # the VM backends need both; the sandbox plays the kernel itself
    initrd: str | None = None
    arch: str = field(default_factory=host_arch)
    cpus: int | None = None  # None: the backend's default (qemu: 2; sandbox: no limit)
    memory: int | None = None  # MiB; None as for cpus (qemu: 2048)
    command_line: str | None = None  # None: the default; a string replaces the whole command line
    console: bool = False  # the guest's console on hvc0 (always captured in state/console.log)
    disks: tuple[Disk, ...] = ()
    shares: dict[str, str] = field(default_factory=dict)  # virtiofs tag -> host directory
    share_targets: dict[str, str] = field(default_factory=dict)  # guest mount point -> tag (for whoever mounts)
    share_owners: dict[str, tuple[int, int]] = field(default_factory=dict)  # tag -> host (uid, gid) the guest's
    #   root acts as on that share (qemu: virtiofsd in a user namespace); other tags: as the host's root
    api: str | None = None  # where the host dials the Guest API; None: the backend picks
    events: str | None = None  # where the host listens for the guest's event stream; None: the backend picks
    net: str | None = None  # boxpark.net; None: the backend's default (static user-net: qemu, sandbox+slirp4netns)
    settings: dict[str, str] = field(default_factory=dict)  # more boxpark.* settings, e.g. {"log": "debug"}
    rtc_base: str = "utc"  # qemu -rtc base=: utc, localtime, or YYYY-MM-DD[THH:MM:SS] (UTC)
    rtc_clock: Literal["host", "vm"] = "host"  # "vm": the RTC runs from rtc_base only while the guest runs
    name: str = "boxpark"

    # ------------------------------------------------------------------------------- paths

    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    def state_file(self, name: str) -> str:
        return str(Path(self.state_dir) / name)

    @property
    def console_log(self) -> str:
        return self.state_file("console.log")

    @property
    def init_log(self) -> str:
        return self.state_file("init.log")

    # ------------------------------------------------------------------------------- command line

    def kernel_command_line(self, settings: dict[str, str], extra: str = "") -> str:
        """The kernel command line: the user's override verbatim, else the default with `settings`.

        `settings` are the `boxpark.*` keys the backend needs (without the prefix); the spec's own
        `settings` are applied over them, so a user may set `log` or `hostname` without replacing the line.
        `extra` is what the backend adds to the kernel's own words (e.g. `panic=-1`).
        """
        if self.command_line is not None:
            return self.command_line
        words = [DEFAULT_KERNEL_ARGS, "console=hvc0" if self.console else "console=ttynull"]
        if extra:
            words.append(extra)
        merged = {**settings, **self.settings}
        words += [f"boxpark.{key}={value}" for key, value in merged.items()]
        return " ".join(words)

    # ------------------------------------------------------------------------------- checks

    def validate(self) -> MachineSpec:
        """Check every field; raise `SpecError` naming the first wrong one. Returns self."""
        if self.arch not in ARCHES:
            raise SpecError("arch", f"must be one of {', '.join(ARCHES)}, not {self.arch!r}")
        if self.cpus is not None and (isinstance(self.cpus, bool) or not 1 <= self.cpus <= 64):
            raise SpecError("cpus", f"must be between 1 and 64, not {self.cpus!r}")
        if self.memory is not None and (isinstance(self.memory, bool) or not 128 <= self.memory <= 1 << 20):
            raise SpecError("memory", f"must be between 128 and 1048576 MiB, not {self.memory!r}")
        _file("root", self.root)
        if self.kernel is not None:
            _file("kernel", self.kernel)
        if self.initrd is not None:
            _file("initrd", self.initrd)
        if not os.path.isabs(self.state_dir):
            raise SpecError("state_dir", f"must be an absolute path, not {self.state_dir!r}")
        longest = len(os.fsencode(self.state_dir)) + 1 + max(map(len, SOCKET_NAMES))
        if longest > MAX_SOCKET_PATH:
            raise SpecError("state_dir", f"{self.state_dir} is too long for the unix sockets that live in it "
                                         f"({longest} > {MAX_SOCKET_PATH} bytes); use a shorter directory")
        if os.path.exists(self.state_dir) and not os.path.isdir(self.state_dir):
            raise SpecError("state_dir", f"{self.state_dir} exists and is not a directory")
        if self.command_line is not None:
            if not self.command_line.strip() or "\n" in self.command_line or "\0" in self.command_line:
                raise SpecError("command_line", "must be one non-empty line (or None for the default)")
        names: set[str] = set()
        for i, disk in enumerate(self.disks):
            key = f"disks[{i}]"
            _file(f"{key}.path", disk.path)
            if disk.format not in ("raw", "qcow2"):
                raise SpecError(f"{key}.format", f"must be raw or qcow2, not {disk.format!r}")
            name = disk.name or f"disk{i + 1}"
            if not _DISK_NAME.match(name):
                raise SpecError(f"{key}.name", f"{name!r}: use 1-20 of letters, digits, '_', '.', '-'")
            if name in names:
                raise SpecError(f"{key}.name", f"{name!r} is used by another disk")
            names.add(name)
            if not disk.read_only and not os.access(disk.path, os.W_OK):
                raise SpecError(f"{key}.path", f"{disk.path} is not writable (set read_only=True?)")
        for target, tag in self.share_targets.items():
            if tag not in self.shares:
                raise SpecError(f"share_targets[{target!r}]", f"names the tag {tag!r}, which is not in shares")
        for tag, owner in self.share_owners.items():
            if tag not in self.shares:
                raise SpecError(f"share_owners[{tag!r}]", "names a tag which is not in shares")
            if len(owner) != 2 or not all(isinstance(i, int) and 0 <= i < 2**32 - 1 for i in owner) or not owner[0]:
                raise SpecError(f"share_owners[{tag!r}]", f"must be a (uid, gid) other than root, not {owner!r}")
        for tag, path in self.shares.items():
            if not _TAG.match(tag):
                raise SpecError(f"shares[{tag!r}]", "a tag is 1-36 of letters, digits, '_', '.', '-'")
            if not os.path.isdir(path):
                raise SpecError(f"shares[{tag!r}]", f"{path} is not a directory on this host")
        for key, text in (("api", self.api), ("events", self.events)):
            if text is not None:
                try:
                    parse_address(text)
                except TransportError as exc:
                    raise SpecError(key, str(exc)) from None
        for key, value in self.settings.items():
            if not _SETTING_KEY.match(key):
                raise SpecError(f"settings[{key!r}]", "a key is lower-case letters, digits and '_' (no boxpark.)")
            if not value or any(c.isspace() for c in value):
                raise SpecError(f"settings[{key!r}]", f"a value is one word without spaces, not {value!r}")
        if self.net is not None and (not self.net or any(c.isspace() for c in self.net)):
            raise SpecError("net", f"dhcp, none or static:ADDR/PREFIX,GATEWAY[,DNS…], not {self.net!r}")
        if self.rtc_base not in ("utc", "localtime") and not _RTC_TIME.match(self.rtc_base):
            raise SpecError("rtc_base", f"utc, localtime or YYYY-MM-DD[THH:MM:SS], not {self.rtc_base!r}")
        if self.rtc_clock not in ("host", "vm"):
            raise SpecError("rtc_clock", f"host or vm, not {self.rtc_clock!r}")
        if not re.match(r"^[a-z0-9][a-z0-9_-]{0,31}$", self.name):
            raise SpecError("name", f"use 1-32 of a-z, 0-9, '-' and '_', not {self.name!r}")
        return self


def _file(key: str, path: str | None) -> None:
    if not path:
        raise SpecError(key, "no path given")
    if not os.path.exists(path):
        raise SpecError(key, f"{path} does not exist")
    if not os.path.isfile(path) and not _is_block(path):
        raise SpecError(key, f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise SpecError(key, f"{path} is not readable")


def _is_block(path: str) -> bool:
    import stat

    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- images


class MissingImageError(BoxparkError):
    """The image directory is missing or incomplete; the message says what to run."""


def image_manifest(image_dir: str | os.PathLike[str]) -> dict[str, object]:
    """The image's manifest.json, or raise `MissingImageError` saying how to get one."""
    directory = Path(image_dir)
    try:
        data = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingImageError(f"no guest image in {directory} (no manifest.json); run: boxpark image build") from None
    except (OSError, ValueError) as exc:
        raise MissingImageError(f"cannot read {directory / 'manifest.json'}: {exc}; run: boxpark image build") from None
    if not isinstance(data, dict):
        raise MissingImageError(f"{directory / 'manifest.json'} is not a manifest; run: boxpark image build")
    for name in ("vmlinuz", "initrd.img", "root.squashfs"):
        if not (directory / name).is_file():
            raise MissingImageError(f"the image in {directory} has no {name}; run: boxpark image build")
    return data


def spec_from_image(image_dir: str | os.PathLike[str], state_dir: str | os.PathLike[str],
                    **fields: object) -> MachineSpec:
    """A spec for the image in `image_dir` (its kernel, initramfs, root and arch); `fields` override."""
    directory = Path(image_dir)
    manifest = image_manifest(directory)
    arch = manifest.get("arch")
    values: dict[str, object] = {
        "root": str(directory / "root.squashfs"),
        "kernel": str(directory / "vmlinuz"),
        "initrd": str(directory / "initrd.img"),
        "state_dir": str(state_dir),
    }
    if isinstance(arch, str) and arch:
        values["arch"] = arch
    values.update(fields)
    return MachineSpec(**values)  # type: ignore[arg-type]


def kernel_arch(path: str) -> str | None:
    """The architecture a kernel image is built for, from its header: amd64 (bzImage), arm64 (Image).

    None when the header is neither (then nothing is claimed either way).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(0x240)
    except OSError:
        return None
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        return "amd64"
    if len(head) >= 0x3C and head[0x38:0x3C] == b"ARM\x64":
        return "arm64"
    return None
