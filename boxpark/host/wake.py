"""Host sleep: on macOS, when the Mac wakes, the agent pushes the guest's time at once.

A sleeping Mac stops the guest with it, and VZ's Linux guest has no RTC to catch up from, so its clock is
behind by the whole sleep. `TimePusher` notices the gap within its tick anyway; the workspace's did-wake
notification (NSWorkspaceDidWakeNotification) says it before the first tick. `watch_wake(callback)` calls
`callback` on the running loop for each wake; elsewhere, or without PyObjC, it is a watch that does nothing.

The observer's block runs on an operation queue of its own (a foreign thread): it reaches the loop through
`gcdbridge.Inbox`. The workspace posts from the main thread's run loop, which asyncio does not run, so while
the watch is open the loop gives the main run loop a non-blocking turn every `PUMP_INTERVAL`: a wake is
pushed within that, and an idle agent wakes no more than that for it (issue 12).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import Any, Callable

from .gcdbridge import Inbox

log = logging.getLogger("boxpark.agent.wake")

PUMP_INTERVAL = 5.0  # s: sooner than the pusher's tick, rare enough to be nothing at idle


class WakeWatch:
    """A watch that does nothing (not macOS, or no PyObjC); `close()` is safe."""

    wakes = 0

    def close(self) -> None:
        pass


class WorkspaceWakeWatch(WakeWatch):
    """Observes `name` on a notification `center`; each notification calls `callback` on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None], center: Any, name: Any,
                 queue: Any = None, pump: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.callback = callback
        self.center = center
        self.wakes = 0
        self._inbox: Inbox[bool] = Inbox(loop, handler=self._woke)
        self._token = center.addObserverForName_object_queue_usingBlock_(name, None, queue, self._observed)
        self._pump = pump
        self._timer: asyncio.TimerHandle | None = None
        if pump is not None:
            self._timer = loop.call_later(PUMP_INTERVAL, self._turn)

    def _observed(self, notification: Any) -> None:
        """The observer's block, on the operation queue's thread. The block returns void: PyObjC raises on
        that thread for any value but None, so `deliver`'s answer must not be returned (a lambda would)."""
        self._inbox.deliver(True)

    def _woke(self, _: bool) -> None:
        self.wakes += 1
        log.info("the Mac woke from sleep: pushing the guest's time")
        self.callback()

    def _turn(self) -> None:
        assert self._pump is not None
        try:
            self._pump()
        except Exception:
            log.exception("the main run loop's turn")
        self._timer = self.loop.call_later(PUMP_INTERVAL, self._turn)

    def close(self) -> None:
        if self._token is not None:
            self.center.removeObserver_(self._token)
            self._token = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inbox.close()


def watch_wake(callback: Callable[[], None]) -> WakeWatch:
    """Call `callback` (on the running loop) whenever the Mac wakes; a no-op watch elsewhere."""
    loop = asyncio.get_running_loop()
    if sys.platform != "darwin":
        return WakeWatch()
    try:
        import AppKit
        import Foundation
    except ImportError:
        log.info("no PyObjC (pip install 'boxpark[macos]'): the time push notices host sleep by its gap only")
        return WakeWatch()
    center = AppKit.NSWorkspace.sharedWorkspace().notificationCenter()
    queue = Foundation.NSOperationQueue.alloc().init()
    pump = None
    if threading.current_thread() is threading.main_thread():
        def pump() -> None:
            Foundation.NSRunLoop.mainRunLoop().runMode_beforeDate_(Foundation.NSDefaultRunLoopMode,
                                                                   Foundation.NSDate.distantPast())
    return WorkspaceWakeWatch(loop, callback, center, AppKit.NSWorkspaceDidWakeNotification, queue, pump)
