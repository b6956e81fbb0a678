"""`boxpark exec` and `shell`: one connection to the Guest API, no asyncio and no msgspec.

An interactive `Exec` needs only a few frames — `Hello` (and `Proof` when the guest asks for one), `Exec`,
then `Stdin`/`ResizeTty` out and `Output`s until `Exit` in — and a select loop over stdin and one socket (with
no stdin and no terminal, not even that: blocking reads). This module speaks those frames itself, with the
small part of msgpack they use. Importing asyncio, msgspec and the contract's ~80 message classes cost each
command several times what Python's own start does; this module costs about a millisecond. The frames are
the contract's (`protocol.messages`): tests/unit/test_plainexec.py checks every frame this module encodes
against `protocol.encode`, and decodes what `protocol.encode` makes of each reply it reads.
"""

from __future__ import annotations

import os
import struct

from _socket import AF_UNIX, SOCK_STREAM, socket  # not `socket`, which costs ~5 ms to import (see host/state.py)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

PROTOCOL_VERSION = 1  # protocol.PROTOCOL_VERSION (checked by the tests)
MAX_FRAME = 16 * 1024 * 1024  # protocol.MAX_FRAME
ERROR_NAMES = {1: "BAD_FRAME", 2: "UNSUPPORTED", 3: "VERSION_MISMATCH", 4: "UNAUTHENTICATED",
               5: "INVALID_ARGUMENT", 6: "NOT_FOUND", 7: "ALREADY_EXISTS", 8: "PERMISSION_DENIED", 9: "TIMEOUT",
               10: "UNAVAILABLE", 11: "FAILED", 12: "INTERNAL"}  # protocol.ErrorCode's names (checked too)

_HEADER = struct.Struct(">I")


class OutputClosed(Exception):
    """Our stdout or stderr was closed by its reader (`boxpark exec … | head`)."""


