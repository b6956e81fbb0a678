"""Machines for tests: a factory that boots guests on a backend, records every one, and always cleans up.

In the spirit of firecracker's VM factory: each machine it starts is recorded with pidfds of its host
processes, so teardown kills it idempotently by PID even when the graceful stop hangs; readiness is the
guest's own `Ready` event (no sleeps); when a test fails the tails of the console and the init's log of
every live machine are added to the report; and a `Traceback` line appearing in a machine's logs while a
test runs fails that test (cloud-init's rule), unless the machine was booted with `expect_errors=True`.

A machine's backend lives on its own event loop in a thread, so a module-scoped machine outlives each
test's `asyncio.run`. Use `machine.api(lambda client: client.exec([...]))` for Guest API calls and
`machine.run(coro)` for anything on the backend (events, QMP).

    def test_it(machines):                      # function scope; `module_machines` shares across a module
        m = machines.boot("sandbox")
        assert m.api(lambda c: c.info()).pid == 1
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest

from boxpark.host.backends import Backend, get_backend
from boxpark.host.client import GuestClient
from boxpark.host.guestlink import guest_client
from boxpark.host.spec import MachineSpec, spec_from_image
from boxpark import protocol
from boxpark.protocol import Ready

T = TypeVar("T")
BAD_LINES = ("Traceback (most recent call last)",)
BOOT_TIMEOUT = {"sandbox": 30.0, "qemu": 180.0}


def image_dir(arch: str = "amd64") -> Path:
    """The default image (with docker), built if missing or stale (instant when cached); skip without root."""
    if os.geteuid() != 0:
        pytest.skip("booting the image needs root")
    return _built_image(arch)


@functools.cache
def _built_image(arch: str) -> Path:  # once per session: the tree does not change under a test run
    try:
        from boxpark.image.build import build_image, default_image_dir
    except ImportError as exc:
        pytest.skip(f"the image builder is not available: {exc}")
    return Path(build_image(default_image_dir(arch, with_docker=True), arch=arch))


class Machine:
    """One booted machine: its backend on a private loop thread, its Ready, its logs."""

    def __init__(self, backend_name: str, spec: MachineSpec, *, expect_errors: bool = False,
                 backend: Backend | None = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.backend = backend or get_backend(backend_name)
        self.expect_errors = expect_errors
        self.ready: Ready | None = None
        self.boot_seconds: float | None = None
        self.closed = False
        self._pidfds: list[int] = []
        self._log_offsets: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"machine-{spec.name}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------- driving

    def run(self, awaitable: Awaitable[T], timeout: float = 120.0) -> T:
        """Run a coroutine on the machine's loop (where its backend lives) and return its result."""
        async def wrapped() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def api(self, call: Callable[[GuestClient], Awaitable[T]], timeout: float = 120.0) -> T:
        """Dial the Guest API, make `call(client)`, close: `machine.api(lambda c: c.info())`."""
        async def go() -> T:
            client = await guest_client(self.backend)
            async with client:
                return await call(client)

        return self.run(go(), timeout)

    def sh(self, script: str, timeout: float = 120) -> str:
        """`sh -c script` in the guest over the API; its stdout (the test fails on a non-zero exit)."""
        result = self.api(lambda c: c.exec(["sh", "-c", script], timeout=timeout), timeout + 30)
        assert result.code == 0, f"{script}: {result.stdout.decode()} {result.stderr.decode()}"
        return result.stdout.decode()

    def start_dockerd(self, timeout: float = 120) -> protocol.NotifyMessage:
        """dockerd launched over the API (data on a tmpfs, no bridge, no iptables), once it says READY=1."""
        self.api(lambda c: c.mount("tmpfs", "/var/lib/docker", "tmpfs", ["mode=0711"], mkdir=True))

        async def start() -> protocol.NotifyMessage:
            client = await guest_client(self.backend)
            async with client:
                stream = await client.notify_listen("/run/docker.notify")
                await client.launch("dockerd", ["dockerd", "--host=unix:///run/docker.sock", "--iptables=false",
                                                "--ip6tables=false", "--bridge=none",
                                                "--data-root=/var/lib/docker"], notify_socket="/run/docker.notify")
                async with stream:
                    async for message in stream:
                        if message.ready:
                            return message
            raise AssertionError("the notify stream ended before READY=1")

        return self.run(asyncio.wait_for(start(), timeout), timeout + 10)

    def stop_dockerd(self) -> None:
        self.api(lambda c: c.signal("dockerd", 15))
        self.api(lambda c: c.wait("dockerd", timeout=60), 90)

    def start(self) -> None:
        """Start the machine (without waiting for Ready); record its host processes."""
        self.run(self.backend.start(self.spec), 60)
        self._record_pids()

    def wait_ready(self, timeout: float | None = None) -> Ready:
        timeout = timeout or BOOT_TIMEOUT.get(self.backend.name, 120.0)
        began = self.backend.spawned_at or time.monotonic()
        self.ready = self.run(self.backend.wait_ready(timeout), timeout + 10)
        assert self.backend.events is not None and self.backend.events.ready_at is not None
        self.boot_seconds = self.backend.events.ready_at - began
        self._record_pids()
        return self.ready

    def _record_pids(self) -> None:
        for pid in self.backend.pids():
            with contextlib.suppress(ProcessLookupError):
                self._pidfds.append(os.pidfd_open(pid))

    def stop(self, timeout: float = 15.0) -> int | None:
        """The backend's graceful stop (then kill), and its cleanup; returns the exit status."""
        return self.run(self.backend.stop(timeout), timeout + 30)

    def kill(self) -> None:
        """SIGKILL every host process this machine ever had; idempotent, never hits a reused pid."""
        for fd in self._pidfds:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)

    def close(self) -> None:
        """Stop (or kill) it and its loop. Safe to call any number of times."""
        if self.closed:
            return
        self.closed = True
        try:
            self.stop()
        except BaseException:
            self.kill()
            with contextlib.suppress(BaseException):  # the cleanup half: loop device, cgroup, sockets
                self.run(self.backend.stop(1.0), 30)
        finally:
            self.kill()
            for fd in self._pidfds:
                os.close(fd)
            self._pidfds.clear()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self.loop.close()

    # ----------------------------------------------------------------------- logs

    def log_paths(self) -> list[str]:
        return [self.spec.console_log, self.spec.init_log]

    def log_tails(self, lines: int = 60) -> str:
        from boxpark.host.backends import tail

        parts = []
        for label, path in self.backend.log_files() if self.backend.spec else []:
            parts.append(f"--- {self.name}: {label} ({path})\n{tail(path, lines) or '(empty)'}")
        return "\n".join(parts)

    def mark_logs(self) -> None:
        """Remember how far the logs go, so `new_bad_lines` looks only at what comes after."""
        for path in self.log_paths():
            with contextlib.suppress(OSError):
                self._log_offsets[path] = os.path.getsize(path)

    def new_bad_lines(self) -> list[str]:
        if self.expect_errors:
            return []
        found = []
        for path in self.log_paths():
            try:
                with open(path, "rb") as f:
                    f.seek(self._log_offsets.get(path, 0))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            found += [f"{os.path.basename(path)}: {line}" for line in text.splitlines()
                      if any(bad in line for bad in BAD_LINES)]
        return found


