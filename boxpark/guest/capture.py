"""A unary `Exec`: run a process to its end and reply its exit status and captured output (`ExecResult`).

Stdout and stderr are captured within one byte budget for both (`OUTPUT_CAP`); past it, data is read and
dropped and the reply says `truncated`. The process group is killed on the call's timeout and when its
client goes away (the connection's EOF: nobody is left to read the result); only a launched service
outlives its connection. Nothing here waits on the child but the loop: its stdin is written as the pipe
takes it, and its output is collected at most `pipes.EXIT_GRACE` after it exits.
"""

from __future__ import annotations

import asyncio
import signal as signals
from typing import Callable

from .. import protocol
from ..transport import Channel
from . import logs
from .pipes import EXIT_GRACE, Pipes, StdinWriter, devnull
from .supervisor import Process

OUTPUT_CAP = protocol.MAX_FRAME - 64 * 1024
"""Bytes of stdout plus stderr a unary exec returns; the rest is read and discarded (`truncated`)."""

Spawn = Callable[..., Process]
"""How a call starts its process: `spawn(argv, env, cwd, stdin=, stdout=, stderr=)`, GuestError if it cannot."""


async def run(channel: Channel, message: protocol.Exec, spawn: Spawn) -> protocol.ExecResult:
    """Run `message.argv` to its end (or its timeout, or its client's going away) and reply `ExecResult`."""
    loop = asyncio.get_running_loop()
    pipes = Pipes()
    capture = _Capture(OUTPUT_CAP)
    eof = _Countdown(2)
    readers: list[logs.OutputReader] = []
    try:
        stdin = pipes.to_child() if message.stdin else devnull()
        # the readers are set up before the spawn: less to do while the child starts
        out = pipes.from_child()
        readers.append(logs.OutputReader(pipes.take(), capture.stdout, eof.tick))
        err = pipes.from_child()
        readers.append(logs.OutputReader(pipes.take(), capture.stderr, eof.tick))
        child = spawn(message.argv, message.env, message.cwd, stdin=stdin, stdout=out, stderr=err)
    except BaseException:
        for reader in readers:
            reader.close()
        pipes.close_all()
        raise
    pipes.close_child_ends()
    writer = StdinWriter(pipes.ours[0], on_eof=None) if message.stdin else None
    if writer is not None:
        writer.write(message.stdin)
        writer.write_eof()
    timed_out = False

    def expire() -> None:
        nonlocal timed_out
        timed_out = child.send_signal(signals.SIGKILL, group=True)  # False: it had just exited

    timer = loop.call_later(message.timeout, expire) if message.timeout is not None else None
    # Nobody is left to read the result of a call whose client went away: end it like a timeout.
    hang_up = loop.create_task(channel.wait_eof())
    hang_up.add_done_callback(lambda done: done.cancelled() or child.send_signal(signals.SIGKILL, group=True))
    try:
        code, signum = await child.exited
        await _collect(readers, eof.done)
    finally:
        hang_up.cancel()
        if timer is not None:
            timer.cancel()
        if writer is not None:
            writer.close()
        for reader in readers:
            reader.discard_rest()
        if child.running:  # the call was cancelled (server closing): leave nothing behind
            child.send_signal(signals.SIGKILL, group=True)
    stdout, stderr = capture.result()
    return protocol.ExecResult(code=code, signal=signum, stdout=stdout, stderr=stderr, timed_out=timed_out,
                               truncated=capture.truncated)


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


class _Countdown:
    """Completes `done` after `tick()` was called `n` times."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def tick(self) -> None:
        self.left -= 1
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)


async def _collect(readers: list[logs.OutputReader], eof: asyncio.Future[None]) -> None:
    """After the exit: wait for the pipes' EOF at most EXIT_GRACE, then take what is buffered and stop."""
    if not eof.done():
        try:
            await asyncio.wait_for(asyncio.shield(eof), EXIT_GRACE)
        except asyncio.TimeoutError:
            pass
    for reader in readers:
        reader.drain()