class GuestError(Exception):
    """The guest answered with an `Error` (`code`, `message`), or broke the protocol (code 1, BAD_FRAME)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return ERROR_NAMES.get(self.code, "INTERNAL")


# ----------------------------------------------------------------------------- msgpack, the part used


def pack(value: Any) -> bytes:
    """msgpack of None, bool, int, float, str, bytes, list and dict, as msgspec encodes them."""
    out = bytearray()
    _pack(value, out)
    return bytes(out)


def _pack(value: Any, out: bytearray) -> None:
    if value is None:
        out.append(0xC0)
    elif value is True:
        out.append(0xC3)
    elif value is False:
        out.append(0xC2)
    elif isinstance(value, int):
        if 0 <= value < 0x80:
            out.append(value)
        elif -32 <= value < 0:
            out.append(value & 0xFF)
        elif 0 <= value < 1 << 64:
            for limit, code, fmt in ((1 << 8, 0xCC, ">B"), (1 << 16, 0xCD, ">H"), (1 << 32, 0xCE, ">I"),
                                     (1 << 64, 0xCF, ">Q")):
                if value < limit:
                    out.append(code)
                    out += struct.pack(fmt, value)
                    return
        elif -(1 << 63) <= value < 0:
            for limit, code, fmt in ((1 << 7, 0xD0, ">b"), (1 << 15, 0xD1, ">h"), (1 << 31, 0xD2, ">i"),
                                     (1 << 63, 0xD3, ">q")):
                if value >= -limit:
                    out.append(code)
                    out += struct.pack(fmt, value)
                    return
        else:
            raise ValueError(f"{value} does not fit in 64 bits")
    elif isinstance(value, float):
        out.append(0xCB)
        out += struct.pack(">d", value)
    elif isinstance(value, str):
        data = value.encode()
        _head(out, len(data), 0xA0, 32, (0xD9, 0xDA, 0xDB))
        out += data
    elif isinstance(value, (bytes, bytearray)):
        _head(out, len(value), None, 0, (0xC4, 0xC5, 0xC6))
        out += value
    elif isinstance(value, (list, tuple)):
        _head(out, len(value), 0x90, 16, (None, 0xDC, 0xDD))
        for item in value:
            _pack(item, out)
    elif isinstance(value, dict):
        _head(out, len(value), 0x80, 16, (None, 0xDE, 0xDF))
        for key, item in value.items():
            _pack(key, out)
            _pack(item, out)
    else:
        raise TypeError(f"cannot encode {type(value).__name__}")


def _head(out: bytearray, n: int, fix: int | None, fix_limit: int, codes: tuple[int | None, int, int]) -> None:
    if fix is not None and n < fix_limit:
        out.append(fix | n)
    elif codes[0] is not None and n < 1 << 8:
        out.append(codes[0])
        out.append(n)
    elif n < 1 << 16:
        out.append(codes[1])
        out += struct.pack(">H", n)
    else:
        out.append(codes[2])
        out += struct.pack(">I", n)


_FIXED = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
          0xCA: ">f", 0xCB: ">d"}
_SIZED = {0xD9: (">B", "str"), 0xDA: (">H", "str"), 0xDB: (">I", "str"), 0xC4: (">B", "bin"),
          0xC5: (">H", "bin"), 0xC6: (">I", "bin"), 0xDC: (">H", "array"), 0xDD: (">I", "array"),
          0xDE: (">H", "map"), 0xDF: (">I", "map")}


def unpack(data: bytes) -> Any:
    """The value of one msgpack document (the types `pack` makes); GuestError(BAD_FRAME) if it is not one."""
    try:
        value, end = _unpack(memoryview(data), 0, 0)
    except (IndexError, struct.error, UnicodeDecodeError, TypeError) as exc:
        raise GuestError(1, f"undecodable frame body: {exc}") from None
    if end != len(data):
        raise GuestError(1, "undecodable frame body: trailing bytes")
    return value


def _unpack(data: memoryview, at: int, depth: int) -> tuple[Any, int]:
    if depth > 32:
        raise TypeError("nested too deeply")
    code = data[at]
    at += 1
    if code < 0x80:
        return code, at
    if code >= 0xE0:
        return code - 0x100, at
    if code == 0xC0:
        return None, at
    if code in (0xC2, 0xC3):
        return code == 0xC3, at
    if code in _FIXED:
        fmt = _FIXED[code]
        return struct.unpack_from(fmt, data, at)[0], at + struct.calcsize(fmt)
    if 0xA0 <= code < 0xC0:
        kind, n = "str", code & 0x1F
    elif 0x90 <= code < 0xA0:
        kind, n = "array", code & 0x0F
    elif 0x80 <= code < 0x90:
        kind, n = "map", code & 0x0F
    elif code in _SIZED:
        fmt, kind = _SIZED[code]
        n = struct.unpack_from(fmt, data, at)[0]
        at += struct.calcsize(fmt)
    else:
        raise TypeError(f"msgpack type 0x{code:02x} is not used by the protocol")
    if kind in ("str", "bin"):
        end = at + n
        if end > len(data):
            raise IndexError("truncated")
        chunk = data[at:end]
        return (str(chunk, "utf-8") if kind == "str" else chunk.tobytes()), end
    if kind == "array":
        items = []
        for _ in range(n):
            item, at = _unpack(data, at, depth + 1)
            items.append(item)
        return items, at
    mapping = {}
    for _ in range(n):
        key, at = _unpack(data, at, depth + 1)
        mapping[key], at = _unpack(data, at, depth + 1)
    return mapping, at


def frame(tag: str, **fields: Any) -> bytes:
    """One frame of the message tagged `tag` (fields at their defaults left out, as the contract's encoder
    does: the caller passes only the others)."""
    body = pack({"t": tag, **fields})
    return _HEADER.pack(len(body)) + body


# ------------------------------------------------------------------------------------ the connection


class Connection:
    """One connection to a Guest API unix socket: frames out, messages (dicts with "t") in."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket(AF_UNIX, SOCK_STREAM)
        self._buffer = bytearray()
        self.eof = False
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self.sock.settimeout(None)
        except BaseException:
            self.sock.close()
            raise

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """The next message, waiting for it; None at the end of the stream."""
        while (message := self.buffered()) is None and not self.eof:
            self.read()
        return message

    def read(self) -> None:
        """Take what the socket has (waiting for something if it is blocking) into the buffer."""
        data = self.sock.recv(262144)
        if data:
            self._buffer += data
        elif self._buffer:
            raise GuestError(1, "the stream ended inside a frame")
        else:
            self.eof = True

    def buffered(self) -> dict[str, Any] | None:
        """The next message if it is all in the buffer, else None."""
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        (length,) = _HEADER.unpack_from(buffer)
        if length > MAX_FRAME:
            raise GuestError(1, f"frame of {length} bytes is over the {MAX_FRAME} byte limit")
        if len(buffer) < 4 + length:
            return None
        body = bytes(buffer[4:4 + length])
        del buffer[:4 + length]
        message = unpack(body)
        if not isinstance(message, dict) or not isinstance(message.get("t"), str):
            raise GuestError(1, "invalid message: not a tagged map")
        return message

    def close(self) -> None:
        self.sock.close()


