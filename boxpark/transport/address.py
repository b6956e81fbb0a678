"""Addresses and machine secrets: one parser for `vsock:CID:PORT`, `unix:PATH` and `tcp:HOST:PORT`.

TCP is reachable by other local users, so a tcp connection always proves knowledge of the machine's secret
(`protocol.proof`; the secret never crosses the wire); unix sockets are created mode 0600 instead; vsock is
reachable only by the VM's owner. Nothing here opens a connection.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Literal

from ..protocol import ErrorCode

DEFAULT_PORT = 1024
"""The Guest API's vsock/tcp port inside the guest."""


class TransportError(Exception):
    """The address is wrong, or the peer is unreachable or failed the handshake. The message says which."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.UNAVAILABLE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Address:
    """A parsed address; `str()` gives it back in the `kind:...` form."""

    kind: Literal["vsock", "unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0
    cid: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "vsock":
            return f"vsock:{self.cid}:{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def needs_secret(self) -> bool:
        return self.kind == "tcp"


_TCP = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)$")


def parse_address(text: str) -> Address:
    """Parse `vsock:CID:PORT`, `unix:PATH` or `tcp:HOST:PORT`, or raise `TransportError` saying what is wrong."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise TransportError(f"bad address {text!r}: expected vsock:CID:PORT, unix:PATH or tcp:HOST:PORT",
                             ErrorCode.INVALID_ARGUMENT)
    if kind == "unix":
        if "\0" in rest:
            raise TransportError(f"bad address {text!r}: NUL in path", ErrorCode.INVALID_ARGUMENT)
        return Address("unix", path=rest)
    if kind == "vsock":
        cid, sep, port = rest.partition(":")
        if not (sep and cid.isdigit() and port.isdigit()):
            raise TransportError(f"bad address {text!r}: expected vsock:CID:PORT with numbers",
                                 ErrorCode.INVALID_ARGUMENT)
        return Address("vsock", cid=int(cid), port=_port(text, port, 0xFFFFFFFF))
    if kind == "tcp":
        match = _TCP.match(rest)
        if not match:
            raise TransportError(f"bad address {text!r}: expected tcp:HOST:PORT", ErrorCode.INVALID_ARGUMENT)
        return Address("tcp", host=match["v6"] or match["host"], port=_port(text, match["port"], 65535))
    raise TransportError(f"bad address {text!r}: unknown kind {kind!r} (vsock, unix or tcp)",
                         ErrorCode.INVALID_ARGUMENT)


def _port(text: str, port: str, limit: int) -> int:
    value = int(port)
    if not 0 <= value <= limit:
        raise TransportError(f"bad address {text!r}: port {value} out of range", ErrorCode.INVALID_ARGUMENT)
    return value


def read_secret(path: str) -> bytes:
    """Read a machine secret from a file that only its owner may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TransportError(f"cannot read the secret file {path}: {exc.strerror}",
                             ErrorCode.INVALID_ARGUMENT) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise TransportError(f"the secret file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                                 f"chmod 600 it", ErrorCode.PERMISSION_DENIED)
        secret = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(secret) < 16:
        raise TransportError(f"the secret in {path} is too short (at least 16 bytes)", ErrorCode.INVALID_ARGUMENT)
    return secret


def write_secret(path: str) -> bytes:
    """Create a new random secret file, mode 0600, and return the secret."""
    secret = os.urandom(32).hex().encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret + b"\n")
    finally:
        os.close(fd)
    return secret
