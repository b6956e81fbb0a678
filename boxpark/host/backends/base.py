"""The backend contract: what runs one guest, as the agent, `boxpark boot` and the tests drive it.

    async with get_backend("qemu") as backend:   # leaving the block stops the machine (and cleans up)
        await backend.start(spec)                 # spawn; the guest's event-stream dials land in `events`
        ready = await backend.wait_ready(60)      # the guest's Ready (or an error naming the logs)
        sock = await backend.dial(API_PORT)       # a connection to a guest port, straight from the backend
        ...
        await backend.stop(timeout=10)            # graceful (Poweroff / SIGTERM to the init), then kill

A backend is `start`, `stop`, `wait` (the machine's end), `dial(port)` and the guest's own dials accepted
straight into `events` (an `EventStream`). As with Lima's `Driver.GuestAgentConn`, the caller never learns
an address to dial itself: the backend hands over a connected socket, however it reaches the guest (vsock,
QEMU's tcp forward, the sandbox's unix socket, VZ's `connectToPort`). Everything above the socket — the
handshake, calls, `Connect` — is the caller's, except where a backend can open a `Connect`'s target by
itself (`connect_direct`: the sandbox), sparing each proxied connection the Guest API. Backends import
only spec, transport, protocol, relay and the event stream, never the agent's modules.

A backend says whether it can show a running guest a grown disk image (`grows_disks_online`: QEMU can,
with QMP block_resize; VZ cannot). Where it cannot, the caller grows the file and calls `reboot()`: a guest
reboot ends the machine (QEMU runs with -no-reboot, VZ stops the VM), so the backend starts it again with
the same spec and the new machine sees every disk image at its size now.

Every helper a backend runs (the listener, QEMU, virtiofsd, a loop device, a cgroup) is entered on the
backend's `AsyncExitStack`, so it is undone in reverse order whatever fails.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, ClassVar

from ... import __version__, protocol
from ...protocol import Message, Ready
from ...transport import DEFAULT_PORT, Address, TransportError, dial
from ..eventstream import EventStream
from ..spec import MachineSpec, SpecError
from .logs import with_logs
from .process import MachineEnd, PidfdProcess

log = logging.getLogger("boxpark.host.backends")

API_PORT = DEFAULT_PORT  # the guest's API: its vsock port, the tcp port behind QEMU's forward


class BackendError(Exception):
    """The machine could not be started, or ended before it was ready; the message says why and where to look."""


class UnsupportedSpec(SpecError):
    """This backend cannot do what the spec asks (the field and the alternative are in the message)."""


class Backend(abc.ABC):
    """One machine on one backend. Subclasses implement `check`, `_start`, `_graceful_stop`, `dial` and
    `address`; the rest is shared."""

    name: ClassVar[str] = ""
    binds_shares: ClassVar[bool] = False  # the guest sees shares as directories to bind, not virtiofs tags
    grows_disks_online: bool = False  # `grow_disk` works while the guest runs; else grow the file and reboot
    # How this backend gives the guest's memory back (host/balloon.py): "reporting" (free page reporting returns
    # freed pages by itself; a balloon squeezes the page cache), "hold" (a traditional balloon only: memory
    # stays returned while it stays inflated), "" (none: `set_balloon` does nothing).
    balloon: ClassVar[str] = ""

    def __init__(self) -> None:
        self.spec: MachineSpec | None = None
        self.events: EventStream | None = None  # the guest's event stream: its dials are accepted into it
        self.secret: bytes | None = None  # what the guest's API asks a proof of (tcp transports), else None
        self.secret_file: str | None = None
        self.child: MachineEnd | None = None  # whose end is the machine's end
        self.spawned_at: float | None = None  # time.monotonic() just before the machine's process started
        self.warnings: list[str] = []  # what the user must hear about this start (the agent shows each)
        self._stack = contextlib.AsyncExitStack()
        self._stopped = False
        self._rebooting: asyncio.Future[None] | None = None  # set while `reboot` replaces the machine
        self._loop: asyncio.AbstractEventLoop | None = None  # where the backend lives (for `dial_blocking`)

    # ----------------------------------------------------------------------- to implement

    @abc.abstractmethod
    def check(self, spec: MachineSpec) -> None:
        """Raise `UnsupportedSpec` (or `BackendError` for the host) when this backend cannot run `spec`."""

    @abc.abstractmethod
    async def _start(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        """Start the machine; enter every helper on `stack`; set events, child, spawned_at."""

    @abc.abstractmethod
    async def _graceful_stop(self) -> None:
        """Ask the guest to shut down (it may not listen) and wait for the machine's end."""

    @abc.abstractmethod
    async def dial(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A new connection to the guest's `port` (a non-blocking socket), or `TransportError` saying why."""

    @abc.abstractmethod
    def address(self, port: int) -> Address:
        """How this host names the guest's `port`: for messages, machine.json and `boxpark boot`. Only
        `dial` reaches it for sure (on vz, no other process can)."""

    async def _restart(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        """Start the machine again after its guest rebooted (its process has ended); set child, spawned_at."""
        raise BackendError(f"the {self.name} backend cannot reboot its guest")

    def dial_blocking(self, port: int, timeout: float = 10.0) -> socket.socket:
        """`dial` for a thread (a relay's): a blocking socket. By default a trip through the backend's loop;
        a backend whose guest has an address dials it from the thread itself."""
        if self._loop is None:
            raise BackendError("the machine was not started")
        future = asyncio.run_coroutine_threadsafe(self.dial(port, timeout), self._loop)
        try:
            sock = future.result(timeout + 1.0)
        except TimeoutError:
            future.cancel()  # a connection that still comes is closed where it lands
            raise TransportError(f"no connection to the guest's port {port} within {timeout:g} s") from None
        sock.setblocking(True)
        return sock

    def connect_direct(self, request: protocol.Connect) -> socket.socket | None:
        """A blocking stream to what `request` names in the guest, opened by the host itself without the
        Guest API where this backend can (the sandbox: same kernel); None where it cannot, and the caller
        makes the `Connect` call. Runs in relay threads."""
        return None

    def pids(self) -> list[int]:
        """Every host process of this machine that is still running (for a last-resort kill)."""
        return [self.child.pid] if self.child is not None and self.child.returncode is None else []

    def since_start_ns(self, guest_monotonic_ns: int) -> int:
        """A reading of the guest's CLOCK_MONOTONIC as time since the machine started: a VM's clock starts
        with its kernel. The sandbox shares the host's clock and counts from its spawn instead."""
        return guest_monotonic_ns

    def log_files(self) -> list[tuple[str, str]]:
        """(label, path) of every log this machine writes, for the message that says why it ended."""
        assert self.spec is not None
        return [("console", self.spec.console_log), ("init log", self.spec.init_log)]

    def describe(self) -> dict[str, object]:
        """This backend's own facts for machine.json (its loop device, its accelerator, ...)."""
        return {}

    def vm_pid(self) -> int | None:
        """The host process that holds the guest's memory (its RSS is what the machine costs), if one of ours
        does: QEMU's. None for the sandbox (no VM) and VZ (the VM runs in Apple's own XPC process)."""
        return None

    # ----------------------------------------------------------------------- the calls

    async def start(self, spec: MachineSpec) -> None:
        """Validate, check, and start the machine. On failure everything started is undone."""
        if self.spec is not None:
            raise BackendError(f"this {self.name} backend has started a machine already")
        spec.validate()
        self.check(spec)
        self.spec = spec
        self._loop = asyncio.get_running_loop()
        os.makedirs(spec.state_dir, mode=0o700, exist_ok=True)
        try:
            await self._start(spec, self._stack)
        except BaseException:
            await self._stack.aclose()
            raise
        self._write_record()

    async def wait(self) -> int:
        """Wait for the machine to end; its exit status. A `reboot` in progress is not an end."""
        while True:
            if self.child is None:
                raise BackendError("the machine was not started")
            child = self.child
            code = await child.wait()
            rebooting = self._rebooting
            if rebooting is None:
                return code
            with contextlib.suppress(Exception):
                await asyncio.shield(rebooting)
            if self.child is child:  # the restart failed: this machine has ended
                return code

    async def wait_ready(self, timeout: float = 60.0) -> Ready:
        """The guest's `Ready`; `BackendError` if the machine ends first, `EventStreamError` on timeout."""
        if self.events is None or self.child is None:
            raise BackendError("the machine was not started")
        ready = asyncio.ensure_future(self.events.wait_ready(timeout))
        ended = asyncio.ensure_future(self.child.wait())
        try:
            done, _ = await asyncio.wait({ready, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not ready.done():
                ready.cancel()
        if ready in done:
            return ready.result()  # raises EventStreamError on timeout
        raise BackendError(self.ended_message(ended.result(), "before the guest was ready"))

    def ended_message(self, code: int, when: str) -> str:
        """Why the machine ended, with the tails of its logs."""
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return with_logs(f"the {self.name} machine {how} {when}", self.log_files())

    async def grow_disk(self, name: str, size: int) -> None:
        """Grow the attached disk `name` (image and device) to `size` bytes while the guest runs."""
        raise BackendError(f"the {self.name} backend cannot grow a disk while the guest runs; grow the image "
                           f"file and reboot the guest")

    async def set_balloon(self, size: int) -> None:
        """Ask the guest to shrink to (or grow back to) `size` bytes of memory through its balloon; the guest
        gets there by itself, as it can. A no-op on a backend without one."""

    async def balloon_stats(self, refresh: int) -> dict[str, Any] | None:
        """The guest kernel's memory statistics as its balloon driver reports them, refreshed every `refresh`
        seconds (QEMU's `guest-stats`: {"stats": {"stat-total-memory": bytes, ...}, "last-update": s});
        None on a backend whose balloon has none (host/balloon.py then asks the guest's init)."""
        return None

    async def reboot(self, timeout: float = 120.0) -> Ready:
        """Reboot the guest (its init stops its services cleanly) into a new machine with the same spec.

        Returns the new boot's Ready (a new boot id). `BackendError` when the guest does not go down or the
        new one not up.
        """
        if self.spec is None or self.child is None or self.events is None:
            raise BackendError("the machine was not started")
        old = self.child
        self._rebooting = asyncio.get_running_loop().create_future()
        try:
            try:
                await self._ask_guest(protocol.Reboot(), timeout=5.0)
            except Exception as exc:  # noqa: BLE001 - a guest that cannot be asked is stopped below
                log.warning("could not ask the guest to reboot (%s); stopping its machine", exc)
            if await old.wait_for(timeout) is None:
                raise BackendError(f"the guest did not reboot within {timeout:g} s; see {self.spec.console_log}")
            self.events.ready = None  # that boot is over; the next Ready is the new boot's
            await self._restart(self.spec, self._stack)
            self._write_record()
            return await self.wait_ready(timeout)
        finally:
            rebooting, self._rebooting = self._rebooting, None
            rebooting.set_result(None)

    async def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the machine: ask the guest, wait up to `timeout` s, then kill; clean everything up.

        Returns the machine's exit status (None if it never started). Safe to call twice.
        """
        code: int | None = None
        if self._stopped:
            return self.child.returncode if self.child is not None else None
        self._stopped = True
        try:
            if self.child is not None and self.child.returncode is None:
                try:  # asks the guest, then waits for the machine to end
                    await asyncio.wait_for(self._graceful_stop(), timeout)
                except asyncio.TimeoutError:
                    log.warning("the %s machine did not stop within %g s; killing it", self.name, timeout)
                except Exception as exc:  # the guest is gone or deaf: no use waiting, the kill below ends it
                    log.info("the %s machine could not be asked to stop (%s); killing it", self.name, exc)
        finally:
            await self._stack.aclose()  # kills what still runs, in reverse order of starting
        if self.child is not None:
            code = self.child.returncode
        return code

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------------- shared helpers

    async def _ask_guest(self, request: Message, timeout: float = 3.0) -> Message | None:
        """One unary call on the guest's API, for the backend's own needs (Poweroff, Reboot, Rosetta's set-up):
        its reply, or None when the guest went down before the reply could be read."""
        sock = await self.dial(API_PORT, timeout)
        channel, _ = await dial(self.address(API_PORT), secret=self.secret, timeout=timeout, sock=sock,
                                hello=protocol.Hello(client=f"boxpark-host {__version__}"))
        try:
            channel.send(request)
            return await asyncio.wait_for(channel.recv(), timeout)
        except (ConnectionError, OSError):
            return None  # the guest may power off or reboot before the reply is read
        finally:
            channel.close()

    async def _poweroff_guest(self) -> bool:
        """Ask a guest that is Ready to power off (its init stops services, syncs, powers off); False when
        there is no init to ask yet."""
        if self.events is None or self.events.ready is None:
            return False
        try:
            await self._ask_guest(protocol.Poweroff())
        except (ConnectionError, OSError):
            pass
        except Exception as exc:
            log.debug("poweroff over the API: %s", exc)
        return True

    def _record_pid(self, child: PidfdProcess, argv0: str) -> None:
        """state/<what>.pid ("PID ARGV0"): lets `boxpark` kill what a crashed agent left (state.Machine.clean)."""
        assert self.spec is not None
        path = Path(self.spec.state_dir) / f"{child.what}.pid"
        path.write_text(f"{child.pid} {argv0}\n", encoding="utf-8")
        self._stack.callback(path.unlink, missing_ok=True)

    def _write_record(self) -> None:
        """state/machine.json: what runs and how this host names it (for people and `boxpark guest call`)."""
        assert self.spec is not None
        record: dict[str, Any] = {
            "backend": self.name, "name": self.spec.name, "api": str(self.address(API_PORT)),
            "secret_file": self.secret_file, "events": str(self.events.address) if self.events else None,
            "pids": self.pids(), "started": time.time(), **self.describe(),
        }
        path = Path(self.spec.state_dir) / "machine.json"
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        self._stack.callback(path.unlink, missing_ok=True)  # it describes a running machine only
