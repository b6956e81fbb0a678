"""The vz backend off a Mac: a clear refusal, and the parts of its executor that are plain Python."""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from types import SimpleNamespace
from typing import Callable

import pytest

from boxpark.host.backends import BACKENDS, BackendError, get_backend
from boxpark.host.backends.vz import VmEnd, require_macos


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")
def test_vz_off_macos_says_so() -> None:
    assert "vz" in BACKENDS
    with pytest.raises(BackendError, match=r"the vz backend runs on macOS .*not linux; use backend = \"qemu\""):
        get_backend("vz")


def test_vz_without_pyobjc_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import Virtualization  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("PyObjC's Virtualization is installed here")
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(BackendError,
                       match=r"needs PyObjC's Virtualization and libdispatch .*pip install 'boxpark\[macos\]'"):
        require_macos()


def test_vm_end_counts_the_first_end_from_any_thread() -> None:
    async def main() -> None:
        end = VmEnd(asyncio.get_running_loop())
        assert end.returncode is None and end.reason == "" and await end.wait_for(0.01) is None
        threads = [threading.Thread(target=end.finish, args=(code, f"end {code}")) for code in (0, 1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        code = await end.wait()
        assert code in (0, 1, 2) and end.returncode == code and end.reason == f"end {code}"
        end.finish(1, "later")  # a late delegate call changes nothing
        await asyncio.sleep(0.01)
        assert end.returncode == code

    asyncio.run(main())


class FakeDispatch:
    """A fake of PyObjC's `dispatch` module for the vz backend only (no libdispatch off a Mac): a serial
    queue is one worker thread running the blocks in order."""

    def __init__(self) -> None:
        self.blocks: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="fake-dispatch-queue")
        self.thread.start()

    def _run(self) -> None:
        while (block := self.blocks.get()) is not None:
            block()
            del block  # the block's references go on this thread, as GCD releases a block after it ran

    def dispatch_queue_create(self, label: bytes, attr: object) -> str:
        return label.decode()

    def dispatch_async(self, queue: str, block: Callable[[], None]) -> None:
        self.blocks.put(block)

    def stop(self) -> None:
        self.blocks.put(None)
        self.thread.join()


class Released:
    """Stands in for a PyObjC proxy: records the thread its last reference went on (ObjC's release)."""

    def __init__(self, threads: list[str]) -> None:
        self.threads = threads

    def __del__(self) -> None:
        self.threads.append(threading.current_thread().name)


def test_close_releases_the_vm_on_its_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    from boxpark.host.backends.vz import VzMachine

    fake = FakeDispatch()
    monkeypatch.setitem(sys.modules, "dispatch", fake)
    released: list[str] = []

    async def main() -> None:
        plan = SimpleNamespace(name="t")
        machine = VzMachine(plan, asyncio.get_running_loop(), accept=lambda kept: None)  # type: ignore[arg-type]
        machine.vm, machine.socket_device = Released(released), Released(released)
        machine._keep += [Released(released), Released(released)]  # delegates, listener, configuration
        machine.end.finish(0, "the guest powered off")  # stop() has nothing to do
        await machine.end.wait()
        await machine.close()
        assert machine.vm is None and machine.socket_device is None and not machine._keep

    try:
        asyncio.run(main())
    finally:
        fake.stop()
    assert released == ["fake-dispatch-queue"] * 4


class FakeBalloonVm:
    """Stands in for a VZVirtualMachine with one traditional balloon: records each target and its thread."""

    def __init__(self) -> None:
        self.targets: list[tuple[int, str]] = []
        vm = self

        class Balloon:
            def setTargetVirtualMachineMemorySize_(self, size: int) -> None:
                vm.targets.append((size, threading.current_thread().name))

        self.balloon = Balloon()

    def memoryBalloonDevices(self) -> list[object]:
        return [self.balloon]


def test_the_balloon_target_is_set_on_the_vms_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    from boxpark.host.backends.vz import VzMachine

    fake = FakeDispatch()
    monkeypatch.setitem(sys.modules, "dispatch", fake)
    vm = FakeBalloonVm()

    async def main() -> None:
        machine = VzMachine(SimpleNamespace(name="t"), asyncio.get_running_loop(),  # type: ignore[arg-type]
                            accept=lambda kept: None)
        machine.vm = vm
        await machine.set_balloon(768 * 1024 * 1024)
        machine.vm = None  # a machine that is gone: nothing to set, no error
        await machine.set_balloon(1024)

    try:
        asyncio.run(main())
    finally:
        fake.stop()
    assert vm.targets == [(768 * 1024 * 1024, "fake-dispatch-queue")]