class Machines:
    """The factory: `boot(backend, **spec_fields)` → a ready `Machine`; `close()` ends them all."""

    live: list[Machine] = []  # every factory's live machines, for the failure report

    def __init__(self) -> None:
        self.machines: list[Machine] = []
        self._dirs: list[str] = []

    def state_dir(self) -> str:
        # short: unix socket paths live in it (108 bytes at most)
        path = tempfile.mkdtemp(prefix="bp-", dir="/tmp")
        self._dirs.append(path)
        return path

    def spec(self, backend: str, *, image: Path | None = None, **fields: Any) -> MachineSpec:
        image = image or image_dir(fields.get("arch", "amd64"))
        if backend == "sandbox":
            fields.setdefault("kernel", None)
            fields.setdefault("initrd", None)
        fields.setdefault("name", f"t{len(self.machines)}")
        return spec_from_image(image, self.state_dir(), **fields)

    def create(self, backend: str, spec: MachineSpec | None = None, *, expect_errors: bool = False,
               backend_object: Backend | None = None, **fields: Any) -> Machine:
        """A machine, not started yet (for tests that watch the start itself)."""
        spec = spec or self.spec(backend, **fields)
        machine = Machine(backend, spec, expect_errors=expect_errors, backend=backend_object)
        self.machines.append(machine)
        Machines.live.append(machine)
        machine.mark_logs()
        return machine

    def boot(self, backend: str, spec: MachineSpec | None = None, *, expect_errors: bool = False,
             timeout: float | None = None, **fields: Any) -> Machine:
        """Start a machine and wait for its Ready."""
        machine = self.create(backend, spec, expect_errors=expect_errors, **fields)
        machine.start()
        machine.wait_ready(timeout)
        return machine

    def close(self) -> None:
        for machine in reversed(self.machines):
            try:
                machine.close()
            finally:
                with contextlib.suppress(ValueError):
                    Machines.live.remove(machine)
        self.machines.clear()
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._dirs.clear()


class _Reporter:
    """A pytest plugin: guest logs into failed reports; a Traceback in a guest log fails the test."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        for machine in Machines.live:
            machine.mark_logs()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
        report = yield
        if call.when == "call" and Machines.live:
            bad = [line for machine in Machines.live for line in machine.new_bad_lines()]
            if bad and report.passed:
                report.outcome = "failed"
                report.longrepr = "a guest logged a traceback during this test:\n" + "\n".join(bad)
            if report.failed:
                for machine in Machines.live:
                    report.sections.append((f"guest {machine.name} ({machine.backend.name}) logs",
                                            machine.log_tails()))
        return report


@pytest.fixture(scope="session")
def _machine_reporter(pytestconfig: pytest.Config) -> Iterator[None]:
    # Imported into several conftests and test modules, this fixture may be set up more than once a session.
    manager = pytestconfig.pluginmanager
    if manager.has_plugin("boxpark-machines"):
        yield
        return
    plugin = _Reporter()
    manager.register(plugin, "boxpark-machines")
    yield
    manager.unregister(plugin)


@pytest.fixture
def machines(_machine_reporter: None) -> Iterator[Machines]:
    """A machine factory whose machines end with the test."""
    factory = Machines()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_machines(_machine_reporter: None) -> Iterator[Machines]:
    """A machine factory whose machines are shared by a module's tests (boot once, test many)."""
    factory = Machines()
    yield factory
    factory.close()
