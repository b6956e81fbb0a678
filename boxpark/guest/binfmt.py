"""Foreign-architecture programs in the guest: an ELF interpreter registered with binfmt_misc.

On a Mac the arm64 guest runs x86_64 programs (`docker run --platform linux/amd64`) through Rosetta: VZ
shares Apple's translator as a virtiofs directory (tag `rosetta`, mounted at /run/rosetta) and the kernel is
told, through binfmt_misc, to start every x86_64 ELF file with /run/rosetta/rosetta. Elsewhere
qemu-x86_64-static can stand in, registered the same way. The registration string is built by pure
functions here; `register()` writes it. The flags default to "CF": C runs a set-uid program with its own
credentials, F has the kernel open the interpreter at registration, so it works inside containers whose
root does not hold that path. The host calls this over the Guest API: the boot path never imports it.
"""

from __future__ import annotations

import os
import re

from . import libc

BINFMT_MISC = "/proc/sys/fs/binfmt_misc"
ROSETTA_TAG = "rosetta"
ROSETTA_DIR = "/run/rosetta"
ROSETTA_INTERPRETER = f"{ROSETTA_DIR}/rosetta"

EM_X86_64 = 62  # e_machine (elf.h)
EM_AARCH64 = 183
FLAGS = "POCF"  # preserve argv[0], open binary, credentials, fix binary
MAX_MAGIC = 128  # the kernel reads the first 256 bytes of a file; keep well inside that
_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


def elf_magic(machine: int) -> tuple[bytes, bytes]:
    """(magic, mask) matching 64-bit little-endian ELF executables and PIEs for `machine` (an EM_* number).

    The first 20 bytes of the ELF header: the identification (\\x7fELF, class 64-bit, little-endian,
    version 1, any OS ABI — Linux binaries say System V or GNU —, ABI version and padding zero), then
    e_type EXEC (2) or DYN (3) — the mask's low bit left out — and e_machine.
    """
    magic = bytearray(20)
    mask = bytearray(20)
    magic[0:7] = b"\x7fELF\x02\x01\x01"
    mask[0:7] = b"\xff" * 7
    mask[8:16] = b"\xff" * 8  # byte 7 (EI_OSABI) stays 0 in the mask: any ABI
    magic[16:18] = (2).to_bytes(2, "little")
    mask[16:18] = b"\xfe\xff"
    magic[18:20] = machine.to_bytes(2, "little")
    mask[18:20] = b"\xff\xff"
    return bytes(magic), bytes(mask)


def escape(data: bytes) -> str:
    """Bytes as binfmt_misc reads them: every byte `\\xHH` (so no ':' or NUL can end a field early)."""
    return "".join(f"\\x{b:02x}" for b in data)


def registration(name: str, interpreter: str, magic: bytes, mask: bytes, flags: str = "CF") -> str:
    """The line for /proc/sys/fs/binfmt_misc/register: `:NAME:M::MAGIC:MASK:INTERPRETER:FLAGS`.

    Raises ValueError for what the kernel would refuse or misread.
    """
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"binfmt name {name!r}: use 1-64 of letters, digits, '_', '.', '+', '-'")
    if not interpreter.startswith("/") or any(c in interpreter for c in ":\n\0") or len(interpreter) > 255:
        raise ValueError(f"interpreter {interpreter!r}: an absolute path without ':' of at most 255 bytes")
    if not magic or len(magic) > MAX_MAGIC or len(mask) != len(magic):
        raise ValueError(f"magic and mask: 1-{MAX_MAGIC} bytes each, the same length")
    if any(c not in FLAGS for c in flags) or len(set(flags)) != len(flags):
        raise ValueError(f"flags {flags!r}: each of {FLAGS} at most once")
    if any(m & ~k & 0xFF for m, k in zip(magic, mask)):
        raise ValueError("the magic has bits set where the mask is 0: it could never match")
    return f":{name}:M::{escape(magic)}:{escape(mask)}:{interpreter}:{flags}"


def x86_64_registration(interpreter: str, name: str = ROSETTA_TAG, flags: str = "CF") -> str:
    """The registration that sends x86_64 ELF programs to `interpreter` (Rosetta, qemu-x86_64-static)."""
    magic, mask = elf_magic(EM_X86_64)
    return registration(name, interpreter, magic, mask, flags)


def parse_entry(text: str) -> dict[str, str]:
    """The kernel's view of a registered entry (/proc/sys/fs/binfmt_misc/NAME): enabled, interpreter, flags."""
    entry = {"enabled": "no", "interpreter": "", "flags": ""}
    for line in text.splitlines():
        if line.strip() in ("enabled", "disabled"):
            entry["enabled"] = "yes" if line.strip() == "enabled" else "no"
        elif line.startswith("interpreter "):
            entry["interpreter"] = line.split(" ", 1)[1].strip()
        elif line.startswith("flags:"):
            entry["flags"] = line.split(":", 1)[1].strip()
    return entry


def ensure_mounted(root: str = BINFMT_MISC) -> None:
    """Mount binfmt_misc on `root` unless it is there (the kernel loads the module on demand)."""
    if not os.path.exists(os.path.join(root, "register")):
        libc.mount("binfmt_misc", root, "binfmt_misc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC)


def _write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())  # one write(2): the kernel takes each write as one whole command
    finally:
        os.close(fd)


def register(interpreter: str, name: str = ROSETTA_TAG, flags: str = "CF", *, machine: int = EM_X86_64,
             root: str = BINFMT_MISC) -> bool:
    """Have the kernel run `machine` ELF programs (x86_64 by default) through `interpreter`.

    Mounts binfmt_misc if needed. An entry of that name with the same interpreter and flags is kept (returns
    False); a different one is replaced (returns True). OSError from the kernel passes through, e.g. ENOENT
    when the F flag makes it open an interpreter that is not there.
    """
    magic, mask = elf_magic(machine)
    line = registration(name, interpreter, magic, mask, flags)
    ensure_mounted(root)
    entry_path = os.path.join(root, name)
    try:
        with open(entry_path, encoding="utf-8") as f:
            current = parse_entry(f.read())
    except FileNotFoundError:
        current = None
    if current is not None:
        want = set(flags) | ({"O"} if "C" in flags else set())  # the kernel adds O for C
        if (current["enabled"] == "yes" and current["interpreter"] == interpreter
                and set(current["flags"]) == want):
            return False
        _write(entry_path, "-1")  # remove it
    _write(os.path.join(root, "register"), line)
    return True


def unregister(name: str = ROSETTA_TAG, root: str = BINFMT_MISC) -> bool:
    """Remove the entry `name`; False when there was none."""
    try:
        _write(os.path.join(root, name), "-1")
    except FileNotFoundError:
        return False
    return True
