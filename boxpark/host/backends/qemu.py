"""The QEMU backend: the guest image in a real VM (Linux hosts), KVM when it works, else TCG.

The backend makes the decisions `qemuargv` turns into QEMU's argv, creates every socket QEMU or a helper
needs and hands over the fds (the QMP socket, virtiofsd's socket), starts QEMU paused (`-S`), connects QMP,
reads the host port QEMU bound for the API forward, and lets the guest run (`cont`) — so nothing races and
the moment the guest's clock starts is known to the millisecond.

Transport: vsock where /dev/vhost-vsock exists (`dial(port)` is vsock:CID:PORT, the guest dials
vsock:2:PORT); else QEMU user networking — the API forwarded from 127.0.0.1:HOSTPORT to the guest's
tcp:1024, the guest dialing 10.0.2.2:PORT (slirp maps it to the host's loopback) — with the per-machine
secret handed over in a `-fw_cfg` file, never on the command line. Linux only: QEMU is started with
PR_SET_PDEATHSIG and watched through a pidfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from ...dirs import cache_home
from ...transport import Address, TransportError, dial_blocking, dial_socket, listen_socket, parse_address, write_secret
from ..eventstream import EventStream
from ..spec import MachineSpec, kernel_arch
from . import pvh, virtiofsd
from .base import API_PORT, Backend, BackendError, UnsupportedSpec
from .process import PidfdProcess, die_with_parent
from .qemuargv import (BINARIES, FAST_KERNEL_ARGS, GUEST_API_PORT, Plan, default_cpu, firmware, kvm_usable,
                       qemu_args, settings, vsock_usable)
from .qmp import Qmp, QmpError, forwarded_port

__all__ = ["GUEST_API_PORT", "Plan", "Qmp", "QmpError", "QemuBackend", "default_cpu", "forwarded_port",
           "kvm_usable", "qemu_args", "settings", "vsock_usable"]

log = logging.getLogger("boxpark.host.qemu")

QMP_TIMEOUT = 10.0
BALLOON_QOM = "/machine/peripheral/balloon"  # the virtio-balloon device (id=balloon, qemuargv)


def free_tcp_listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket on `host:port` (port 0: a free one the kernel picks; no pick-then-bind race)."""
    return listen_socket(parse_address(f"tcp:{host}:{port}"))


