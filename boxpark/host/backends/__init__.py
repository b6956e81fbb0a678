"""Backends: what runs a guest. One small interface; `get_backend(name)` gives one.

    backend = get_backend("qemu")
    async with backend:                      # leaving the block stops the machine (and cleans up)
        await backend.start(spec)            # spawn; the event listener is up before the guest
        ready = await backend.wait_ready(60)  # the guest's Ready (or an error naming the logs)
        client = await backend.dial_api()    # a GuestClient on the guest's API
        ...
        await backend.stop(timeout=10)       # graceful (Poweroff / SIGTERM to the init), then kill

A backend says whether it can show a running guest a grown disk image (`grows_disks_online`: QEMU can,
with QMP block_resize; VZ cannot). Where it cannot, the caller grows the file and calls `reboot()`: a guest
reboot ends the machine's process (QEMU runs with -no-reboot, VZ stops the VM), so the backend starts it
again with the same spec and the new machine sees every disk image at its size now.

Accepting the guest's dials is `backend.events` (an `EventStream`). Every helper a backend runs (the
listener, QEMU, virtiofsd, a loop device, a cgroup) is entered on the backend's `AsyncExitStack`, so it is
undone in reverse order whatever fails. Processes are signalled through pidfds only: a pid that was reused
is never hit. Nothing here knows QEMU or namespaces; the modules beside it do.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, ClassVar, Iterator

from ...protocol import Ready
from ..client import GuestClient
from ..eventstream import EventStream, EventStreamError
from ..spec import Disk, MachineSpec, SpecError, spec_from_image

if TYPE_CHECKING:
    from ..config import Config
    from ..state import Machine

log = logging.getLogger("boxpark.host.backends")

BACKENDS = ("qemu", "sandbox", "vz")


class BackendError(Exception):
    """The machine could not be started, or ended before it was ready; the message says why and where to look."""


class UnsupportedSpec(SpecError):
    """This backend cannot do what the spec asks (the field and the alternative are in the message)."""


def get_backend(name: str) -> Backend:
    """A new, unstarted backend by name: `qemu`, `sandbox` or `vz` (macOS; `BackendError` elsewhere)."""
    if name == "qemu":
        from .qemu import QemuBackend

        return QemuBackend()
    if name == "sandbox":
        from .sandbox import SandboxBackend

        return SandboxBackend()
    if name == "vz":
        from .vz import VzBackend, require_macos

        require_macos()
        return VzBackend()
    raise BackendError(f"unknown backend {name!r}; one of: {', '.join(BACKENDS)}")


@contextlib.asynccontextmanager
async def open_backend(name: str, spec: MachineSpec) -> AsyncIterator[Backend]:
    """A started backend for `spec`; leaving the block stops it and cleans up."""
    backend = get_backend(name)
    async with backend:
        await backend.start(spec)
        yield backend


def spec_from_config(config: Config, machine: Machine, data_disk: str | os.PathLike[str] | None = None) -> MachineSpec:
    """The spec of a configured machine (boxpark.toml): its image, sizes, data disk and virtiofs shares.

    The backend's files (sockets, secret, QEMU's log, pid files, console.log, init.log) go to
    `machine.backend_dir`; console.log and init.log are linked from the machine's directory too.
    The data disk comes first among the extra disks (/dev/vdb). Each virtiofs mount (the home share last)
    gets a tag `shareN`; `spec.share_targets` maps its guest mount point to the tag. On the home share the
    guest's root acts as the home's owner (`spec.share_owners`), where the backend can do it.
    """
    from ..config import expand

    state = Path(machine.backend_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    arch = config.guest_arch
    image = expand(config.image) if config.image else _default_image_dir(arch)
    fields: dict[str, Any] = {"arch": arch, "console": config.console, "name": machine.name}
    fields.update(cpus=config.cpus, memory=config.memory_bytes // (1024 * 1024))  # the sandbox: its cgroup's limits
    if config.backend != "sandbox":
        if config.kernel:
            fields["kernel"] = expand(config.kernel)
        if config.initrd:
            fields["initrd"] = expand(config.initrd)
    else:
        fields.update(kernel=None, initrd=None)
    if config.cmdline:
        fields["command_line"] = config.cmdline
    if data_disk is not None:
        fields["disks"] = (Disk(str(data_disk), name="data"),)
    shares: dict[str, str] = {}
    targets: dict[str, str] = {}
    owners: dict[str, tuple[int, int]] = {}
    home = config.home_mount()
    for mount in config.all_mounts():
        if mount.type == "virtiofs":
            tag = f"share{len(shares)}"
            shares[tag] = expand(mount.source)
            targets[mount.target] = tag
            if mount == home:
                owner = _owner(home.source)
                if owner is not None:
                    owners[tag] = owner
    fields.update(shares=shares, share_targets=targets, share_owners=owners)
    spec = spec_from_image(image, state, **fields)
    for name in ("console.log", "init.log"):
        link = Path(machine.dir) / name
        if not link.exists() or link.is_symlink():
            with contextlib.suppress(OSError):
                link.unlink(missing_ok=True)
                link.symlink_to(state / name)
    return spec


def _owner(directory: str) -> tuple[int, int] | None:
    """The home's (uid, gid): the guest's root acts as them on the home share; None for root's own home."""
    try:
        info = os.stat(directory)
    except OSError:
        return None
    return (info.st_uid, info.st_gid) if info.st_uid != 0 else None


