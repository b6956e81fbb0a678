"""Pseudo-terminals for interactive processes: open one at a size, resize it, make it a child's terminal.

The master stays with the server (non-blocking); the child gets the slave as stdin/stdout/stderr and, as
the leader of a new session, as its controlling terminal, so that the kernel delivers SIGWINCH on a resize
and SIGHUP when the master closes.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios


def open_pty(rows: int, cols: int) -> tuple[int, int]:
    """A new pty pair `(master, slave)` of the given size; the master is non-blocking, both close on exec."""
    master, slave = os.openpty()
    os.set_inheritable(master, False)
    os.set_inheritable(slave, False)
    os.set_blocking(master, False)
    resize(master, rows, cols)
    return master, slave


def resize(fd: int, rows: int, cols: int) -> None:
    """Set the window size (the foreground process group gets SIGWINCH)."""
    rows = min(max(rows, 1), 0xFFFF)
    cols = min(max(cols, 1), 0xFFFF)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def size(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


def take_controlling_terminal() -> None:
    """In the child, after setsid() and with the slave on fd 0: make it the controlling terminal.

    Runs between fork and exec (`Popen(preexec_fn=...)`), so it only calls into already-imported C code.
    """
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def foreground_group(master: int) -> int | None:
    """The terminal's foreground process group (where a Ctrl-C would go), or None if it has none."""
    try:
        group = os.tcgetpgrp(master)
    except OSError:
        return None
    return group if group > 0 else None
