"""Host wake → time push: the workspace observer's plumbing with a fake notification center on real threads."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import pytest

from boxpark.host.wake import WakeWatch, WorkspaceWakeWatch, watch_wake

pytestmark = pytest.mark.integration


class FakeNotificationCenter:
    """Stands in for NSWorkspace's notification center: posts from its own thread, as the operation queue does."""

    def __init__(self) -> None:
        self.observers: dict[int, Any] = {}
        self.removed: list[int] = []

    def addObserverForName_object_queue_usingBlock_(self, name: str, obj: Any, queue: Any, block: Any) -> int:
        token = len(self.observers) + 1
        self.observers[token] = (name, block)
        return token

    def removeObserver_(self, token: int) -> None:
        self.removed.append(token)
        self.observers.pop(token)

    def post(self, name: str) -> None:
        for observed, block in list(self.observers.values()):
            if observed == name:
                t = threading.Thread(target=block, args=({"name": name},))
                t.start()
                t.join()


def test_each_wake_calls_back_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("boxpark.host.wake.PUMP_INTERVAL", 0.01)

    async def main() -> None:
        center = FakeNotificationCenter()
        loop_thread = threading.current_thread()
        calls: list[threading.Thread] = []
        turns: list[int] = []
        watch = WorkspaceWakeWatch(asyncio.get_running_loop(), lambda: calls.append(threading.current_thread()),
                                   center, "NSWorkspaceDidWakeNotification", pump=lambda: turns.append(1))
        for _ in range(3):
            center.post("NSWorkspaceDidWakeNotification")
        center.post("NSWorkspaceWillSleepNotification")  # not observed
        await asyncio.sleep(0.05)
        assert watch.wakes == 3 and calls == [loop_thread] * 3
        assert turns  # the main run loop gets its turns while the watch is open
        watch.close()
        turned = len(turns)
        assert center.removed == [1] and not center.observers
        center.post("NSWorkspaceDidWakeNotification")
        await asyncio.sleep(0.05)
        assert watch.wakes == 3 and len(turns) == turned
        watch.close()  # twice is fine

    asyncio.run(main())


def test_wake_pokes_the_time_pusher() -> None:
    from boxpark.host.timesync import TimePusher

    async def main() -> None:
        async def dial() -> Any:
            raise ConnectionError("no guest here")

        pusher = TimePusher(dial, interval=3600)
        center = FakeNotificationCenter()
        watch = WorkspaceWakeWatch(asyncio.get_running_loop(), pusher.poke, center, "wake")
        assert not pusher._poke.is_set()
        await asyncio.to_thread(center.post, "wake")
        await asyncio.sleep(0.02)
        assert pusher._poke.is_set()  # the next push runs at once, not at the next interval
        watch.close()

    asyncio.run(main())


@pytest.mark.skipif(sys.platform == "darwin", reason="the no-op off macOS")
def test_elsewhere_a_no_op() -> None:
    async def main() -> None:
        watch = watch_wake(lambda: None)
        assert type(watch) is WakeWatch and watch.wakes == 0
        watch.close()

    asyncio.run(main())
