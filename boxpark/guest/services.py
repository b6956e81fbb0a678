"""A launched service's output: its two pipes fed into its log ring, then its `Exit` and `ProcessExited`.

The ring is bounded (`logs.LogRing`): a flooding service never waits for a reader, the oldest records go.
Output is collected until both pipes reach their end, but at most `pipes.EXIT_GRACE` after the service
exits; a daemon it left behind holding a pipe is read to its end and dropped, never killed by EPIPE.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from .. import protocol
from ..protocol import Exit
from . import logs
from .pipes import EXIT_GRACE
from .supervisor import Process

PIPE_SIZE = 1024 * 1024
"""Pipe capacity asked for a service's stdout/stderr, so that bursts do not stall it while the loop is busy."""


class ServiceOutput:
    """Feeds a service's two pipes into its ring; when both are done (or EXIT_GRACE after the exit) it
    closes the ring with the `Exit`, completes `done` and emits `ProcessExited` to `events`."""

    def __init__(self, name: str, child: Process, ring: logs.LogRing, done: asyncio.Future[Exit], out: int, err: int,
                 events: Any) -> None:
        self.name = name
        self.child = child
        self.ring = ring
        self.done = done
        self.events = events
        self.open = 2
        self.finished = False
        self.streams: list[tuple[logs.OutputReader, Callable[[], None]]] = []
        for fd, number in ((out, 1), (err, 2)):
            splitter = logs.LineSplitter(number)
            eof = self._eof_of(splitter)
            self.streams.append((logs.OutputReader(fd, self._feeder(splitter), eof), eof))
        self._grace: asyncio.TimerHandle | None = None
        child.exited.add_done_callback(self._exited)

    def _feeder(self, splitter: logs.LineSplitter) -> Callable[[bytes], None]:
        ring = self.ring

        def feed(data: bytes) -> None:
            lines, partials = splitter.split(data)
            if lines:
                ring.append_lines(splitter.stream, time.time_ns(), lines, partials)

        return feed

    def _eof_of(self, splitter: logs.LineSplitter) -> Callable[[], None]:
        def eof() -> None:  # the stream's last unterminated line goes in whole
            tail = splitter.close_line()
            if tail is not None:
                self.ring.append_lines(splitter.stream, time.time_ns(), [tail])
            self.open -= 1
            if self.open == 0 and not self.child.running:
                self._finish()

        return eof

    def _exited(self, future: asyncio.Future[tuple[int | None, int | None]]) -> None:
        if self.open == 0:
            self._finish()
        elif not self.finished:
            self._grace = asyncio.get_running_loop().call_later(EXIT_GRACE, self._give_up)

    def _give_up(self) -> None:
        for reader, eof in self.streams:
            reader.drain()  # calls eof itself if it meets the end
            if reader.open:
                reader.discard_rest()
                eof()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._grace is not None:
            self._grace.cancel()
        # The readers' callbacks point back here: breaking that cycle frees the ring the moment a replace
        # drops it, not at some later full collection.
        self.streams = []
        child = self.child
        exit = Exit(code=child.code, signal=child.signal)
        self.ring.finish(exit)
        if not self.done.done():
            self.done.set_result(exit)
        self.events.emit(protocol.ProcessExited(name=self.name, pid=child.pid, code=child.code,
                                                signal=child.signal))
