"""An interactive `Exec`: one process on its connection, over a pty or three pipes, until its one `Exit`.

Frames in become its stdin, a tty resize or a signal; its output goes out as `Output` frames as it comes,
and after its exit (plus at most `pipes.EXIT_GRACE` for what is still in the pipes) the session sends its
`Exit`. When the connection goes away first, the process (and its group) gets SIGHUP, as on a terminal
hang-up. Nothing here may block the loop: the fds are non-blocking, and a host that sends stdin faster than
the process reads it is not read further (`STDIN_HIGH_WATER`) until the process catches up.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal as signals
import termios

from .. import protocol
from ..protocol import ErrorCode, Exit
from ..transport import Channel
from . import logs, tty
from .pipes import CLOSED, EXIT_GRACE, StdinWriter
from .supervisor import Process

CLOSE_LINGER = 2.0
"""After an interactive process's Exit, how long the server waits for the host to close the connection."""

STDIN_HIGH_WATER = 1024 * 1024
"""An interactive process's unwritten stdin past which the server stops reading the connection."""


class Session:
    """One interactive process on its connection: frames in to stdin/resize/signal, output out, one Exit."""

    def __init__(self, channel: Channel, child: Process, outputs: list[tuple[int, int]], stdin: int,
                 master: int) -> None:
        self.channel = channel
        self.child = child
        self.master = master
        self.outputs = outputs
        self.stdin = StdinWriter(stdin, on_eof=self._veof if master != CLOSED else None,
                                 owns_fd=master == CLOSED)
        self._fds = [fd for fd, _ in outputs]
        self.ended = False  # the Exit has been sent

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pumps = [loop.create_task(self._pump(fd, number)) for fd, number in self.outputs]
        commands = loop.create_task(self._commands())
        try:
            code, signum = await self.child.exited
            done, pending = await asyncio.wait(pumps, timeout=EXIT_GRACE)
            for task in pending:
                task.cancel()
            for task in done:
                task.result()
            for fd, number in self.outputs:  # whatever is buffered now, after the grace
                self._send_buffered(fd, number)
            self.channel.send(Exit(code=code, signal=signum))
            await self.channel.drain()
            # Half-close and let the host close first: a host still writing (stdin, a resize) when the
            # connection is torn down would get EPIPE and could lose the unread Exit with it.
            self.ended = True
            self.channel.write_eof()
            await asyncio.wait([commands], timeout=CLOSE_LINGER)
        finally:  # no await here: this also runs when the server cancels the call on its way out
            for task in pumps:
                task.cancel()
            commands.cancel()

    async def _pump(self, fd: int, number: int) -> None:
        loop = asyncio.get_running_loop()
        channel = self.channel
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(fd, _set_none, ready)
                try:
                    await ready
                finally:
                    if fd in self._fds:  # else close() unregistered it, and the number may be reused
                        loop.remove_reader(fd)
                continue
            except OSError as exc:  # EIO: every holder of the pty's slave is gone
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                return
            channel.send(protocol.Output(fd=number, data=data))
            await channel.drain()

    def _send_buffered(self, fd: int, number: int) -> None:
        for _ in range(16):  # bounded: a writer left behind may never stop
            try:
                data = os.read(fd, 65536)
            except OSError:
                return
            if not data:
                return
            self.channel.send(protocol.Output(fd=number, data=data))

    async def _commands(self) -> None:
        channel, child = self.channel, self.child
        while True:
            try:
                message = await channel.recv()
            except protocol.ProtocolError as exc:
                channel.send(protocol.error(exc.code, str(exc)))
                message = None
            if message is None:
                if not self.ended:
                    self.hang_up()
                return
            if self.ended:
                continue  # the host had not seen the Exit yet
            if isinstance(message, protocol.Stdin):
                if message.data:
                    self.stdin.write(message.data)
                if message.eof:
                    self.stdin.write_eof()
                await self.stdin.drain(STDIN_HIGH_WATER)
            elif isinstance(message, protocol.ResizeTty):
                if self.master != CLOSED:
                    tty.resize(self.master, message.rows, message.cols)
            elif isinstance(message, protocol.SendSignal):
                self._signal(message.signal)
            else:
                channel.send(protocol.error(ErrorCode.UNSUPPORTED, f"{type(message).__name__} is not valid "
                                            f"in an interactive session (Stdin, ResizeTty, SendSignal)"))

    def _signal(self, signum: int) -> None:
        if not 0 < signum < signals.NSIG:
            self.channel.send(protocol.error(ErrorCode.INVALID_ARGUMENT, f"{signum} is not a signal number"))
            return
        group = tty.foreground_group(self.master) if self.master != CLOSED else None
        if group is not None and self.child.running:
            try:
                os.killpg(group, signum)
            except ProcessLookupError:
                pass
            return
        self.child.send_signal(signum)

    def _veof(self) -> bytes:
        try:
            return termios.tcgetattr(self.master)[6][termios.VEOF]  # type: ignore[no-any-return]
        except (OSError, termios.error):
            return b"\x04"

    def hang_up(self) -> None:
        """The connection is gone: the process (and its group) gets SIGHUP, as on a terminal hang-up."""
        self.child.send_signal(signals.SIGHUP, group=True)
        self.stdin.close()

    def close(self) -> None:
        """Close the pty master (a hang-up); pipes someone still holds are read to their end and dropped.

        Either way the fds leave `_fds` first, so that a pump still waiting on one does not touch it."""
        loop = asyncio.get_running_loop()
        self.stdin.close()
        fds, self._fds = self._fds, []
        for fd in fds:
            if fd == self.master:
                loop.remove_reader(fd)
                os.close(fd)
            else:
                logs.OutputReader(fd, _ignore, _nothing).discard_rest()
        if self.child.running:  # the connection went away (or the server is closing)
            self.child.send_signal(signals.SIGHUP, group=True)


def _ignore(data: bytes) -> None:
    pass


def _nothing() -> None:
    pass


def _set_none(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
