"""The pipes between the processes the Guest API runs and the server: their ends, and a child's stdin.

`Pipes` holds the ends of one spawn: ours (non-blocking, kept) and the child's (closed once it has them).
`StdinWriter` writes to a child's stdin (a pipe, or a pty master) as fast as the child takes it, buffering
the rest. Nothing here may block the loop: every end we keep is non-blocking and watched by the loop.

A process's output is collected until every writer has closed its pipe, but at most `EXIT_GRACE` seconds
after the main process exits: a daemon left behind holding the pipe does not hold up the call. What it
writes later is read and dropped (never EPIPE: we do not kill what we did not collect).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from typing import Callable

EXIT_GRACE = 1.0
"""Seconds after the main process exits during which its output is still collected."""

CLOSED = -1
"""The fd of an end that is closed (or of a pty master a session does not have)."""


class Pipes:
    """The pipe ends of one spawn: ours (non-blocking, kept) and the child's (closed once it has them)."""

    def __init__(self) -> None:
        self.ours: list[int] = []
        self.child_ends: list[int] = []

    def to_child(self) -> int:
        """A pipe the child reads (its stdin); returns the child's end."""
        read, write = os.pipe2(os.O_CLOEXEC)
        self.child_ends.append(read)
        os.set_blocking(write, False)
        self.ours.append(write)
        return read

    def from_child(self, size: int = 0, nonblocking: bool = True) -> int:
        """A pipe the child writes (stdout or stderr), of `size` bytes if the kernel allows; returns the
        child's end. Without `nonblocking`, the caller makes our end non-blocking itself before it reads (after
        the spawn, say: every step before it delays the child's start)."""
        read, write = os.pipe2(os.O_CLOEXEC)
        self.child_ends.append(write)
        if nonblocking:
            os.set_blocking(read, False)
        self.ours.append(read)
        if size:
            try:
                fcntl.fcntl(read, fcntl.F_SETPIPE_SZ, size)
            except OSError:  # over /proc/sys/fs/pipe-max-size for an unprivileged server: keep the default
                pass
        return write

    def take(self) -> int:
        """Hand our newest end over to its new owner (who closes it)."""
        return self.ours.pop()

    def close_child_ends(self) -> None:
        for fd in self.child_ends:
            os.close(fd)
        self.child_ends = []

    def close_all(self) -> None:
        self.close_child_ends()
        for fd in self.ours:
            os.close(fd)
        self.ours = []


_DEVNULL = CLOSED


def devnull() -> int:
    """One /dev/null kept open for every exec without stdin (the child gets a copy)."""
    global _DEVNULL
    if _DEVNULL < 0:
        _DEVNULL = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _DEVNULL


class StdinWriter:
    """Writes to a child's stdin (a pipe, or a pty master) without blocking the loop; buffers the rest.

    `write_eof()` closes a pipe once the buffer is written (or, on a pty, writes its EOF character).
    """

    def __init__(self, fd: int, on_eof: Callable[[], bytes] | None, owns_fd: bool = True) -> None:
        self.fd = fd
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._eof = False
        self._on_eof = on_eof
        self._owns_fd = owns_fd
        self._watching = False
        self._drained: list[asyncio.Future[None]] = []

    def write(self, data: bytes) -> None:
        if self.fd == CLOSED or (self._eof and self._on_eof is None):
            return
        self._buffer += data
        self._flush()

    def write_eof(self) -> None:
        if self._on_eof is not None:  # a terminal: the EOF character, as a person would type it
            self.write(self._on_eof())
            return
        self._eof = True
        self._flush()

    async def drain(self, high_water: int) -> None:
        while len(self._buffer) > high_water and self.fd != CLOSED:
            future = self._loop.create_future()
            self._drained.append(future)
            await future

    def _flush(self) -> None:
        while self._buffer and self.fd != CLOSED:
            try:
                written = os.write(self.fd, self._buffer)
            except BlockingIOError:
                if not self._watching:
                    self._loop.add_writer(self.fd, self._flush)
                    self._watching = True
                return
            except OSError:  # EPIPE: the child closed its stdin; what it did not read is dropped
                self._buffer.clear()
                self.close()
                return
            del self._buffer[:written]
        if self._watching:
            self._loop.remove_writer(self.fd)
            self._watching = False
        self._wake()
        if self._eof and self._on_eof is None:
            self.close()

    def _wake(self) -> None:
        drained, self._drained = self._drained, []
        for future in drained:
            if not future.done():
                future.set_result(None)

    def close(self) -> None:
        if self.fd != CLOSED:
            if self._watching:
                self._loop.remove_writer(self.fd)
                self._watching = False
            if self._owns_fd:
                os.close(self.fd)
            self.fd = CLOSED
        self._buffer.clear()
        self._wake()
