"""A deadline for the agent's stop, kept by a thread: a stop that hangs still ends.

The agent's stop awaits many things (dockerd's exit, the guest's poweroff, every helper's end), each with
its own timeout; one await that never ends (a task that swallows its cancellation, a helper that never
exits) would leave the agent "stopping" for ever and `boxpark down` waiting. The watchdog runs beside the
event loop: if the stop has not finished by the deadline it says what the loop's tasks are waiting on (for
the bug report) and calls `expire`, which ends the process (its machine's processes die with it: they are
started with PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable


def waiting_tasks(loop: asyncio.AbstractEventLoop, limit: int = 20) -> list[str]:
    """Each unfinished task of `loop` and where it waits (its innermost frame), read from another thread."""
    lines = []
    for _ in range(3):  # the set may change while it is read from this thread: try again
        try:
            tasks = [t for t in list(asyncio.all_tasks(loop)) if not t.done()]
            break
        except RuntimeError:
            continue
    else:
        return ["(the loop's tasks could not be read)"]
    for task in tasks[:limit]:
        stack = task.get_stack(limit=1)  # a coroutine's innermost frame is the last one
        where = (f"{stack[-1].f_code.co_filename}:{stack[-1].f_lineno} in {stack[-1].f_code.co_name}"
                 if stack else "no frame")
        lines.append(f"{task.get_name()} ({getattr(task.get_coro(), '__qualname__', '?')}) at {where}")
    return lines


class StopWatchdog:
    """`start()` when a stop begins, `finished()` when it is done; otherwise after `seconds`,
    `expire(what the tasks wait on)` runs on the watchdog's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, expire: Callable[[list[str]], None]) -> None:
        self._loop = loop
        self._seconds = seconds
        self._expire = expire
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stop-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finished(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        if not self._done.wait(self._seconds):
            self._expire(waiting_tasks(self._loop))