def proof(secret: bytes, nonce: bytes) -> bytes:
    """The token proof (`protocol.proof`): HMAC-SHA256 of the server's nonce, keyed with the machine's secret."""
    import hashlib
    import hmac

    return hmac.new(secret, b"boxpark-proof-v1\0" + nonce, hashlib.sha256).digest()


def handshake(connection: Connection, secret: bytes | None, then: bytes, client: str) -> None:
    """Hello (and Proof if the guest asks for one), with `then` sent as early as the contract allows: behind
    Hello without a secret, else once the guest's first answer says whether it wants a proof."""
    hello = frame("hello", client=client)
    if not secret:
        connection.send(hello + then)
        then = b""
    else:
        connection.send(hello)
    challenged = False
    while True:
        message = connection.recv()
        tag = None if message is None else message["t"]
        if message is None:
            raise GuestError(10, "the guest closed the connection during the handshake")
        if tag == "error":
            raise GuestError(int(message.get("code", 12)), str(message.get("message", "")))
        if tag == "challenge" and not challenged:
            if not secret:
                raise GuestError(4, "the server asks for a token proof and no secret was given")
            challenged = True
            connection.send(frame("proof", hmac=proof(secret, message["nonce"])) + then)
            then = b""
        elif tag == "welcome":
            version = message.get("version", PROTOCOL_VERSION)
            if version != PROTOCOL_VERSION:
                raise GuestError(3, f"the server speaks protocol {version}, this side {PROTOCOL_VERSION}")
            if then:
                connection.send(then)
            return
        else:
            raise GuestError(1, f"expected Welcome or Challenge, got {tag!r}")


STDIN_BACKLOG = 1 << 20
"""Bytes of stdin read ahead of what the guest has taken; stdin is not read past it (the guest's own pipe to
the process bounds the rest: it stops reading our socket while the pipe is full)."""


def run(path: str, secret: bytes | None, argv: list[str], *, env: dict[str, str], cwd: str,
        rows: int, cols: int, client: str, stdin: bool = False, tty: bool = False) -> tuple[int | None, int | None]:
    """Run argv in the guest, its stdout and stderr copied to ours as they come; return its (exit code,
    signal). With `stdin`, ours goes to it (its end closes the process's stdin, except on a tty), else its
    stdin is closed at once; with `tty`, on a pseudo-terminal the size of ours, this terminal in raw mode and
    its size changes passed on. OSError: the socket could not be reached (the machine is not running)."""
    connection = Connection(path)
    try:
        request: dict[str, Any] = {"argv": list(argv), "env": env, "cwd": cwd, "interactive": True}
        if tty:
            request["tty"] = True
        if (rows, cols) != (24, 80):  # the contract's defaults are left out, as its encoder does
            request.update(rows=rows, cols=cols)
        handshake(connection, secret, frame("exec", **request), client)
        started = connection.recv()
        if started is None:
            raise GuestError(10, "the guest closed the connection before the command started")
        if started["t"] == "error":
            raise GuestError(int(started.get("code", 12)), str(started.get("message", "")))
        if started["t"] != "started":
            raise GuestError(1, f"expected Started, got {started['t']!r}")
        if not stdin:
            connection.send(frame("stdin", eof=True))
            if not tty:
                return _outputs(connection)
        return _session(connection, stdin=stdin, tty=tty)
    finally:
        connection.close()