def _default_image_dir(arch: str) -> str:
    try:
        from ...image.build import default_image_dir
    except ImportError:
        from ...dirs import cache_home

        return str(cache_home() / "images" / arch)
    return str(default_image_dir(arch, with_docker=True))


# ------------------------------------------------------------------------------------ processes


class Child:
    """A child process watched through a pidfd: `await wait()`, `signal()` never hits a reused pid."""

    def __init__(self, popen: subprocess.Popen[bytes], what: str) -> None:
        self.popen = popen
        self.what = what
        self.pid = popen.pid
        self.pidfd: int | None = os.pidfd_open(popen.pid)
        self.started = time.monotonic()
        self._exited: asyncio.Future[int] | None = None

    @property
    def returncode(self) -> int | None:
        if self.popen.returncode is None:
            self.popen.poll()
        return self.popen.returncode

    def signal(self, signum: int) -> bool:
        """Send `signum`; False when the process is already gone."""
        if self.pidfd is None or self.returncode is not None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            return False
        return True

    async def wait(self) -> int:
        """Its exit status (reaped); negative for a signal, as subprocess has it."""
        code = self.returncode
        if code is not None:
            return code
        if self._exited is None:
            loop = asyncio.get_running_loop()
            self._exited = loop.create_future()
            assert self.pidfd is not None
            pidfd = self.pidfd

            def readable() -> None:
                loop.remove_reader(pidfd)
                code = self.popen.wait()
                if self._exited is not None and not self._exited.done():
                    self._exited.set_result(code)

            loop.add_reader(pidfd, readable)
        return await asyncio.shield(self._exited)

    async def wait_for(self, timeout: float) -> int | None:
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        """Kill it if it still runs, reap it, and release the pidfd."""
        if self.returncode is None:
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        if self.pidfd is not None:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None


def _read_end(path: str | os.PathLike[str], size: int = 64 * 1024) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            data = f.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()


def tail(path: str | os.PathLike[str], lines: int = 15) -> str:
    """The last `lines` lines of a text file (empty when there is none)."""
    return "\n".join(_read_end(path)[-lines:])


# What says why a boot failed, wherever it is in a log: a stack dump after a panic pushes it out of the tail.
_TELLING = re.compile(r"Kernel panic|FATAL|Traceback|[Ee]rror|can't |cannot |not found|No such|Exec format")


def summary(path: str | os.PathLike[str], lines: int = 15, telling: int = 8) -> str:
    """The telling lines of a log (panics, FATAL, errors) that are not in its tail, then the tail."""
    text = _read_end(path)
    end = text[-lines:]
    before = [line for line in text[:-lines] if _TELLING.search(line)][-telling:] if len(text) > lines else []
    return "\n".join(before + (["[...]"] if before else []) + end)


