"""The vz backend: the guest in Apple's Virtualization.framework (macOS 13+, Apple silicon), through PyObjC.

A thin executor: `vzplan.make_plan` has checked the spec and decided every object and setting; this module
only makes those objects. PyObjC (objc, Virtualization, Foundation, dispatch) is imported here only, and
only on macOS: elsewhere `get_backend("vz")` says what is missing (`require_macos`).

Threads: each machine has its own serial dispatch queue and every VZ call is made on it (`_on_queue`);
VZ answers on that queue too (completion handlers, the socket listener's delegate, the VM's delegate) and
the answers reach asyncio only through `gcdbridge` (call_soon_threadsafe, one-shot, late answers closed).
ObjC holds delegates and listeners weakly: `_keep` holds them for the machine's life.

Connections: the VM lives in this process, so nothing else can dial its vsock, and nothing here relays.
`dial(port)` is a `connectToPort` whose connection's socket goes straight to the caller (the agent's API
client, its Docker proxy's relay); the guest's event-stream dials, taken by a VZVirtioSocketListener on the
plan's events port, go straight into the `EventStream` (`take`). A connection's fd is duplicated for our
side and its VZVirtioSocketConnection kept until our copy closes (`gcdbridge.KeptSocket`, and
`ReleasingSocket` for a copy handed to code that only knows sockets), then closed on the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from ... import protocol
from ...protocol import Ready
from ...transport import Address, TransportError
from ..eventstream import EventStream
from ..gcdbridge import Completion, Inbox, KeptSocket
from ..spec import MachineSpec
from .base import API_PORT, Backend, BackendError
from .logs import with_logs
from .vzplan import (EVENTS_PORT, ROSETTA_DIR, ROSETTA_TAG, RosettaChoice, VzLimits, VzPlan, make_plan,
                     rosetta_setup_argv)

log = logging.getLogger("boxpark.host.vz")

T = TypeVar("T")
INSTALL_HINT = "pip install 'boxpark[macos]'"
SIGN_HINT = "run `boxpark vz sign` and start Boxpark through the signed launcher it prints"
STOP_TIMEOUT = 10.0
GUEST_CID = 3  # how VZ numbers its guest: a name for messages, not an address any other process can dial


class VzError(BackendError):
    """Virtualization.framework refused something; the message carries VZ's own text verbatim."""


def require_macos() -> None:
    """`BackendError` unless this host can run the vz backend (macOS, PyObjC's Virtualization, VZ support)."""
    if sys.platform != "darwin":
        raise BackendError(f"the vz backend runs on macOS (Virtualization.framework), not {sys.platform}; "
                           f"use backend = \"qemu\" here")
    try:
        import dispatch  # noqa: F401
        import Virtualization
    except ImportError as exc:
        raise BackendError(f"the vz backend needs PyObjC's Virtualization and libdispatch ({exc}): "
                           f"{INSTALL_HINT}") from None
    if not hasattr(Virtualization, "VZVirtioConsoleDeviceConfiguration"):
        raise BackendError("the vz backend needs macOS 13 or later (virtio console ports, Rosetta)")
    if not Virtualization.VZVirtualMachine.isSupported():
        raise BackendError("this Mac does not support virtualization (VZVirtualMachine.isSupported is false; "
                           "inside a VM, nested virtualization is off)")


def read_limits() -> VzLimits:
    """This Mac's limits, from VZVirtualMachineConfiguration and VZLinuxRosettaDirectoryShare."""
    import Virtualization as VZ

    config = VZ.VZVirtualMachineConfiguration
    availability = {0: "unsupported", 1: "not-installed", 2: "installed"}
    rosetta = "unsupported"
    if hasattr(VZ, "VZLinuxRosettaDirectoryShare"):
        rosetta = availability.get(int(VZ.VZLinuxRosettaDirectoryShare.availability()), "unsupported")
    machine = platform.machine().lower()
    return VzLimits(min_memory=int(config.minimumAllowedMemorySize()),
                    max_memory=int(config.maximumAllowedMemorySize()),
                    min_cpus=int(config.minimumAllowedCPUCount()),
                    max_cpus=int(config.maximumAllowedCPUCount()),
                    rosetta=rosetta,  # type: ignore[arg-type]
                    host_arch="arm64" if machine in ("arm64", "aarch64") else "amd64")


