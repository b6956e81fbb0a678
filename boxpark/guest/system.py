"""System calls of the Guest API: set_time, sync, set_hostname.

The clock and the hostname belong to the whole machine (the hostname to its UTS namespace), so the
server lets these through only on the guest's init; each checks its arguments before the one system call
that changes anything, so a wrong value never reaches the kernel.
"""

from __future__ import annotations

import errno
import os
import re
import time

from .. import protocol
from ..protocol import ErrorCode
from . import libc
from .errors import GuestError, from_oserror

# A time outside these bounds is a bug on the host (a zero, seconds sent as nanoseconds), not a clock.
EARLIEST_NS = 1_577_836_800 * 10**9  # 2020-01-01T00:00:00Z
LATEST_NS = 7_258_118_400 * 10**9  # 2200-01-01T00:00:00Z

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62})?)*$")


def check_time(message: protocol.SetTime) -> None:
    """Refuse a time or threshold no sane host would send."""
    if not EARLIEST_NS <= message.time_ns <= LATEST_NS:
        raise GuestError(ErrorCode.INVALID_ARGUMENT,
                         f"set_time: {message.time_ns} ns since the epoch is not between 2020 and 2200 "
                         f"(nanoseconds, not seconds?)")
    if message.threshold_ns < 0:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"set_time: threshold_ns {message.threshold_ns} is negative")


def set_time(message: protocol.SetTime) -> protocol.TimeSet:
    """The `SetTime` call: step CLOCK_REALTIME to `time_ns` if it is off by more than `threshold_ns`."""
    check_time(message)
    offset = message.time_ns - time.time_ns()
    if abs(offset) <= message.threshold_ns:
        return protocol.TimeSet(offset_ns=offset, stepped=False)
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, message.time_ns)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise GuestError(ErrorCode.PERMISSION_DENIED,
                             "set_time: not permitted to set the clock here (no CAP_SYS_TIME)") from None
        raise from_oserror(exc, "set_time") from None
    return protocol.TimeSet(offset_ns=offset, stepped=True)


def sync(message: protocol.Sync) -> protocol.Ok:
    """The `Sync` call: sync(2), which may take long on a busy disk (the server runs it in a thread)."""
    os.sync()
    return protocol.Ok()


def check_hostname(name: str) -> None:
    if len(name.encode()) > 64 or not _HOSTNAME.match(name):
        raise GuestError(ErrorCode.INVALID_ARGUMENT,
                         f"hostname {name!r}: use 1 to 64 letters, digits, '-' and '.' (labels not starting "
                         f"with '-')")


def set_hostname(name: str) -> None:
    """Set this UTS namespace's hostname (the server calls it for `Hostname` with a name)."""
    check_hostname(name)
    try:
        libc.sethostname(name)
    except OSError as exc:
        raise from_oserror(exc, f"set hostname {name}") from None
