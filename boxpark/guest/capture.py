"""A unary `Exec`: run a process to its end and reply its exit status and captured output (`ExecResult`).

Stdout and stderr are captured within one byte budget for both (`OUTPUT_CAP`); past it, data is read and
dropped and the reply says `truncated`. The process group is killed on the call's timeout and when its
client goes away (the connection's EOF: nobody is left to read the result); only a launched service
outlives its connection. Nothing here waits on the child but the loop: its stdin is written as the pipe
takes it, and its output is collected at most `pipes.EXIT_GRACE` after it exits.
"""

from __future__ import annotations

import asyncio
import os
import signal as signals
from typing import Callable

from .. import protocol
from . import logs
from .pipes import EXIT_GRACE, Pipes, StdinWriter, devnull
from .supervisor import Process

OUTPUT_CAP = protocol.MAX_FRAME - 64 * 1024
"""Bytes of stdout plus stderr a unary exec returns; the rest is read and discarded (`truncated`)."""

Spawn = Callable[..., Process]
"""How a call starts its process: `spawn(argv, env, cwd, stdin=, stdout=, stderr=)`, GuestError if it cannot."""


class Unary:
    """One unary exec in flight, driven by the loop's callbacks alone (no task of its own).

    It starts in the constructor (which raises if the process cannot start) and ends by calling
    `finish(result)` once, as soon as the process is reaped and its pipes are at EOF (or `EXIT_GRACE`
    after its exit): straight from the callback that saw the last of them, so the reply leaves in the loop
    turn that noticed the exit. `kill()` ends its process group: on the call's timeout, when its client goes
    away, when the server closes.
    """

    __slots__ = ("child", "done", "_finish", "_capture", "_readers", "_open", "_writer", "_timer", "_grace",
                 "_timed_out")

    def __init__(self, message: protocol.Exec, spawn: Spawn, finish: Callable[[protocol.ExecResult], None]) -> None:
        loop = asyncio.get_running_loop()
        self.done = False
        self._finish = finish
        self._capture = capture = _Capture(OUTPUT_CAP)
        self._open = 2  # pipes not yet at EOF
        self._grace: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        pipes = Pipes()
        try:
            stdin = pipes.to_child() if message.stdin else devnull()
            out = pipes.from_child(nonblocking=False)
            err = pipes.from_child(nonblocking=False)
            child = spawn(message.argv, message.env, message.cwd, stdin=stdin, stdout=out, stderr=err)
        except BaseException:
            pipes.close_all()
            raise
        # The rest is done while the child starts (on another CPU if there is one), not before it.
        pipes.close_child_ends()
        self.child = child
        self._readers = []
        for fd, keep in zip(pipes.ours[-2:], (capture.stdout, capture.stderr)):
            os.set_blocking(fd, False)
            self._readers.append(logs.OutputReader(fd, keep, self._pipe_eof))
        self._writer = StdinWriter(pipes.ours[0], on_eof=None) if message.stdin else None
        if self._writer is not None:
            self._writer.write(message.stdin)
            self._writer.write_eof()
        if message.timeout is not None:
            self._timer = loop.call_later(message.timeout, self._expire)
        child.on_exit(self._exited)

    def kill(self) -> None:
        """End the process and its group now (it is then reaped, and the call finishes as usual)."""
        self.child.send_signal(signals.SIGKILL, group=True)  # False: it had just exited

    def _expire(self) -> None:
        self._timer = None
        self._timed_out = self.child.send_signal(signals.SIGKILL, group=True)

    def _pipe_eof(self) -> None:
        self._open -= 1
        # Its pipes close together as it exits: the other one is most likely at its EOF too, and the process
        # waitable already. Taking them now (reaping calls `_exited`) saves the loop a wake-up for each.
        if self._open == 1:
            for reader in self._readers:
                if reader.open:
                    reader.drain(1)  # its EOF calls us again
        elif self._open == 0 and self.child.poll():
            self._end()

    def _exited(self, child: Process) -> None:
        if self._open == 0:
            self._end()
        else:  # its output is collected at most EXIT_GRACE longer (a daemon may hold the pipe)
            self._grace = asyncio.get_running_loop().call_later(EXIT_GRACE, self._end)

    def _end(self) -> None:
        if self.done:
            return
        self.done = True
        for timer in (self._timer, self._grace):
            if timer is not None:
                timer.cancel()
        if self._writer is not None:
            self._writer.close()
        for reader in self._readers:
            if reader.open:
                reader.drain()  # what is buffered now, then drop the rest
                reader.discard_rest()
        stdout, stderr = self._capture.result()
        child = self.child
        self._finish(protocol.ExecResult(code=child.code, signal=child.signal, stdout=stdout, stderr=stderr,
                                         timed_out=self._timed_out, truncated=self._capture.truncated))


class _Capture:
    """A unary exec's stdout and stderr, within one shared byte budget; past it, data is read and dropped."""

    __slots__ = ("room", "truncated", "_out", "_err")

    def __init__(self, cap: int) -> None:
        self.room = cap
        self.truncated = False
        self._out: list[bytes] = []
        self._err: list[bytes] = []

    def stdout(self, data: bytes) -> None:
        self._keep(self._out, data)

    def stderr(self, data: bytes) -> None:
        self._keep(self._err, data)

    def _keep(self, into: list[bytes], data: bytes) -> None:
        if len(data) > self.room:
            data = data[:self.room]
            self.truncated = True
        if data:
            into.append(data)
            self.room -= len(data)

    def result(self) -> tuple[bytes, bytes]:
        return b"".join(self._out), b"".join(self._err)
