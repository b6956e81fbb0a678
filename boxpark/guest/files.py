"""File calls of the Guest API: read_file, write_file, mkdir, stat.

Each is a quick synchronous function from a request to its reply, run on the server's loop, so none may
ever wait on the outside world: every file is opened O_NONBLOCK, FIFOs and sockets are refused (their
other end decides when a read or write could finish), and a device that has nothing to give or take right
now is refused rather than waited on. Paths are absolute (the server's working directory means nothing to
a client). A whole-file write goes to a
temporary file beside the target and is renamed over it, so a reader never sees half a file, and a
power cut leaves the old file or the new one; a device is written in place (like `>`), never replaced. Every error names the path it is about.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_

from .. import protocol
from ..protocol import MAX_FILE_CHUNK, ErrorCode
from .errors import GuestError, from_oserror

_KINDS = {
    stat_.S_IFREG: "file", stat_.S_IFDIR: "dir", stat_.S_IFLNK: "symlink", stat_.S_IFSOCK: "socket",
    stat_.S_IFIFO: "fifo", stat_.S_IFBLK: "block", stat_.S_IFCHR: "char",
}


def _check_path(call: str, path: str) -> None:
    if not path or "\0" in path or not path.startswith("/"):
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"{call} {path!r}: the path must be absolute")


def _check_mode(call: str, path: str, mode: int) -> None:
    if not 0 <= mode <= 0o7777:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"{call} {path}: mode {mode:o} is not a permission mode")


MAX_OFFSET = 2**63 - 1
"""The largest file offset the kernel takes (loff_t)."""


def _error(exc: OSError, call: str, path: str) -> GuestError:
    if exc.errno == errno.ENOENT:
        return GuestError(ErrorCode.NOT_FOUND, f"{call} {path}: no such file or directory")
    if exc.errno == errno.EAGAIN:
        return _would_block(call, path)
    return from_oserror(exc, f"{call} {path}")


def _would_block(call: str, path: str) -> GuestError:
    return GuestError(ErrorCode.UNAVAILABLE, f"{call} {path}: the device would block (nothing to read or no room "
                                             f"to write right now), and the Guest API never waits on a device")


def _not_a_file(call: str, path: str, mode: int) -> GuestError | None:
    """The refusal for what only its other end can unblock (a FIFO or a socket), else None."""
    if stat_.S_ISFIFO(mode) or stat_.S_ISSOCK(mode):
        return GuestError(ErrorCode.INVALID_ARGUMENT, f"{call} {path}: is a fifo or socket, not a file "
                                                      f"(its other end decides when it could finish)")
    return None


def read_file(message: protocol.ReadFile) -> protocol.FileData:
    """The `ReadFile` call: up to `length` bytes from `offset`; `eof` once the file ends within them."""
    path, offset, length = message.path, message.offset, message.length
    _check_path("read_file", path)
    if not 0 <= offset <= MAX_OFFSET - length or not 0 <= length <= MAX_FILE_CHUNK:
        raise GuestError(ErrorCode.INVALID_ARGUMENT,
                         f"read_file {path}: offset must be 0..{MAX_OFFSET} (with the length) and length "
                         f"0..{MAX_FILE_CHUNK} (got {offset}, {length})")
    try:
        # O_NONBLOCK, and it stays on: opening a fifo must not hang the server, nor may reading a device
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise _error(exc, "read_file", path) from None
    chunks: list[bytes] = []
    try:
        info = os.fstat(fd)
        if stat_.S_ISDIR(info.st_mode):
            raise GuestError(ErrorCode.INVALID_ARGUMENT, f"read_file {path}: is a directory")
        if refusal := _not_a_file("read_file", path, info.st_mode):
            raise refusal
        got = 0
        eof = False
        stream = False  # a tty or other device without offsets: read from offset 0 as it comes
        while got < length:  # /proc and /sys files may return less than asked before their end
            try:
                chunk = os.read(fd, length - got) if stream else os.pread(fd, length - got, offset + got)
            except BlockingIOError:  # a device with nothing more right now: what it had is all there is
                if not chunks:
                    raise _would_block("read_file", path) from None
                eof = True
                break
            except OSError as exc:
                if exc.errno != errno.ESPIPE or offset or stream:
                    raise
                stream = True
                continue
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
            got += len(chunk)
        if not eof and stat_.S_ISREG(info.st_mode) and info.st_size > 0:
            eof = offset + got >= info.st_size
    except OSError as exc:
        raise _error(exc, "read_file", path) from None
    finally:
        os.close(fd)
    return protocol.FileData(data=b"".join(chunks), eof=eof)


def _write_all(fd: int, data: bytes, call: str = "write_file", path: str = "") -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            raise GuestError(ErrorCode.UNAVAILABLE,
                             f"{call} {path}: the device would block after {len(data) - len(view)} of "
                             f"{len(data)} bytes, and the Guest API never waits on a device") from None
        view = view[written:]


def write_file(message: protocol.WriteFile) -> protocol.Ok:
    """The `WriteFile` call: replace the file atomically (temp + rename), or append to it."""
    path, data = message.path, message.data
    _check_path("write_file", path)
    _check_mode("write_file", path, message.mode)
    if len(data) > MAX_FILE_CHUNK:
        raise GuestError(ErrorCode.INVALID_ARGUMENT,
                         f"write_file {path}: {len(data)} bytes is over the {MAX_FILE_CHUNK} byte chunk limit "
                         f"(write the first chunk, then append the rest)")
    try:
        if message.parents:
            os.makedirs(os.path.dirname(path) or "/", 0o755, exist_ok=True)
        if message.append:
            _append(path, data, message.mode)
        else:
            _replace(path, data, message.mode)
    except OSError as exc:
        raise _error(exc, "write_file", path) from None
    return protocol.Ok()


def _append(path: str, data: bytes, mode: int) -> None:
    # O_NONBLOCK: opening a fifo for writing would wait for a reader; it fails with ENXIO instead
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a fifo nobody reads, or a socket: say which
            with contextlib.suppress(OSError):
                if refusal := _not_a_file("write_file", path, os.stat(path).st_mode):
                    raise refusal from None
        raise
    try:
        if refusal := _not_a_file("write_file", path, os.fstat(fd).st_mode):
            raise refusal  # a fifo with a reader still fills up and then blocks
        _write_all(fd, data, "write_file", path)
    finally:
        os.close(fd)


def _replace(path: str, data: bytes, mode: int) -> None:
    if os.path.islink(path):  # write through a symlink (like `>`), not over it
        path = os.path.realpath(path)
    try:
        kind = os.stat(path).st_mode
    except FileNotFoundError:
        kind = stat_.S_IFREG
    if stat_.S_ISDIR(kind):
        raise OSError(errno.EISDIR, "is a directory")
    if refusal := _not_a_file("write_file", path, kind):
        raise refusal
    if stat_.S_ISCHR(kind) or stat_.S_ISBLK(kind):  # a device is written to, never replaced by a file
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            _write_all(fd, data, "write_file", path)
        finally:
            os.close(fd)
        return
    directory, name = os.path.split(path)
    temp = os.path.join(directory, f".{name}.boxpark-{os.urandom(4).hex()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOCTTY, 0o600)
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)  # the rename must never expose an empty file after a crash
        finally:
            os.close(fd)
        os.rename(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def mkdir(message: protocol.Mkdir) -> protocol.Ok:
    """The `Mkdir` call; with `parents` missing parents are made and an existing directory is fine."""
    path, mode = message.path, message.mode
    _check_path("mkdir", path)
    _check_mode("mkdir", path, mode)
    try:
        if message.parents:
            if os.path.isdir(path):
                return protocol.Ok()
            os.makedirs(path, mode, exist_ok=True)
        else:
            os.mkdir(path, mode)
        os.chmod(path, mode)  # exactly `mode`, whatever the umask (like mkdir -m)
    except FileExistsError:
        raise GuestError(ErrorCode.ALREADY_EXISTS, f"mkdir {path}: already exists") from None
    except OSError as exc:
        raise _error(exc, "mkdir", path) from None
    return protocol.Ok()


def stat(message: protocol.Stat) -> protocol.StatReply:
    """The `Stat` call: kind, permission bits, size, owner and mtime (of a final symlink itself unless follow)."""
    _check_path("stat", message.path)
    try:
        info = os.stat(message.path, follow_symlinks=message.follow)
    except OSError as exc:
        raise _error(exc, "stat", message.path) from None
    kind = _KINDS.get(stat_.S_IFMT(info.st_mode), "other")
    return protocol.StatReply(kind=kind, mode=stat_.S_IMODE(info.st_mode),  # type: ignore[arg-type]
                              size=info.st_size, uid=info.st_uid, gid=info.st_gid, mtime_ns=info.st_mtime_ns)
