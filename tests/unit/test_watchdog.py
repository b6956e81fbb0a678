"""The stop watchdog: a stop that finishes in time is left alone; one that hangs is reported with the task it
hangs in, from the watchdog's own thread, while the event loop is still busy waiting."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from boxpark.host.watchdog import StopWatchdog


async def _deaf() -> None:
    """A task that swallows its cancellation: what makes a stop hang."""
    while True:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)


def test_a_hung_stop_is_reported_with_the_task_it_waits_in() -> None:
    reported: list[list[str]] = []
    expired = threading.Event()

    async def main() -> None:
        deaf = asyncio.create_task(_deaf(), name="deaf-helper")
        await asyncio.sleep(0)
        watchdog = StopWatchdog(asyncio.get_running_loop(), 0.2, lambda waiting: (reported.append(waiting),
                                                                                 expired.set()))
        watchdog.start()
        deaf.cancel()  # the "stop": it never ends, the task ignores it
        while not expired.is_set():
            await asyncio.sleep(0.05)
        watchdog.finished()
        deaf.get_coro().close()  # end it for real (close raises GeneratorExit inside, which it does not catch)

    asyncio.run(main())
    assert len(reported) == 1
    line = next(entry for entry in reported[0] if entry.startswith("deaf-helper"))
    assert "_deaf" in line and "test_watchdog.py" in line, reported


def test_a_stop_that_finishes_is_left_alone() -> None:
    reported: list[list[str]] = []

    async def main() -> StopWatchdog:
        watchdog = StopWatchdog(asyncio.get_running_loop(), 0.5, reported.append)
        watchdog.start()
        await asyncio.sleep(0.01)
        watchdog.finished()
        return watchdog

    watchdog = asyncio.run(main())
    watchdog._thread.join(5)  # it ends as soon as it is told the stop finished
    assert not watchdog._thread.is_alive() and reported == []
