"""Progress of a build: step names and elapsed times for the user, step durations for the manifest.

`Progress` is what the builder talks to; where its lines go is the caller's: a plain callable (tests,
benchmarks), or a `Console`, which writes them to a stream and, when that stream is a terminal, keeps one
live line under them — the running step and its seconds, rewritten in place — so a long step never looks
like a hang. On anything else (a log file, CI) a `Console` writes the plain lines only: no escape codes in
logs. Nothing here may slow the build down: the live line is redrawn by a timer thread, never by the step.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

ERASE_LINE = "\r\x1b[K"  # back to column 0, clear to the end of the line


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def is_terminal(stream: TextIO) -> bool:
    """Whether a live line can be drawn on `stream`: a tty whose TERM understands cursor movement."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


class Console:
    """A build's lines on `stream`, each after `prefix`; on a terminal also a live line (see the module).

    With `hold`, lines are kept back until `release()` (and dropped by `close()` if never released): `up`
    shows the image's progress only once it knows there is a build, not for every up-to-date check.
    """

    def __init__(self, stream: TextIO | None = None, *, prefix: str = "", live: bool | None = None,
                 hold: bool = False, interval: float = 1.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix
        self.live = is_terminal(self.stream) if live is None else live
        self.interval = interval
        self._held: list[str] | None = [] if hold else None
        self._running: list[tuple[str, float]] = []  # (step, its start): nested steps, innermost last
        self._drawn = False  # whether a live line is on the screen now
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # ------------------------------------------------------------------ what Progress calls

    def __call__(self, line: str) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append(line)
                return
            self._write_line(line)

    def began(self, step: str) -> None:
        with self._lock:
            self._running.append((step, time.monotonic()))
            self._draw()
        if self.live and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="progress-live-line", daemon=True)
            self._ticker.start()

    def ended(self, step: str) -> None:
        with self._lock:
            for index in range(len(self._running) - 1, -1, -1):
                if self._running[index][0] == step:
                    del self._running[index]
                    break
            self._draw()

    # ------------------------------------------------------------------ what the caller calls

    @property
    def holding(self) -> bool:
        return self._held is not None

    def release(self) -> None:
        """Write the lines held back so far, and every later one as it comes."""
        with self._lock:
            held, self._held = self._held or [], None
            for line in held:
                self._write_line(line)

    def close(self) -> None:
        """Stop the live line and erase it; lines still held back are dropped."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            self._running.clear()
            self._held = None
            self._erase()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ drawing (under the lock)

    def _write_line(self, line: str) -> None:
        self._erase()
        self.stream.write(f"{self.prefix}{line}\n")
        self._draw()

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(ERASE_LINE)
            self._drawn = False
        self.stream.flush()

    def _draw(self) -> None:
        if not self.live or self._stop.is_set():
            self.stream.flush()
            return
        if not self._running:
            self._erase()
            return
        step, began = self._running[-1]
        text = f"{self.prefix}{step} ... {time.monotonic() - began:.0f} s"
        # A line longer than the terminal wraps, and \r then rewrites only its last row: cut it.
        self.stream.write(ERASE_LINE + text[: max(self._columns() - 1, 10)])
        self.stream.flush()
        self._drawn = True

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return 80

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self._running:
                    self._draw()


class Progress:
    """Reports lines through `report` (None: silent), each prefixed with the time since the build began.

    `step(name)` times a block; the durations, by name, end up in the manifest. A `Console` as `report`
    also learns which step runs (its live line) and when a build is decided (`building`).
    """

    def __init__(self, report: Callable[[str], None] | None) -> None:
        self._report = report
        self._console = report if isinstance(report, Console) else None
        self.start = time.monotonic()
        self.times: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, message: str) -> None:
        if self._report is not None:
            self._report(f"[{self.elapsed():6.1f}s] {message}")

    def announce(self, message: str) -> None:
        """Say something the person must see even from a `Console` that holds its lines back."""
        if self._console is not None:
            self._console.release()
        self.say(message)

    def building(self, reason: str) -> None:
        """The inputs are resolved and there is something to build, because of `reason`."""
        self.announce(f"building: {reason}")

    @contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[None]:
        self.say(f"{name}{': ' + detail if detail else ''} ...")
        began = time.monotonic()
        if self._console is not None:
            self._console.began(name)
        try:
            yield
        finally:
            if self._console is not None:
                self._console.ended(name)
        took = time.monotonic() - began
        self.times[name] = round(took, 2)
        self.say(f"{name} done in {took:.1f} s")