def error_text(error: Any) -> str:
    """VZ's NSError as VZ words it: the description, and the failure reason when it adds one."""
    if error is None:
        return "unknown error"
    text = str(error.localizedDescription())
    reason = error.localizedFailureReason()
    if reason and str(reason) not in text:
        text += f" ({reason})"
    return text


def vz_error(what: str, error: Any) -> VzError:
    text = error_text(error)
    hint = f"; {SIGN_HINT}" if "entitlement" in text.lower() else ""
    return VzError(f"{what}: {text}{hint}")


# ------------------------------------------------------------------------------------ ObjC classes

_CLASSES: dict[str, Any] = {}


def _objc_classes() -> dict[str, Any]:
    """The delegate classes, defined once per process (ObjC class names are global)."""
    if _CLASSES:
        return _CLASSES
    import objc
    from Foundation import NSObject

    class BoxparkVzListenerDelegate(NSObject):  # VZVirtioSocketListenerDelegate
        @objc.typedSelector(b"Z@:@@@")
        def listener_shouldAcceptNewConnection_fromSocketDevice_(self, listener: Any, connection: Any,
                                                                 device: Any) -> bool:
            return bool(self.accept(connection))  # type: ignore[attr-defined]

    class BoxparkVzMachineDelegate(NSObject):  # VZVirtualMachineDelegate
        @objc.typedSelector(b"v@:@")
        def guestDidStopVirtualMachine_(self, vm: Any) -> None:
            self.ended(0, "the guest powered off")  # type: ignore[attr-defined]

        @objc.typedSelector(b"v@:@@")
        def virtualMachine_didStopWithError_(self, vm: Any, error: Any) -> None:
            self.ended(1, f"VZ stopped the machine: {error_text(error)}")  # type: ignore[attr-defined]

    _CLASSES.update(listener=BoxparkVzListenerDelegate, machine=BoxparkVzMachineDelegate)
    return _CLASSES


# ------------------------------------------------------------------------------------ the machine


class VmEnd:
    """The machine's end, as a backend's `child` has it; the VM runs in this process, so there is no pid.

    `returncode`: 0 the guest powered off, 1 VZ stopped it with an error, 2 the host stopped it.
    """

    pid = 0

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.completion: Completion[tuple[int, str]] = Completion(loop)

    def finish(self, code: int, reason: str) -> None:
        """From any thread; only the first end counts."""
        self.completion((code, reason))

    @property
    def returncode(self) -> int | None:
        future = self.completion.future
        return future.result()[0] if future.done() and not future.cancelled() else None

    @property
    def reason(self) -> str:
        future = self.completion.future
        return future.result()[1] if future.done() and not future.cancelled() else ""

    async def wait(self) -> int:
        code, _ = await asyncio.shield(self.completion.future)
        return code

    async def wait_for(self, timeout: float) -> int | None:
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        pass