def _outputs(connection: Connection) -> tuple[int | None, int | None]:
    """Copy the process's output until its exit, waiting on the socket alone."""
    while (message := connection.recv()) is not None:
        if (done := _take(message)) is not None:
            return done
    raise GuestError(10, "the connection to the guest ended before the command did")


def _take(message: dict[str, Any]) -> tuple[int | None, int | None] | None:
    """Act on one message of the running process: its output written out; its exit returned."""
    tag = message["t"]
    if tag == "output":
        _write_all(2 if message.get("fd") == 2 else 1, message.get("data", b""))
    elif tag == "exit":
        return message.get("code"), message.get("signal")
    elif tag == "error":
        raise GuestError(int(message.get("code", 12)), str(message.get("message", "")))
    return None


def _session(connection: Connection, *, stdin: bool, tty: bool) -> tuple[int | None, int | None]:
    """Stdin (and, on a tty, size changes) to the guest, its output to ours, in one select loop: nothing waits
    on one side while the other has something to say."""
    import contextlib
    import select
    import signal

    from . import terminal

    with contextlib.ExitStack() as stack:
        fd = terminal.private_stdin() if stdin else -1  # -1: not read (any more)
        if fd >= 0:
            stack.callback(os.close, fd)
        wake = -1
        if tty:
            stack.enter_context(terminal.raw_mode())
            wake, poke = os.pipe()  # not pipe2: macOS has none
            stack.callback(os.close, wake)
            stack.callback(os.close, poke)
            os.set_blocking(wake, False)
            os.set_blocking(poke, False)
            stack.callback(signal.signal, signal.SIGWINCH, signal.signal(signal.SIGWINCH, _ignore))
            stack.callback(signal.set_wakeup_fd, signal.set_wakeup_fd(poke))  # SIGWINCH wakes the select
        sock = connection.sock
        sock.setblocking(False)
        pending = bytearray()  # frames for the guest that its socket has not taken yet
        while True:
            while (message := connection.buffered()) is not None:
                if (done := _take(message)) is not None:
                    return done
            if connection.eof:
                raise GuestError(10, "the connection to the guest ended before the command did")
            # select, not poll: macOS's poll refuses terminals; a regular file is always ready (epoll refuses it)
            wanted = [sock.fileno()] + ([fd] if fd >= 0 and len(pending) < STDIN_BACKLOG else []) + \
                ([wake] if wake >= 0 else [])
            readable, writable, _ = select.select(wanted, [sock.fileno()] if pending else [], [])
            if writable:
                try:
                    del pending[:sock.send(pending)]
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):  # the guest went away: reading says how
                    pending.clear()
                    fd = -1
            for ready in readable:
                if ready == sock.fileno():  # data, the end, or an error (which recv raises)
                    with contextlib.suppress(BlockingIOError):
                        connection.read()
                elif ready == fd:
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    except OSError:  # EIO: the terminal went away
                        data = b""
                    if data:
                        pending += frame("stdin", data=data)
                    else:
                        fd = -1  # closed by the stack at the end
                        if not tty:  # a terminal's end is no end of input: the guest's tty gets SIGHUP instead
                            pending += frame("stdin", eof=True)
                elif ready == wake:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake, 512):
                            pass
                    rows, cols = terminal.size()
                    pending += frame("resize_tty", rows=rows, cols=cols)


def _ignore(signum: int, frame: object) -> None:
    """SIGWINCH's handler: the select wakes through the wakeup fd, which is all it needs."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        raise OutputClosed() from None
