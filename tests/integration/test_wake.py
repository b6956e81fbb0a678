"""Host wake → time push: the workspace observer's plumbing with a fake notification center on real threads."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any, Callable

import pytest

from boxpark.host.wake import WakeWatch, WorkspaceWakeWatch, watch_wake

pytestmark = pytest.mark.integration


class FakeNotificationCenter:
    """A fake of NSWorkspace's notification center (no PyObjC here; the real one runs only on a Mac,
    tests/macos): it posts from its own thread, as the operation queue does, and calls the block the way
    PyObjC calls a Python callable for a block returning void: a value other than None raises ValueError
    there (pyobjc-core's libffi_support.m, "did not return None, expecting void return value"). PyObjC turns
    that into an ObjC exception on the queue's thread, which ends the process; `post` re-raises it here."""

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
                failures: list[BaseException] = []
                t = threading.Thread(target=self._call_void_block, args=(block, {"name": name}, failures))
                t.start()
                t.join()
                if failures:
                    raise failures[0]

    @staticmethod
    def _call_void_block(block: Any, notification: Any, failures: list[BaseException]) -> None:
        try:
            result = block(notification)
            if result is not None:
                raise ValueError(f"{block!r}: did not return None, expecting void return value")
        except BaseException as exc:  # noqa: BLE001 - on the queue's thread: handed to post()
            failures.append(exc)


async def until(condition: Callable[[], bool], deadline: float = 30.0) -> None:
    """Wait (on the loop) until `condition()` holds; the caller asserts it after."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not condition() and loop.time() < end:
        await asyncio.sleep(0.01)


def test_the_fake_center_refuses_a_block_that_returns_a_value() -> None:
    center = FakeNotificationCenter()
    center.addObserverForName_object_queue_usingBlock_("wake", None, None, lambda notification: True)
    with pytest.raises(ValueError, match="expecting void return value"):
        center.post("wake")


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
        await until(lambda: watch.wakes == 3 and bool(turns))
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
        await until(pusher._poke.is_set)
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
