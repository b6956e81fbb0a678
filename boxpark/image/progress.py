"""Progress of a build: step names and elapsed times for the user, step durations for the manifest."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Progress:
    """Reports lines through `report` (None: silent), each prefixed with the time since the build began.

    `step(name)` times a block; the durations, by name, end up in the manifest.
    """

    def __init__(self, report: Callable[[str], None] | None) -> None:
        self._report = report
        self.start = time.monotonic()
        self.times: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, message: str) -> None:
        if self._report is not None:
            self._report(f"[{self.elapsed():6.1f}s] {message}")

    @contextmanager
    def step(self, name: str, detail: str = "") -> Iterator[None]:
        self.say(f"{name}{': ' + detail if detail else ''} ...")
        began = time.monotonic()
        yield
        took = time.monotonic() - began
        self.times[name] = round(took, 2)
        self.say(f"{name} done in {took:.1f} s")
