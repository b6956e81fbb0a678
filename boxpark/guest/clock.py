"""The guest's clock: set from the RTC at boot, refined on the RTC's second boundary, overruled by the host.

At boot `from_rtc()` reads /dev/rtc0 once (1 s resolution, no waiting). After Ready, `refine()` waits for
the RTC's next second to begin (update interrupt, else polling) and sets the clock to that instant, so it
is a few ms off instead of up to a second. A time the host pushes (`set_from_host`) always wins: once the
host has spoken, the RTC is not consulted again. VZ's Linux boot gives the guest no RTC at all: then only
the host sets the clock. A missing /dev/rtc0 is "no RTC";
EPERM on setting the clock (a sandbox without CAP_SYS_TIME) is "not permitted". Every step is an event.

The host's first push steps the clock (when off by more than its threshold); a later push off by more than
the threshold but at most `SLEW_LIMIT_NS` is slewed instead (adjtime(3): at most 0.5 ms per second, so a
push interval of 60 s absorbs up to 30 ms), as ntpd does below its step threshold. A guest under emulation
(QEMU's TCG) reads every push tens of ms off (its clock drifts and the push's own latency varies by as
much), so stepping each one moved the clock back and forth by tens of ms a minute; slewing never moves it
backwards, and the push costs the init no event (measured in issue 12's efficiency bench: an idle init's
only wake-up is this push). Further off (a paused VM, a host that slept) it is stepped, with its event.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import threading
import time
from typing import Any, Callable

from .. import protocol
from ..protocol import ErrorCode
from .errors import GuestError

log = logging.getLogger("boxpark.init")

RTC = "/dev/rtc0"
RTC_RD_TIME = 0x80247009  # _IOR('p', 0x09, struct rtc_time): nine ints
RTC_UIE_ON = 0x7003
RTC_UIE_OFF = 0x7004
_TM = struct.Struct("9i")
NS = 1_000_000_000
SLEW_LIMIT_NS = 128_000_000  # ntpd's step threshold: a host offset up to this is slewed, not stepped


def read_rtc(fd: int) -> int:
    """The RTC's time (UTC, whole seconds) in ns."""
    sec, minute, hour, mday, mon, year, *_ = _TM.unpack(fcntl.ioctl(fd, RTC_RD_TIME, bytes(_TM.size)))
    import calendar  # here: only a VM's RTC needs it, and its import is paid on every boot

    return calendar.timegm((year + 1900, mon + 1, mday, hour, minute, sec)) * NS


