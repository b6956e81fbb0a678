"""The guest's one error type: a failed call, carrying the wire `ErrorCode` the server replies with."""

from __future__ import annotations

import errno

from ..protocol import ErrorCode


class GuestError(Exception):
    """A call cannot be done as asked; `code` goes on the wire and the message is for the person calling."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_ERRNO_CODES = {
    errno.ENOENT: ErrorCode.NOT_FOUND,
    errno.ENOTDIR: ErrorCode.NOT_FOUND,
    errno.EEXIST: ErrorCode.ALREADY_EXISTS,
    errno.EPERM: ErrorCode.PERMISSION_DENIED,
    errno.EACCES: ErrorCode.PERMISSION_DENIED,
    errno.EROFS: ErrorCode.PERMISSION_DENIED,
    errno.EINVAL: ErrorCode.INVALID_ARGUMENT,
    errno.EISDIR: ErrorCode.INVALID_ARGUMENT,
    errno.ENAMETOOLONG: ErrorCode.INVALID_ARGUMENT,
    errno.ECONNREFUSED: ErrorCode.UNAVAILABLE,
    errno.ETIMEDOUT: ErrorCode.TIMEOUT,
    errno.EBUSY: ErrorCode.UNAVAILABLE,
}


def from_oserror(exc: OSError, doing: str) -> GuestError:
    """Turn an OSError into a GuestError whose message says what was being done and the OS's reason."""
    code = _ERRNO_CODES.get(exc.errno or 0, ErrorCode.FAILED)
    reason = exc.strerror or str(exc)
    return GuestError(code, f"{doing}: {reason}")