@contextlib.contextmanager
def owner_namespace(uid: int, gid: int, *, idmap: bool = False) -> Iterator[int]:
    """A fresh user namespace whose root is host uid:gid (and nobody else); yields an fd of it (O_RDONLY).

    With `idmap` it is the other way round, as an idmapped mount wants it (the kernel maps the filesystem's
    ids into the namespace): its uid:gid is the host's root, so the mount shows uid:gid's files as root's.

    A helper (`unshare --user cat`) makes it; we write its uid/gid maps from here (root in the parent
    namespace may map any id), keep the namespace by the fd, and end the helper. What enters it (qemu:
    virtiofsd under nsenter) or a mount idmapped with it (the sandbox) acts as uid:gid: files are created as
    uid:gid, files of uid:gid can be changed, others only as their permissions allow anyone, and no other
    guest id can be written as.
    """
    helper = subprocess.Popen([shutil.which("unshare") or "unshare", "--user", "--", "cat"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fd = -1
    try:
        ours = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{helper.pid}/ns/user") == ours:  # until it has unshared
            if helper.poll() is not None or time.monotonic() > deadline:
                raise BackendError("cannot make a user namespace for an owner-mapped share (unshare --user failed)")
            time.sleep(0.001)
        fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        for name, value in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{helper.pid}/{name}", "w") as f:
                f.write(f"{value} 0 1\n" if idmap else f"0 {value} 1\n")
    except OSError as exc:
        raise BackendError(f"cannot make a user namespace for an owner-mapped share: {exc}") from None
    finally:
        assert helper.stdin is not None
        helper.stdin.close()  # cat ends; the namespace lives on while fd (and then virtiofsd) holds it
        try:
            helper.wait(5)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
    try:
        yield fd
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ the interface


class Backend(abc.ABC):
    """One machine on one backend. Subclasses implement `_start`, `_graceful_stop`, `check` and `pids`."""

    name: ClassVar[str] = ""
    grows_disks_online: bool = False  # `grow_disk` works while the guest runs; else grow the file and reboot

    def __init__(self) -> None:
        self.spec: MachineSpec | None = None
        self.events: EventStream | None = None
        self.api_address = ""  # what `dial_api` dials (as this host sees it)
        self.secret: bytes | None = None  # the machine secret (tcp transports)
        self.secret_file: str | None = None
        self.child: Child | None = None  # the process whose exit is the machine's end
        self.spawned_at: float | None = None  # time.monotonic() just before the machine's process started
        self.warnings: list[str] = []  # what the user must hear about this start (the agent shows each)
        self._stack = contextlib.AsyncExitStack()
        self._stopped = False
        self._rebooting: asyncio.Future[None] | None = None  # set while `reboot` replaces the machine

    # ----------------------------------------------------------------------- to implement

    @abc.abstractmethod
    def check(self, spec: MachineSpec) -> None:
        """Raise `UnsupportedSpec` (or `BackendError` for the host) when this backend cannot run `spec`."""

    @abc.abstractmethod
    async def _start(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        """Start the machine; enter every helper on `stack`; set events, api_address, child, spawned_at."""

    @abc.abstractmethod
    async def _graceful_stop(self) -> None:
        """Ask the guest to shut down (it may not listen)."""

    async def _restart(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        """Start the machine again after its guest rebooted (its process has ended); set child, spawned_at."""
        raise BackendError(f"the {self.name} backend cannot reboot its guest")

    def pids(self) -> list[int]:
        """Every host process of this machine that is still running (for a last-resort kill)."""
        return [self.child.pid] if self.child is not None and self.child.returncode is None else []

    def since_start_ns(self, guest_monotonic_ns: int) -> int:
        """A reading of the guest's CLOCK_MONOTONIC as time since the machine started: a VM's clock starts
        with its kernel. The sandbox shares the host's clock and counts from its spawn instead."""
        return guest_monotonic_ns

    @property
    def share_tags(self) -> dict[str, str]:
        """Guest mount point -> virtiofs tag, for the shares the spec maps (`spec.share_targets`)."""
        return dict(self.spec.share_targets) if self.spec is not None else {}

    @property
    def share_sources(self) -> dict[str, tuple[str, str, list[str]]]:
        """Guest mount point -> (source, fstype, options) of the guest's Mount call for each share."""
        return {target: self.share_source(tag) for target, tag in self.share_tags.items()}

    def share_source(self, tag: str) -> tuple[str, str, list[str]]:
        """How the guest mounts the share `tag`: a virtiofs device (the sandbox binds a directory instead)."""
        return tag, "virtiofs", []

    def _record_pid(self, child: Child, argv0: str) -> None:
        """state/<what>.pid ("PID ARGV0"): lets `boxpark` kill what a crashed agent left (state.Machine.clean)."""
        assert self.spec is not None
        path = Path(self.spec.state_dir) / f"{child.what}.pid"
        path.write_text(f"{child.pid} {argv0}\n", encoding="utf-8")
        self._stack.callback(path.unlink, missing_ok=True)

    # ----------------------------------------------------------------------- the calls

    async def start(self, spec: MachineSpec) -> None:
        """Validate, check, and start the machine. On failure everything started is undone."""
        if self.spec is not None:
            raise BackendError(f"this {self.name} backend has started a machine already")
        spec.validate()
        self.check(spec)
        self.spec = spec
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
        assert self.spec is not None
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        parts = [f"the {self.name} machine {how} {when}"]
        for label, path in self.log_files():
            text = summary(path)
            if text:
                parts.append(f"--- {label} ({path}), last lines:\n{text}")
        if len(parts) == 1:
            parts.append(f"(nothing in {', '.join(p for _, p in self.log_files())}; boot with the console on "
                         f"to see the kernel's messages)")
        return "\n".join(parts)

    def log_files(self) -> list[tuple[str, str]]:
        assert self.spec is not None
        return [("console", self.spec.console_log), ("init log", self.spec.init_log)]

    async def dial_api(self, timeout: float = 10.0) -> GuestClient:
        """A connection to the guest's API (after Ready it answers at once)."""
        if not self.api_address:
            raise BackendError("the machine was not started")
        return await GuestClient.open(self.api_address, secret=self.secret, timeout=timeout)

    async def poweroff_guest(self) -> bool:
        """Ask a guest that is Ready to power off over its API (its init stops services, syncs, powers
        off); False when there is no init to ask yet."""
        if self.events is None or self.events.ready is None:
            return False
        client = await self.dial_api(timeout=3.0)
        try:
            await client.poweroff()
        except (ConnectionError, OSError):
            pass  # the guest may power off before the reply is read
        except Exception as exc:
            log.debug("poweroff over the API: %s", exc)
        finally:
            await client.close()
        return True

    async def grow_disk(self, name: str, size: int) -> None:
        """Grow the attached disk `name` (image and device) to `size` bytes while the guest runs."""
        raise BackendError(f"the {self.name} backend cannot grow a disk while the guest runs; grow the image "
                           f"file and reboot the guest")

    async def reboot(self, timeout: float = 120.0) -> Ready:
        """Reboot the guest (its init stops its services cleanly) into a new machine with the same spec.

        Returns the new boot's Ready (a new boot id). The API address may change (QEMU's user-net forward):
        read `api_address` again. `BackendError` when the guest does not go down or the new one not up.
        """
        if self.spec is None or self.child is None or self.events is None:
            raise BackendError("the machine was not started")
        old = self.child
        self._rebooting = asyncio.get_running_loop().create_future()
        try:
            try:
                client = await self.dial_api(timeout=5.0)
                try:
                    await client.reboot()
                except (ConnectionError, OSError):
                    pass  # the guest may go down before its reply is read
                finally:
                    await client.close()
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

    def _write_record(self) -> None:
        """state/machine.json: how to reach this machine (for people and `boxpark guest call`)."""
        assert self.spec is not None
        record: dict[str, Any] = {
            "backend": self.name, "name": self.spec.name, "api": self.api_address,
            "secret_file": self.secret_file, "events": str(self.events.address) if self.events else None,
            "pids": self.pids(), "started": time.time(), **self._record_extra(),
        }
        path = Path(self.spec.state_dir) / "machine.json"
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        self._stack.callback(path.unlink, missing_ok=True)  # it describes a running machine only

    def _record_extra(self) -> dict[str, Any]:
        """Backend-specific facts for machine.json."""
        return {}


__all__ = ["Backend", "BackendError", "BACKENDS", "Child", "EventStreamError", "UnsupportedSpec", "get_backend",
           "open_backend", "spec_from_config", "summary", "tail"]