class QemuBackend(Backend):
    """`get_backend("qemu")`: a VM. `cpu` overrides -cpu; `extra_args` are appended to QEMU's argv.

    `fast_boot` (default on; `BOXPARK_QEMU_FAST_BOOT=0` turns it off): on x86, qboot instead of SeaBIOS
    and the kernel booted as its PVH ELF (`pvh`), plus FAST_KERNEL_ARGS — bench/boot.py measures both ways.
    """

    name = "qemu"
    balloon = "reporting"  # virtio-balloon with free-page-reporting=on (qemuargv)

    def __init__(self, *, cpu: str | None = None, extra_args: list[str] | None = None,
                 block_resize: bool | None = None, fast_boot: bool | None = None) -> None:
        super().__init__()
        if fast_boot is None:
            fast_boot = os.environ.get("BOXPARK_QEMU_FAST_BOOT") != "0"
        self.fast_boot = fast_boot
        # BOXPARK_QEMU_BLOCK_RESIZE=0 makes QEMU behave as VZ does (no disk grows under a running guest):
        # the grow-the-file-and-reboot path then runs here, where it can be tested
        if block_resize is None:
            block_resize = os.environ.get("BOXPARK_QEMU_BLOCK_RESIZE") != "0"
        self.grows_disks_online = block_resize
        self.cpu = cpu
        self.extra_args = list(extra_args or [])
        self.plan: Plan | None = None
        self.qmp: Qmp | None = None
        self._stats_refresh = 0  # the balloon statistics' refresh this QEMU was given (0: none yet)
        self.argv: list[str] = []
        self.accel_reason = ""
        self.api_address: Address | None = None  # where the guest's API is reached (QEMU's forward moves on reboot)
        self.running_at_wall: float | None = None  # time.time() then: the RTC's zero with rtc_clock="vm"

    def check(self, spec: MachineSpec) -> None:
        if spec.arch not in BINARIES:
            raise UnsupportedSpec("arch", f"no QEMU for {spec.arch}")
        if not spec.kernel:
            raise UnsupportedSpec("kernel", "the qemu backend boots a kernel: set kernel (and initrd)")
        found = kernel_arch(spec.kernel)
        if found is not None and found != spec.arch:
            raise UnsupportedSpec("kernel", f"{spec.kernel} is built for {found}, but the machine is {spec.arch}; "
                                            f"use the {found} image or set arch={found}")
        if shutil.which(BINARIES[spec.arch]) is None:
            package = "qemu-system-x86" if spec.arch == "amd64" else "qemu-system-arm"
            raise BackendError(f"{BINARIES[spec.arch]} is not installed: apt-get install {package}")
        for key, value in (("api", spec.api), ("events", spec.events)):
            if value is not None:
                address = parse_address(value)
                if address.kind == "unix" or (address.kind == "tcp" and address.host not in ("127.0.0.1", "localhost")):
                    raise UnsupportedSpec(key, "the qemu backend reaches the guest over vsock or tcp:127.0.0.1:PORT")
        if spec.shares and not virtiofsd.installed():
            raise UnsupportedSpec("shares", "directory shares need virtiofsd, which is not installed")

    def log_files(self) -> list[tuple[str, str]]:
        assert self.spec is not None
        return [("QEMU's stderr", self.spec.state_file("qemu.log")), *super().log_files()]

    # ----------------------------------------------------------------------- reaching the guest

    def address(self, port: int) -> Address:
        if self.plan is not None and self.plan.transport == "vsock":
            return Address("vsock", cid=self.plan.cid, port=port)
        if port != API_PORT or self.api_address is None:
            raise TransportError(f"the qemu machine forwards only the guest's API port ({API_PORT}) over tcp")
        return self.api_address

    async def dial(self, port: int, timeout: float = 10.0) -> socket.socket:
        return await dial_socket(self.address(port), timeout)

    def dial_blocking(self, port: int, timeout: float = 10.0) -> socket.socket:
        return dial_blocking(self.address(port), timeout)  # from the thread itself: no trip through the loop

    # ----------------------------------------------------------------------- starting

    async def _start(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        state = Path(spec.state_dir)
        for name in ("console.log", "init.log", "qemu.log"):
            (state / name).write_bytes(b"")
        use_kvm, self.accel_reason = kvm_usable(spec.arch)
        transport = "vsock" if vsock_usable() else "user"
        plan = Plan(binary=shutil.which(BINARIES[spec.arch]) or BINARIES[spec.arch],
                    accel="kvm" if use_kvm else "tcg", cpu=self.cpu, transport=transport, extra=self.extra_args)
        if self.fast_boot:
            plan.kernel_args = FAST_KERNEL_ARGS
            plan.firmware = firmware(spec.arch)
            if spec.arch == "amd64" and spec.kernel:  # unpacked once per kernel, then a cache hit (~30 ms)
                plan.kernel = await asyncio.to_thread(pvh.pvh_kernel, spec.kernel, cache_home() / "pvh")
        log.debug("qemu: %s (%s), transport %s", plan.accel, self.accel_reason, transport)

        # The event listener first: its address goes on the guest's command line.
        if transport == "vsock":
            plan.cid = random.randint(3, 0xFFFF_FFF0)
            events_port = random.randint(1025, 0xFFFF_FF00)
            events_address = Address("vsock", cid=0xFFFFFFFF, port=events_port)  # VMADDR_CID_ANY
            listener = listen_socket(events_address)
            plan.events_port = events_port
        else:
            self.secret_file = str(state / "secret")
            self.secret = write_secret(self.secret_file)
            plan.secret_file = self.secret_file
            port = parse_address(spec.events).port if spec.events else 0
            listener = free_tcp_listener(port=port)
            plan.events_port = listener.getsockname()[1]
            events_address = parse_address(f"tcp:127.0.0.1:{plan.events_port}")
            plan.api_port = parse_address(spec.api).port if spec.api else 0
        self.events = EventStream(events_address, secret=self.secret, sock=listener,
                                  logs=f"{state}/init.log and {state}/console.log")
        await self.events.start()
        stack.push_async_callback(self.events.close)

        self.plan = plan
        self._start_virtiofsd(spec, stack)
        stack.push_async_callback(self._reap)
        await self._spawn(spec, stack)

    def _start_virtiofsd(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        assert self.plan is not None
        for tag, source in spec.shares.items():
            path, _ = stack.enter_context(virtiofsd.virtiofsd(tag, source, Path(spec.state_dir),
                                                              spec.share_owners.get(tag)))
            self.plan.share_sockets[tag] = path

    async def _restart(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        """A new QEMU for the same plan (the event listener stays): it opens the disk images anew.

        virtiofsd serves one QEMU and ends with it, so each share gets a new one.
        """
        await self._reap()
        self.qmp = None
        self._stats_refresh = 0
        self._start_virtiofsd(spec, stack)
        state = Path(spec.state_dir)
        for name in ("console.log", "init.log"):  # QEMU truncates its chardev files: keep the last boot's
            with contextlib.suppress(FileNotFoundError):
                os.replace(state / name, state / f"{name}.before-reboot")
        await self._spawn(spec, stack)

    async def _spawn(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        """Start QEMU paused, connect QMP, learn the API forward's port, and let the guest run."""
        assert self.plan is not None
        plan, state, transport = self.plan, Path(spec.state_dir), self.plan.transport
        qmp_path = str(state / "qmp.sock")
        _unlink(qmp_path)  # a QEMU before a reboot left it
        qmp_listener = listen_socket(parse_address(f"unix:{qmp_path}"))
        stack.callback(_unlink, qmp_path)
        plan.qmp_fd = qmp_listener.fileno()
        self.argv = qemu_args(spec, plan)
        (state / "qemu.argv").write_text(json.dumps(self.argv, indent=1) + "\n", encoding="utf-8")

        stderr = os.open(state / "qemu.log", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            self.spawned_at = time.monotonic()
            popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                     pass_fds=[plan.qmp_fd], preexec_fn=die_with_parent)
        except OSError as exc:
            raise BackendError(f"cannot start {self.argv[0]}: {exc.strerror}") from None
        finally:
            os.close(stderr)
            qmp_listener.close()  # QEMU has its own copy
        child = self.child = PidfdProcess(popen, "qemu")
        self._record_pid(child, self.argv[0])

        self.qmp = await self._connect_qmp(qmp_path, child)
        if transport == "user":
            usernet = await self.qmp.hmp("info usernet")
            api_port = forwarded_port(usernet, GUEST_API_PORT)
            if api_port is None:
                raise BackendError(f"QEMU did not report its forward to the guest's API port:\n{usernet}")
            self.api_address = parse_address(f"tcp:127.0.0.1:{api_port}")
        await self.qmp.execute("cont")
        self.running_at_wall = time.time()

    async def _connect_qmp(self, path: str, child: PidfdProcess) -> Qmp:
        """QEMU's QMP, or a `BackendError` saying why not — with QEMU's stderr when QEMU exited."""
        connecting = asyncio.ensure_future(asyncio.wait_for(Qmp.connect(path), QMP_TIMEOUT))
        ended = asyncio.ensure_future(child.wait())
        try:
            await asyncio.wait({connecting, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if connecting.done() and connecting.exception() is None:
            return connecting.result()
        connecting.cancel()
        # A QEMU that fails on its arguments may reset the connection just before it exits: give it a moment.
        code = await child.wait_for(2.0)
        if code is not None:
            raise BackendError(self.ended_message(code, "while starting"))
        problem = connecting.exception() if connecting.done() and not connecting.cancelled() else None
        if isinstance(problem, asyncio.TimeoutError) or problem is None:
            raise BackendError(f"QEMU did not answer on its QMP socket {path} within {QMP_TIMEOUT:g} s")
        raise BackendError(f"cannot talk to QEMU on its QMP socket {path}: {problem}")

    # ----------------------------------------------------------------------- stopping

    async def _graceful_stop(self) -> None:
        """Poweroff over the Guest API (the init stops its services, syncs, powers off); QEMU then exits."""
        if not await self._poweroff_guest():
            assert self.qmp is not None
            await self.qmp.execute("quit")  # no init to ask yet: nothing to lose
        assert self.child is not None
        await self.child.wait()

    async def _reap(self) -> None:
        """QMP quit, then SIGKILL: QEMU is gone when this returns."""
        if self.child is None:
            return
        if self.child.returncode is None and self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 2.0)
            await self.child.wait_for(3.0)
        if self.qmp is not None:
            self.qmp.close()
        self.child.close()

    def vm_pid(self) -> int | None:
        return self.child.pid if self.child is not None and self.child.returncode is None else None

    def describe(self) -> dict[str, object]:
        return {"accel": self.plan.accel if self.plan else None, "accel_reason": self.accel_reason,
                "qmp": self.spec.state_file("qmp.sock") if self.spec else None}

    # ----------------------------------------------------------------------- disks

    async def grow_disk(self, name: str, size: int) -> None:
        """QMP block_resize grows the image file and the device the guest sees; never shrinks."""
        if not self.grows_disks_online:
            await super().grow_disk(name, size)
        assert self.spec is not None
        disk = next((d for d in self.spec.disks if d.name == name), None)
        if disk is None:
            raise BackendError(f"the machine has no disk named {name!r}")
        if size > os.stat(disk.path).st_size:
            await self.resize_disk(name, size)

    # ----------------------------------------------------------------------- memory

    async def set_balloon(self, size: int) -> None:
        """QMP `balloon`: the guest's logical memory size in bytes (its driver inflates or deflates to it)."""
        if self.qmp is None:
            raise BackendError("the machine was not started")
        await self.qmp.execute("balloon", value=size)

    async def balloon_stats(self, refresh: int) -> dict[str, Any] | None:
        """QOM `guest-stats` of the balloon (the guest's driver answers QEMU's stats queue in the kernel: the
        init is never woken); the first call asks QEMU to refresh them every `refresh` seconds."""
        if self.qmp is None:
            raise BackendError("the machine was not started")
        if self._stats_refresh != refresh:
            await self.qmp.execute("qom-set", path=BALLOON_QOM, property="guest-stats-polling-interval",
                                   value=refresh)
            self._stats_refresh = refresh
        return await self.qmp.execute("qom-get", path=BALLOON_QOM, property="guest-stats")

    async def resize_disk(self, name: str, size: int) -> None:
        """Grow (or shrink) an attached disk to `size` bytes while the guest runs (QMP block_resize)."""
        if self.qmp is None:
            raise BackendError("the machine was not started")
        await self.qmp.execute("block_resize", device=name, size=size)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
