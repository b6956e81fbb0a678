"""The init's log: every line to the console and to the log channel the host captures.

The channel is a virtio-serial port named `boxpark.log` (found by name under /sys/class/virtio-ports: there
is no udev), or a file in the sandbox. Lines logged before /sys and /dev are up are kept and written out
when the channel opens, so nothing of an early failure is lost. Every line starts with `boxpark-init:`.
"""

from __future__ import annotations

import logging
import os
import time

PORT_NAME = "boxpark.log"


class ChannelHandler(logging.Handler):
    """Writes formatted records to every open channel; buffers them until the log channel is open."""

    def __init__(self) -> None:
        super().__init__()
        self.fds: list[int] = []
        self.pending: list[bytes] | None = []
        self.setFormatter(_Formatter())

    def add_fd(self, fd: int, replay: bool) -> None:
        if replay and self.pending:
            for line in self.pending:
                _write(fd, line)
        self.fds.append(fd)

    def channel_opened(self) -> None:
        self.pending = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(errors="replace")
        except Exception:
            return
        if self.pending is not None:
            self.pending.append(line)
        for fd in self.fds:
            _write(fd, line)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        uptime = time.clock_gettime(time.CLOCK_MONOTONIC)
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"boxpark-init: [{uptime:9.3f}] {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _write(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError:
        pass


_handler = ChannelHandler()


def setup(level: str = "info") -> logging.Logger:
    """The root logger, writing to /dev/console from now on and to the log channel once it opens."""
    root = logging.getLogger()
    root.handlers[:] = [_handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    try:
        _handler.add_fd(os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC), replay=False)
    except OSError:
        pass
    return logging.getLogger("boxpark.init")


def set_level(level: str) -> None:
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))


def find_port(name: str = PORT_NAME) -> str | None:
    """The /dev path of the virtio-serial port with this name, if the machine has one."""
    base = "/sys/class/virtio-ports"
    try:
        ports = os.listdir(base)
    except OSError:
        return None
    for port in ports:
        try:
            with open(f"{base}/{port}/name") as f:
                if f.read().strip() == name:
                    return f"/dev/{port}"
        except OSError:
            continue
    return None


def open_channel(logfile: str = "") -> str | None:
    """Open the log channel (the named virtio port, or `logfile`); return what was opened."""
    path = logfile or find_port()
    if path is None:
        _handler.channel_opened()
        return None
    flags = os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC | (os.O_CREAT | os.O_APPEND if logfile else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        _handler.channel_opened()
        return None
    _handler.add_fd(fd, replay=True)
    _handler.channel_opened()
    return path