class VzMachine:
    """One VZVirtualMachine made from a `VzPlan`, on its own serial dispatch queue."""

    def __init__(self, plan: VzPlan, loop: asyncio.AbstractEventLoop,
                 accept: Callable[[KeptSocket], None]) -> None:
        import dispatch

        self.plan = plan
        self.loop = loop
        self._dispatch = dispatch
        self.queue = dispatch.dispatch_queue_create(f"org.boxpark.vz.{plan.name}".encode(), None)  # serial
        self.end = VmEnd(loop)
        self.inbox: Inbox[KeptSocket] = Inbox(loop, handler=accept, discard=KeptSocket.close)
        self.vm: Any = None
        self.socket_device: Any = None
        self._keep: list[Any] = []  # delegates, listener, file handles, configuration: ObjC holds them weakly

    def _on_queue(self, fn: Callable[[], T]) -> Completion[T]:
        """Run `fn` on the machine's queue; await the returned completion for its result or exception."""
        done: Completion[T] = Completion(self.loop)

        def block() -> None:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
                done(None, exc)
            else:
                done(result)

        self._dispatch.dispatch_async(self.queue, block)
        return done

    def release(self, connection: object) -> None:
        """Close a VZVirtioSocketConnection on the queue (from any thread), after our copy of its fd closed."""
        self._dispatch.dispatch_async(self.queue, lambda: connection.close())  # type: ignore[attr-defined]

    # ----------------------------------------------------------------------- on the queue

    def _configure(self) -> Any:
        """The VZVirtualMachineConfiguration of the plan, validated (VZ's error verbatim)."""
        import Virtualization as VZ
        from Foundation import NSURL, NSFileHandle

        plan = self.plan
        url = NSURL.fileURLWithPath_
        config = VZ.VZVirtualMachineConfiguration.alloc().init()
        config.setCPUCount_(plan.cpus)
        config.setMemorySize_(plan.memory)

        boot = VZ.VZLinuxBootLoader.alloc().initWithKernelURL_(url(plan.boot.kernel))
        if plan.boot.initrd:
            boot.setInitialRamdiskURL_(url(plan.boot.initrd))
        boot.setCommandLine_(plan.boot.command_line)
        config.setBootLoader_(boot)

        disks = []
        for disk in plan.disks:
            attachment, error = VZ.VZDiskImageStorageDeviceAttachment.alloc().initWithURL_readOnly_error_(
                url(disk.path), disk.read_only, None)
            if attachment is None:
                raise vz_error(f"cannot attach {disk.path}", error)
            device = VZ.VZVirtioBlockDeviceConfiguration.alloc().initWithAttachment_(attachment)
            device.setBlockDeviceIdentifier_(disk.identifier)
            disks.append(device)
        config.setStorageDevices_(disks)

        shares = []
        for share in plan.shares:
            device = VZ.VZVirtioFileSystemDeviceConfiguration.alloc().initWithTag_(share.tag)
            directory = VZ.VZSharedDirectory.alloc().initWithURL_readOnly_(url(share.path), share.read_only)
            device.setShare_(VZ.VZSingleDirectoryShare.alloc().initWithDirectory_(directory))
            shares.append(device)
        if plan.rosetta is not None:
            rosetta, error = VZ.VZLinuxRosettaDirectoryShare.alloc().initWithError_(None)
            if rosetta is None:
                raise vz_error("cannot share Rosetta", error)
            device = VZ.VZVirtioFileSystemDeviceConfiguration.alloc().initWithTag_(plan.rosetta.tag)
            device.setShare_(rosetta)
            shares.append(device)
        config.setDirectorySharingDevices_(shares)

        config.setSocketDevices_([VZ.VZVirtioSocketDeviceConfiguration.alloc().init()])

        console = VZ.VZVirtioConsoleDeviceConfiguration.alloc().init()
        for index, port in enumerate(plan.console):
            fd = os.open(port.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            handle = NSFileHandle.alloc().initWithFileDescriptor_closeOnDealloc_(fd, True)
            self._keep.append(handle)
            entry = VZ.VZVirtioConsolePortConfiguration.alloc().init()
            entry.setName_(port.name)
            entry.setIsConsole_(port.is_console)
            entry.setAttachment_(
                VZ.VZFileHandleSerialPortAttachment.alloc().initWithFileHandleForReading_fileHandleForWriting_(
                    None, handle))
            console.ports().setObject_atIndexedSubscript_(entry, index)
        config.setConsoleDevices_([console])

        if plan.network is not None:
            network = VZ.VZVirtioNetworkDeviceConfiguration.alloc().init()
            network.setAttachment_(VZ.VZNATNetworkDeviceAttachment.alloc().init())
            network.setMACAddress_(VZ.VZMACAddress.alloc().initWithString_(plan.network.mac))
            config.setNetworkDevices_([network])
        if plan.entropy:
            config.setEntropyDevices_([VZ.VZVirtioEntropyDeviceConfiguration.alloc().init()])
        if plan.balloon:
            config.setMemoryBalloonDevices_(
                [VZ.VZVirtioTraditionalMemoryBalloonDeviceConfiguration.alloc().init()])

        ok, error = config.validateWithError_(None)
        if not ok:
            raise vz_error("VZ refused the machine's configuration", error)
        return config

    def _create(self, config: Any) -> None:
        """The VZVirtualMachine on our queue, its delegate, and the listener for the guest's dials."""
        import Virtualization as VZ

        classes = _objc_classes()
        self.vm = VZ.VZVirtualMachine.alloc().initWithConfiguration_queue_(config, self.queue)
        delegate = classes["machine"].alloc().init()
        delegate.ended = self.end.finish
        self.vm.setDelegate_(delegate)
        self.socket_device = self.vm.socketDevices()[0]
        listener = VZ.VZVirtioSocketListener.alloc().init()
        listener_delegate = classes["listener"].alloc().init()
        listener_delegate.accept = self._accept
        listener.setDelegate_(listener_delegate)
        for port in self.plan.socket.listen_ports:
            self.socket_device.setSocketListener_forPort_(listener, port)
        self._keep += [config, delegate, listener, listener_delegate]

    def _accept(self, connection: Any) -> bool:
        """The listener delegate (on the queue): keep the connection, hand our copy of its fd to the loop."""
        try:
            kept = KeptSocket.dup(connection.fileDescriptor(), connection, self.release)
        except OSError as exc:
            log.warning("vz: cannot take the guest's connection: %s", exc)
            return False
        return self.inbox.deliver(kept)

    # ----------------------------------------------------------------------- from the loop

    async def start(self) -> None:
        config = await self._on_queue(self._configure)
        await self._on_queue(lambda: self._create(config))
        started: Completion[None] = Completion(self.loop)

        def handler(error: Any) -> None:
            started(None, vz_error("VZ could not start the machine", error) if error is not None else None)

        await self._on_queue(lambda: self.vm.startWithCompletionHandler_(handler))
        await started

    async def connect(self, port: int, timeout: float = 10.0) -> KeptSocket:
        """A connection to the guest's vsock `port` (connectToPort), as a socket we own."""
        got: Completion[KeptSocket] = Completion(self.loop, discard=KeptSocket.close)

        def handler(connection: Any, error: Any) -> None:
            if connection is None:
                got(None, vz_error(f"cannot connect to the guest's vsock port {port}", error))
                return
            try:
                got(KeptSocket.dup(connection.fileDescriptor(), connection, self.release))
            except OSError as exc:
                connection.close()
                got(None, exc)

        await self._on_queue(lambda: self.socket_device.connectToPort_completionHandler_(port, handler))
        return await asyncio.wait_for(got.future, timeout)

    async def stop(self) -> None:
        """Stop the VM at once (the guest is not asked: that is the backend's graceful stop)."""
        if self.vm is None or self.end.returncode is not None:
            return
        stopped: Completion[None] = Completion(self.loop)

        def handler(error: Any) -> None:
            if error is not None:
                stopped(None, vz_error("VZ could not stop the machine", error))
            else:
                self.end.finish(2, "the host stopped the machine")
                stopped(None)

        def request() -> None:
            if self.vm.canStop():
                self.vm.stopWithCompletionHandler_(handler)
            else:  # not running (yet or any more): nothing to stop
                self.end.finish(2, f"stopped by the host in state {int(self.vm.state())}")
                stopped(None)

        await self._on_queue(request)
        await asyncio.wait_for(stopped.future, STOP_TIMEOUT)

    async def set_balloon(self, size: int) -> None:
        """The traditional balloon's target: the guest's memory size VZ asks its driver to get down (or up) to."""
        def set_target(balloon: Any) -> None:  # a VZVirtioTraditionalMemoryBalloonDevice (the only kind)
            balloon.setTargetVirtualMachineMemorySize_(size)

        def request() -> None:
            if self.vm is not None:
                for device in self.vm.memoryBalloonDevices():
                    set_target(device)

        await self._on_queue(request)

    async def close(self) -> None:
        """Stop if running, stop taking connections, and drop every reference (after VZ is done with them)."""
        self.inbox.close()
        try:
            await self.stop()
        except (VzError, asyncio.TimeoutError) as exc:
            log.warning("vz: %s", exc)
        await self._on_queue(self._drop)

    def _drop(self) -> None:
        """On the queue: our last references to the VM and its objects. A PyObjC proxy releases its ObjC
        object where its last Python reference goes, and a VZVirtualMachine must be used (and so
        deallocated) only on its queue."""
        vm, device, kept = self.vm, self.socket_device, list(self._keep)
        self.vm = self.socket_device = None
        self._keep.clear()
        del vm, device, kept  # released here, on the queue's thread


# ------------------------------------------------------------------------------------ the backend


class ReleasingSocket(socket.socket):
    """Our copy of a VZ connection's fd as a plain socket: closing it also releases VZ's connection object.

    asyncio's transports and the relays close sockets, not `KeptSocket`s; this is how a copy handed to
    them still lets VZ's object go (on the VM's queue) once nobody uses the connection.
    """

    kept: KeptSocket | None = None

    @classmethod
    def take(cls, kept: KeptSocket) -> ReleasingSocket:
        sock = cls(fileno=kept.sock.detach())
        sock.kept = kept
        return sock

    def close(self) -> None:
        super().close()
        kept, self.kept = self.kept, None
        if kept is not None:
            kept.close()  # its own socket is detached: this only releases VZ's object


class VzBackend(Backend):
    """`get_backend("vz")`: a VM in this process. `rosetta`: auto (when installed), on (required), off."""

    name = "vz"
    balloon = "hold"  # VZVirtioTraditionalMemoryBalloonDevice: a target size, no reporting, no deflate-on-OOM
    machine_class: Callable[..., VzMachine] = VzMachine  # tests put a fake here (tests/integration/test_vz_forward.py)

    def __init__(self, *, rosetta: RosettaChoice = "auto") -> None:
        super().__init__()
        self.rosetta: RosettaChoice = rosetta
        self.plan: VzPlan | None = None
        self.machine: VzMachine | None = None
        self.rosetta_ready = False

    def check(self, spec: MachineSpec) -> None:
        require_macos()
        self.plan = make_plan(spec, read_limits(), rosetta=self.rosetta)
        for note in self.plan.notes:
            log.info("vz: %s", note)

    def pids(self) -> list[int]:
        return []  # the VM runs in this process: there is nothing else to kill

    async def _start(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        assert self.plan is not None
        plan = self.plan
        state = Path(spec.state_dir)
        for port in plan.console:
            Path(port.path).write_bytes(b"")
        # no listening socket: VZ's listener takes the guest's dials and hands each to the stream
        self.events = EventStream(Address("vsock", cid=2, port=EVENTS_PORT),
                                  logs=f"{state}/init.log and {state}/console.log")
        stack.push_async_callback(self.events.close)
        await self._new_machine(stack)

    async def _restart(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        """A new VZVirtualMachine for the same plan: a Linux guest's reboot stops a VZ machine, and only a
        new attachment shows a disk image grown meanwhile. The event stream stays."""
        assert self.plan is not None and self.machine is not None
        await self.machine.close()
        disks = tuple(dataclasses.replace(d, size=os.stat(d.path).st_size) for d in self.plan.disks)
        self.plan = dataclasses.replace(self.plan, disks=disks)
        self.rosetta_ready = False
        await self._new_machine(stack)

    async def _new_machine(self, stack: contextlib.AsyncExitStack) -> None:
        assert self.plan is not None
        self.machine = self.machine_class(self.plan, asyncio.get_running_loop(), self._guest_dialled)
        stack.push_async_callback(self.machine.close)
        self.spawned_at = time.monotonic()
        await self.machine.start()
        self.child = self.machine.end

    # ----------------------------------------------------------------------- connections

    def address(self, port: int) -> Address:
        return Address("vsock", cid=GUEST_CID, port=port)

    async def dial(self, port: int, timeout: float = 10.0) -> socket.socket:
        """connectToPort, and our copy of the connection's fd: no relay, no socket file."""
        if self.machine is None:
            raise BackendError("the machine was not started")
        try:
            kept = await self.machine.connect(port, timeout)
        except (VzError, OSError, asyncio.TimeoutError) as exc:
            raise TransportError(f"cannot connect to the guest's vsock port {port}: "
                                 f"{exc or 'timed out'}") from None
        sock = ReleasingSocket.take(kept)
        sock.setblocking(False)
        return sock

    def _guest_dialled(self, kept: KeptSocket) -> None:
        """On the loop: the guest dialled the event-stream port; the stream takes the connection itself."""
        if self.events is None:
            kept.close()
            return
        sock = ReleasingSocket.take(kept)
        sock.setblocking(False)
        self.events.take(sock)

    # ----------------------------------------------------------------------- lifecycle

    async def wait_ready(self, timeout: float = 60.0) -> Ready:
        """The guest's Ready; then Rosetta mounted and registered when the plan shares it."""
        ready = await super().wait_ready(timeout)
        if self.plan is not None and self.plan.rosetta is not None and not self.rosetta_ready:
            await self._setup_rosetta()
        return ready

    async def _setup_rosetta(self) -> None:
        """Mount the Rosetta share and register it for x86_64 ELF; amd64 containers need it, nothing else does."""
        try:
            mounted = await self._ask_guest(protocol.Mount(source=ROSETTA_TAG, target=ROSETTA_DIR, fstype="virtiofs",
                                                           options=["ro"], mkdir=True), timeout=10)
            if not isinstance(mounted, protocol.Ok):
                raise BackendError(mounted.message if isinstance(mounted, protocol.Error)
                                   else f"the guest answered {mounted!r}")
            result = await self._ask_guest(protocol.Exec(argv=rosetta_setup_argv(), timeout=30), timeout=40)
            if not isinstance(result, protocol.ExecResult):
                raise BackendError(f"the guest answered {result!r}")
            if result.code != 0:
                raise BackendError(result.stderr.decode(errors="replace").strip() or f"exit {result.code}")
            self.rosetta_ready = True
        except Exception as exc:
            log.warning("vz: Rosetta could not be set up, amd64 containers will not run: %s", exc)

    async def _graceful_stop(self) -> None:
        """Poweroff over the Guest API (the init stops its services, syncs, powers off); else stop the VM."""
        assert self.machine is not None
        if not await self._poweroff_guest():
            await self.machine.stop()
        await self.machine.end.wait()

    def ended_message(self, code: int, when: str) -> str:
        reason = self.machine.end.reason if self.machine is not None else ""
        return with_logs(f"the vz machine stopped {when}: {reason or f'code {code}'}", self.log_files(),
                         empty_hint=False)

    async def set_balloon(self, size: int) -> None:
        if self.machine is not None and self.plan is not None and self.plan.balloon:
            await self.machine.set_balloon(size)

    def describe(self) -> dict[str, object]:
        plan = self.plan
        return {"rosetta": plan is not None and plan.rosetta is not None,
                "mac": plan.network.mac if plan is not None and plan.network is not None else None}