class Clock:
    """Who set the clock last and how; emits `ClockStepped` through `emit`."""

    def __init__(self, emit: Callable[[Any], object] | None = None, rtc: str = RTC) -> None:
        self.emit = emit or (lambda event: None)
        self.rtc = rtc
        self.host_has_spoken = False
        self.slewing = False  # a slew was started: a step cancels what is left of it
        self._lock = threading.Lock()

    def _step(self, target_ns: int, source: str) -> int:
        """Set CLOCK_REALTIME; return the offset it corrected (target - before)."""
        offset = target_ns - time.time_ns()
        time.clock_settime_ns(time.CLOCK_REALTIME, time.time_ns() + offset)
        self.emit(protocol.ClockStepped(source=source, offset_ns=offset))
        return offset

    def from_rtc(self) -> str:
        """Coarse setting at boot: step only if the clock is outside the RTC's current second."""
        try:
            fd = os.open(self.rtc, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return "no RTC"
        try:
            rtc = read_rtc(fd)
        finally:
            os.close(fd)
        now = time.time_ns()
        if rtc <= now < rtc + NS:
            return "in step with the RTC"
        try:
            offset = self._step(rtc + NS // 2, "rtc")  # the middle of the RTC's second: at most 0.5 s off
        except PermissionError:
            return "not permitted to set the clock"
        return f"stepped by {offset / NS:+.3f} s from the RTC"

    def refine(self, timeout: float = 2.5) -> str:
        """Blocking: wait for the RTC's next second to begin, then set the clock to it (unless the host spoke)."""
        try:
            fd = os.open(self.rtc, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return "no RTC"
        try:
            edge = self._next_second(fd, timeout)
            if edge is None:
                return "the RTC did not tick"
            rtc, seen = edge
            with self._lock:
                if self.host_has_spoken:
                    return "the host's time wins"
                target = rtc + (time.monotonic_ns() - seen)
                offset = target - time.time_ns()
                if abs(offset) < 1_000_000:
                    return f"within {offset / 1e6:+.3f} ms of the RTC"
                try:
                    offset = self._step(target, "rtc-refine")
                except PermissionError:
                    return "not permitted to set the clock"
            return f"stepped by {offset / 1e6:+.3f} ms on the RTC's second boundary"
        finally:
            os.close(fd)

    def _next_second(self, fd: int, timeout: float) -> tuple[int, int] | None:
        """(the RTC time of the new second, CLOCK_MONOTONIC when it was seen)."""
        try:
            fcntl.ioctl(fd, RTC_UIE_ON, 0)
        except OSError:
            pass  # no update interrupt: poll below
        else:
            try:
                ready, _, _ = select.select([fd], [], [], timeout)
                if ready:
                    os.read(fd, 8)
                    seen = time.monotonic_ns()
                    return read_rtc(fd), seen
            finally:
                try:
                    fcntl.ioctl(fd, RTC_UIE_OFF, 0)
                except OSError:
                    pass
        first = read_rtc(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = read_rtc(fd)
            if now != first:
                return now, time.monotonic_ns()
            time.sleep(0.001)
        return None

    def set_from_host(self, message: protocol.SetTime) -> protocol.TimeSet:
        """The host's time: always wins; off by more than the threshold, the clock is stepped (the first push,
        or beyond `SLEW_LIMIT_NS`) or slewed (`stepped` False: the offset is gone within 2 s per ms)."""
        if message.time_ns <= 0 or message.threshold_ns < 0:
            raise GuestError(ErrorCode.INVALID_ARGUMENT, "set_time needs a positive time_ns and threshold_ns")
        with self._lock:
            first, self.host_has_spoken = not self.host_has_spoken, True
            offset = message.time_ns - time.time_ns()
            action = correction(offset, message.threshold_ns, first)
            if action is None:
                return protocol.TimeSet(offset_ns=offset, stepped=False)
            try:
                if action == "slew":
                    slew(offset)
                    self.slewing = True
                else:
                    if self.slewing:  # what is left of it would move the stepped clock on
                        slew(0)
                        self.slewing = False
                    self._step(message.time_ns, "host")
            except PermissionError:
                raise GuestError(ErrorCode.PERMISSION_DENIED, f"not permitted to {action} the clock here") from None
            except OSError as exc:
                raise GuestError(ErrorCode.INVALID_ARGUMENT if exc.errno == errno.EINVAL else ErrorCode.FAILED,
                                 f"set_time: {exc.strerror}") from None
        return protocol.TimeSet(offset_ns=offset, stepped=action == "step")


def correction(offset_ns: int, threshold_ns: int, first: bool) -> str | None:
    """What a host push off by `offset_ns` does: None (within the threshold), "slew" or "step"."""
    if abs(offset_ns) <= threshold_ns:
        return None
    if first or abs(offset_ns) > SLEW_LIMIT_NS:
        return "step"
    return "slew"


_adjtime: Callable[[int], int] | None = None


def slew(offset_ns: int) -> None:
    """adjtime(3): move the clock by `offset_ns` gradually (the kernel's 0.5 ms/s), replacing any slew not yet
    done; the clock never goes backwards. Raises PermissionError without CAP_SYS_TIME."""
    global _adjtime
    if _adjtime is None:  # built by the first slew, not by every boot
        import ctypes

        from .libc import _lib

        class Timeval(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]

        function = _lib().adjtime

        def adjtime(offset_us: int) -> int:
            if function(ctypes.byref(Timeval(0, offset_us)), None) == 0:
                return 0
            return ctypes.get_errno()

        _adjtime = adjtime
    err = _adjtime(offset_ns // 1000)
    if err:
        raise OSError(err, os.strerror(err))  # EPERM is a PermissionError
