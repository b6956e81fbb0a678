"""This process's terminal for the interactive front-ends: `boxpark shell`, `exec -i/-t`, and `guest call`'s
interactive exec and connect.

Raw mode and its restoring, the window size and its changes, and stdin copied to the guest. Stdin is never
read on a thread: a thread blocked in read(0) cannot be cancelled, and would hold the process open after
the guest's side ended until the person pressed a key. It is never made non-blocking in place either (fd 0
shares its file description with a terminal's stdout and stderr).
"""

from __future__ import annotations

import contextlib
import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; asyncio too loads only where it is used
if TYPE_CHECKING:
    import asyncio
    from typing import Awaitable, Callable, Iterator

DEFAULT_SIZE = (80, 24)  # columns, lines: when stdout is no terminal


def size() -> tuple[int, int]:
    """(rows, columns) of this terminal: what `shutil.get_terminal_size` says ($COLUMNS and $LINES first),
    without importing shutil (which loads the compression modules)."""
    try:
        columns, lines = os.get_terminal_size(sys.__stdout__.fileno())  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        columns, lines = 0, 0
    for name, fallback in (("COLUMNS", DEFAULT_SIZE[0]), ("LINES", DEFAULT_SIZE[1])):
        try:
            value = int(os.environ[name])
        except (KeyError, ValueError):
            value = 0
        if name == "COLUMNS":
            columns = value if value > 0 else columns or fallback
        else:
            lines = value if value > 0 else lines or fallback
    return lines, columns


@contextlib.contextmanager
def raw_mode(fd: int = 0) -> Iterator[None]:
    """The terminal on `fd` in raw mode (keys go to the guest as typed), restored however the block ends."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSADRAIN)  # not TCSAFLUSH: keep what was typed ahead
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def resizes(resize: Callable[[int, int], None]) -> Iterator[None]:
    """Call `resize(rows, columns)` whenever this terminal's window changes size, for the block's duration."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGWINCH, lambda: resize(*size()))
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)


async def pump_stdin(send: Callable[[bytes], Awaitable[None]]) -> None:
    """Hand each chunk of stdin to `send` until end of file (or the terminal goes away), then return.

    Cancelling it stops it at once. A regular file or /dev/null cannot be polled (epoll refuses them);
    reading one never waits, so it is read directly.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    fd = private_stdin()
    try:
        try:
            loop.add_reader(fd, lambda: None)
        except PermissionError:
            pollable = False
        else:
            loop.remove_reader(fd)
            pollable = True
        while True:
            if pollable:  # a reader for one read only: while `send` waits, a waiting stdin must not spin us
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, _set, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
            else:
                await asyncio.sleep(0)  # let the output side run between chunks of a file
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:  # EIO: the terminal went away
                data = b""
            if not data:
                return
            await send(data)
    finally:
        os.close(fd)


def _set(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def private_stdin() -> int:
    """A non-blocking descriptor for stdin that does not share its file description with stdout.

    Setting O_NONBLOCK on fd 0 would also set it on a terminal's stdout and stderr (one description),
    and a full terminal would then fail our writes; reopening stdin gives a description of our own.
    """
    try:
        fd = os.open("/proc/self/fd/0", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:  # a socket, or no /proc (macOS): a duplicate, then
        fd = os.dup(0)
    os.set_blocking(fd, False)
    return fd
