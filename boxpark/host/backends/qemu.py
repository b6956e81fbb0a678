"""The QEMU backend: the guest image in a real VM (Linux hosts; macOS later), KVM when it works, else TCG.

`qemu_args(spec, plan)` turns a spec and the host-side decisions (`Plan`: binary, accelerator,
transport, ports, file descriptors) into QEMU's argv, with no I/O, so it is unit-tested whole. The backend
makes those decisions, creates every socket QEMU or a helper needs and hands over the fds (the QMP socket,
virtiofsd's socket), starts QEMU paused (`-S`), connects QMP, reads the host port QEMU bound for the API
forward, and lets the guest run (`cont`) — so nothing races and the moment the guest's clock starts is
known to the millisecond.

Transport: vsock where /dev/vhost-vsock exists (API on vsock:CID:1024, the guest dials vsock:2:PORT);
else QEMU user networking — the API forwarded from 127.0.0.1:HOSTPORT to the guest's tcp:1024, the guest
dialing 10.0.2.2:PORT (slirp maps it to the host's loopback) — with the per-machine secret handed over in a
`-fw_cfg` file, never on the command line. KVM: see `kvm_usable`; this host's /dev/kvm is PVM-only (stock
kernels hang under it), which the probe recognises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ...transport import Address, listen_socket, parse_address, write_secret
from ..eventstream import EventStream
from ..spec import MachineSpec, host_arch, kernel_arch
from . import Backend, BackendError, Child, UnsupportedSpec, owner_namespace, tail

log = logging.getLogger("boxpark.host.qemu")

GUEST_API_PORT = 1024
SECRET_FWCFG = "opt/boxpark/secret"
USER_NET_GUEST = "10.0.2.15/24"
USER_NET_HOST = "10.0.2.2"  # slirp's gateway: the host's loopback, seen from the guest
USER_NET_DNS = "10.0.2.3"
DEFAULT_CPUS = 2
DEFAULT_MEMORY = 2048
VIRTIOFSD = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")
BINARIES = {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}
QMP_TIMEOUT = 10.0


# ------------------------------------------------------------------------------------ decisions


def kvm_usable(arch: str) -> tuple[bool, str]:
    """Whether to use KVM for an `arch` guest, and why. `BOXPARK_KVM=1`/`0` decides outright.

    Otherwise a cheap probe that boots nothing: same architecture, /dev/kvm opens read-write, and (on x86)
    a hardware KVM module is loaded — kvm_intel or kvm_amd — and kvm_pvm is not. A PVM-only /dev/kvm (as on
    this project's build hosts) answers every ioctl yet hangs a stock kernel, so it must not be picked.
    """
    forced = os.environ.get("BOXPARK_KVM")
    if forced in ("0", "1"):
        return forced == "1", f"BOXPARK_KVM={forced}"
    if arch != host_arch():
        return False, f"a {arch} guest on a {host_arch()} host"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return False, f"/dev/kvm: {exc.strerror}"
    if arch == "amd64":
        if os.path.exists("/sys/module/kvm_pvm"):
            return False, "/dev/kvm is PVM (kvm_pvm), which does not boot stock kernels"
        if not (os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd")):
            return False, "neither kvm_intel nor kvm_amd is loaded"
    return True, "/dev/kvm works"


def vsock_usable() -> bool:
    """vhost-vsock needs /dev/vhost-vsock on the host and AF_VSOCK in Python."""
    return os.path.exists("/dev/vhost-vsock") and hasattr(socket, "AF_VSOCK")


@dataclass
class Plan:
    """The host-side decisions `qemu_args` needs; everything a spec does not say."""

    binary: str
    accel: str = "tcg"  # tcg or kvm
    cpu: str | None = None  # -cpu; None: the default for the machine and accelerator
    transport: str = "user"  # user (tcp over slirp) or vsock
    api_port: int = 0  # user: the host port forwarded to the guest's API (0: QEMU picks one)
    events_port: int = 0  # the host port (or vsock port) the guest dials for the event stream
    cid: int = 0  # vsock: the guest's CID
    qmp_fd: int = -1  # a listening unix socket for QMP (made by us)
    secret_file: str | None = None  # user: handed over with -fw_cfg
    share_sockets: dict[str, str] = field(default_factory=dict)  # tag -> virtiofsd's socket path
    extra: list[str] = field(default_factory=list)  # more raw QEMU arguments, at the end


def default_cpu(arch: str, accel: str) -> str | None:
    if accel == "kvm":
        return "host"
    if arch == "arm64":
        return "cortex-a72"  # `max` is ~3x slower under TCG (pointer authentication emulation)
    return None  # x86 TCG: qemu64 (measured against max in bench/boot.py)


def settings(spec: MachineSpec, plan: Plan) -> dict[str, str]:
    """The `boxpark.*` settings the guest needs from this backend."""
    if plan.transport == "vsock":
        values = {"api": f"vsock:4294967295:{GUEST_API_PORT}", "events": f"vsock:2:{plan.events_port}"}
    else:
        # api_peers: the host's forwarded connections come from slirp's gateway (it rewrites the host's
        # loopback to it); the guest's containers reach 0.0.0.0:1024 too, from their own addresses.
        values = {"api": f"tcp:0.0.0.0:{GUEST_API_PORT}", "api_peers": USER_NET_HOST,
                  "events": f"tcp:{USER_NET_HOST}:{plan.events_port}", "secret": f"fwcfg:{SECRET_FWCFG}"}
    values["net"] = spec.net or f"static:{USER_NET_GUEST},{USER_NET_HOST},{USER_NET_DNS}"
    values["hostname"] = spec.name
    return values


def qemu_args(spec: MachineSpec, plan: Plan) -> list[str]:
    """QEMU's argv for `spec` under `plan` (pure: no I/O)."""
    cpus = spec.cpus or DEFAULT_CPUS
    memory = spec.memory or DEFAULT_MEMORY
    state = Path(spec.state_dir)
    args = [plan.binary]
    if spec.arch == "amd64":
        args += ["-machine", "q35"]
    else:
        args += ["-machine", "virt" + (",gic-version=max" if plan.accel == "kvm" else "")]
    args += ["-accel", plan.accel]
    cpu = plan.cpu or default_cpu(spec.arch, plan.accel)
    if cpu:
        args += ["-cpu", cpu]
    args += ["-smp", str(cpus), "-m", f"{memory}M",
             "-nographic", "-nodefaults", "-no-user-config", "-no-reboot", "-S"]
    if spec.shares:  # vhost-user needs the guest's memory shared with virtiofsd
        args += ["-object", f"memory-backend-memfd,id=mem,size={memory}M,share=on", "-numa", "node,memdev=mem"]
    rtc = f"base={spec.rtc_base}" + (",clock=vm" if spec.rtc_clock == "vm" else "")
    args += ["-rtc", rtc]
    assert spec.kernel is not None
    args += ["-kernel", spec.kernel]
    if spec.initrd:
        args += ["-initrd", spec.initrd]
    args += ["-append", spec.kernel_command_line(settings(spec, plan), extra="panic=-1")]
    # The root first, so it is /dev/vda; extra disks follow as vdb, vdc, … (PCI slot order).
    args += ["-drive", f"file={_opt(spec.root)},if=none,id=root,format=raw,readonly=on",
             "-device", "virtio-blk-pci,drive=root,serial=root"]
    for i, disk in enumerate(spec.disks):
        name = disk.name or f"disk{i + 1}"
        args += ["-drive", f"file={_opt(disk.path)},if=none,id={name},format={disk.format},"
                           f"readonly={'on' if disk.read_only else 'off'}"
                           + ("" if disk.read_only else ",discard=unmap"),
                 "-device", f"virtio-blk-pci,drive={name},serial={name}"]
    # Console (hvc0) and the init's log port: both always captured in the state directory.
    args += ["-device", "virtio-serial-pci,id=vser",
             "-chardev", f"file,id=console,path={_opt(str(state / 'console.log'))}",
             "-device", "virtconsole,chardev=console,bus=vser.0",
             "-chardev", f"file,id=initlog,path={_opt(str(state / 'init.log'))}",
             "-device", "virtserialport,chardev=initlog,bus=vser.0,name=boxpark.log"]
    args += ["-device", "virtio-rng-pci"]
    if plan.transport == "vsock":
        args += ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0",
                 "-device", f"vhost-vsock-pci,guest-cid={plan.cid}"]
    else:
        args += ["-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{plan.api_port}-:{GUEST_API_PORT}",
                 "-device", "virtio-net-pci,netdev=net0"]
    if plan.secret_file:
        args += ["-fw_cfg", f"name={SECRET_FWCFG},file={_opt(plan.secret_file)}"]
    for i, (tag, path) in enumerate(sorted(plan.share_sockets.items())):
        args += ["-chardev", f"socket,id=fs{i},path={_opt(path)}",
                 "-device", f"vhost-user-fs-pci,chardev=fs{i},tag={tag}"]
    if plan.qmp_fd >= 0:
        args += ["-chardev", f"socket,id=qmp,fd={plan.qmp_fd},server=on,wait=off",
                 "-mon", "chardev=qmp,mode=control"]
    # A second QMP monitor for people and tests (the backend keeps the first): state/qmp-user.sock.
    args += ["-chardev", f"socket,id=qmpuser,path={_opt(str(state / 'qmp-user.sock'))},server=on,wait=off",
             "-mon", "chardev=qmpuser,mode=control"]
    return args + plan.extra


def _opt(value: str) -> str:
    """A value inside a QEMU option list: commas are doubled."""
    return value.replace(",", ",,")


# ------------------------------------------------------------------------------------ QMP


class QmpError(Exception):
    """QEMU refused a QMP command: `klass` is QMP's error class, the message QEMU's."""

    def __init__(self, command: str, klass: str, message: str) -> None:
        super().__init__(f"QMP {command}: {message}")
        self.klass = klass


class Qmp:
    """A minimal QMP client: one command at a time; asynchronous events are kept in `events`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str) -> Qmp:
        reader, writer = await asyncio.open_unix_connection(path)
        qmp = cls(reader, writer)
        greeting = await qmp._read()
        if "QMP" not in greeting:
            raise BackendError(f"{path} is not a QMP socket: {greeting}")
        await qmp.execute("qmp_capabilities")
        return qmp

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise ConnectionResetError("QEMU closed the QMP connection")
        message: dict[str, Any] = json.loads(line)
        return message

    async def execute(self, command: str, **arguments: Any) -> Any:
        async with self._lock:
            request: dict[str, Any] = {"execute": command}
            if arguments:
                request["arguments"] = arguments
            self._writer.write(json.dumps(request).encode() + b"\n")
            await self._writer.drain()
            while True:
                message = await self._read()
                if "event" in message:
                    self.events.append(message)
                    continue
                if "error" in message:
                    error = message["error"]
                    raise QmpError(command, error.get("class", ""), error.get("desc", str(error)))
                return message.get("return")

    async def hmp(self, command_line: str) -> str:
        """A human monitor command (for what QMP lacks, e.g. `info usernet`)."""
        result = await self.execute("human-monitor-command", **{"command-line": command_line})
        return str(result)

    def close(self) -> None:
        self._writer.close()


_HOSTFWD = re.compile(r"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+(\d+)")


def forwarded_port(usernet: str, guest_port: int) -> int | None:
    """The host port of the hostfwd rule to `guest_port`, from `info usernet`."""
    for match in _HOSTFWD.finditer(usernet):
        if int(match[2]) == guest_port:
            return int(match[1])
    return None


# ------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def virtiofsd(tag: str, source: str, state: Path,
              owner: tuple[int, int] | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """virtiofsd for one share, on a listening socket we made; yields (socket path, process).

    With `owner` (uid, gid), virtiofsd runs in a user namespace where its root is that user: what the guest's
    root creates belongs to the owner on the host (see `owner_namespace`).
    """
    binary = next((p for p in VIRTIOFSD if os.access(p, os.X_OK)), None) or shutil.which("virtiofsd")
    if binary is None:
        raise BackendError("directory shares need virtiofsd (apt-get install qemu-system-common, or virtiofsd)")
    path = str(state / f"fs-{tag}.sock")
    sock = listen_socket(parse_address(f"unix:{path}"))
    sock.setblocking(True)
    logfile = os.open(state / f"virtiofsd-{tag}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    argv = [binary, f"--fd={sock.fileno()}", "-o", f"source={source}", "-o", "cache=auto"]
    fds = [sock.fileno()]
    try:
        with contextlib.ExitStack() as namespace:
            if owner is not None:
                userns = namespace.enter_context(owner_namespace(*owner))
                argv = [_nsenter(), f"--user=/proc/self/fd/{userns}", "--", *argv]
                fds.append(userns)
            process = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile)
    finally:
        os.close(logfile)
        sock.close()
    try:
        yield path, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _nsenter() -> str:
    binary = shutil.which("nsenter")
    if binary is None:
        raise BackendError("mapping the home share to its owner needs nsenter (util-linux)")
    return binary


def free_tcp_listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket on `host:port` (port 0: a free one the kernel picks; no pick-then-bind race)."""
    return listen_socket(parse_address(f"tcp:{host}:{port}"))


# ------------------------------------------------------------------------------------ the backend


class QemuBackend(Backend):
    """`get_backend("qemu")`: a VM. `cpu` overrides -cpu; `extra_args` are appended to QEMU's argv."""

    name = "qemu"

    def __init__(self, *, cpu: str | None = None, extra_args: list[str] | None = None,
                 block_resize: bool | None = None) -> None:
        super().__init__()
        # BOXPARK_QEMU_BLOCK_RESIZE=0 makes QEMU behave as VZ does (no disk grows under a running guest):
        # the grow-the-file-and-reboot path then runs here, where it can be tested
        if block_resize is None:
            block_resize = os.environ.get("BOXPARK_QEMU_BLOCK_RESIZE") != "0"
        self.grows_disks_online = block_resize
        self.cpu = cpu
        self.extra_args = list(extra_args or [])
        self.plan: Plan | None = None
        self.qmp: Qmp | None = None
        self.argv: list[str] = []
        self.accel_reason = ""
        self.running_at: float | None = None  # time.monotonic() when the guest started running (cont)
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
        if spec.shares and not (any(os.access(p, os.X_OK) for p in VIRTIOFSD) or shutil.which("virtiofsd")):
            raise UnsupportedSpec("shares", "directory shares need virtiofsd, which is not installed")

    def log_files(self) -> list[tuple[str, str]]:
        assert self.spec is not None
        return [("QEMU's stderr", self.spec.state_file("qemu.log")), *super().log_files()]

    async def _start(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        state = Path(spec.state_dir)
        for name in ("console.log", "init.log", "qemu.log"):
            (state / name).write_bytes(b"")
        use_kvm, self.accel_reason = kvm_usable(spec.arch)
        transport = "vsock" if vsock_usable() else "user"
        plan = Plan(binary=shutil.which(BINARIES[spec.arch]) or BINARIES[spec.arch],
                    accel="kvm" if use_kvm else "tcg", cpu=self.cpu, transport=transport, extra=self.extra_args)
        log.debug("qemu: %s (%s), transport %s", plan.accel, self.accel_reason, transport)

        # The event listener first: its address goes on the guest's command line.
        if transport == "vsock":
            plan.cid = random.randint(3, 0xFFFF_FFF0)
            events_port = random.randint(1025, 0xFFFF_FF00)
            events_address = Address("vsock", cid=0xFFFFFFFF, port=events_port)  # VMADDR_CID_ANY
            listener = listen_socket(events_address)
            plan.events_port = events_port
            self.api_address = f"vsock:{plan.cid}:{GUEST_API_PORT}"
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
            path, _ = stack.enter_context(virtiofsd(tag, source, Path(spec.state_dir), spec.share_owners.get(tag)))
            self.plan.share_sockets[tag] = path

    async def _restart(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        """A new QEMU for the same plan (the event listener stays): it opens the disk images anew.

        virtiofsd serves one QEMU and ends with it, so each share gets a new one.
        """
        await self._reap()
        self.qmp = None
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
                                     pass_fds=[plan.qmp_fd], preexec_fn=_die_with_parent)
        except OSError as exc:
            raise BackendError(f"cannot start {self.argv[0]}: {exc.strerror}") from None
        finally:
            os.close(stderr)
            qmp_listener.close()  # QEMU has its own copy
        self.child = Child(popen, "qemu")
        self._record_pid(self.child, self.argv[0])

        self.qmp = await self._connect_qmp(qmp_path)
        if transport == "user":
            usernet = await self.qmp.hmp("info usernet")
            api_port = forwarded_port(usernet, GUEST_API_PORT)
            if api_port is None:
                raise BackendError(f"QEMU did not report its forward to the guest's API port:\n{usernet}")
            self.api_address = f"tcp:127.0.0.1:{api_port}"
        await self.qmp.execute("cont")
        self.running_at = time.monotonic()
        self.running_at_wall = time.time()

    async def _connect_qmp(self, path: str) -> Qmp:
        """QEMU's QMP, or a `BackendError` saying why not — with QEMU's stderr when QEMU exited."""
        assert self.child is not None
        connecting = asyncio.ensure_future(asyncio.wait_for(Qmp.connect(path), QMP_TIMEOUT))
        ended = asyncio.ensure_future(self.child.wait())
        try:
            await asyncio.wait({connecting, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if connecting.done() and connecting.exception() is None:
            return connecting.result()
        connecting.cancel()
        # A QEMU that fails on its arguments may reset the connection just before it exits: give it a moment.
        code = await self.child.wait_for(2.0)
        if code is not None:
            raise BackendError(self.ended_message(code, "while starting"))
        problem = connecting.exception() if connecting.done() and not connecting.cancelled() else None
        if isinstance(problem, asyncio.TimeoutError) or problem is None:
            raise BackendError(f"QEMU did not answer on its QMP socket {path} within {QMP_TIMEOUT:g} s")
        raise BackendError(f"cannot talk to QEMU on its QMP socket {path}: {problem}")

    async def _graceful_stop(self) -> None:
        """Poweroff over the Guest API (the init stops its services, syncs, powers off); QEMU then exits."""
        if not await self.poweroff_guest():
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

    def _record_extra(self) -> dict[str, object]:
        return {"accel": self.plan.accel if self.plan else None, "accel_reason": self.accel_reason,
                "qmp": self.spec.state_file("qmp.sock") if self.spec else None}

    # ----------------------------------------------------------------------- extras

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

    async def resize_disk(self, name: str, size: int) -> None:
        """Grow (or shrink) an attached disk to `size` bytes while the guest runs (QMP block_resize)."""
        if self.qmp is None:
            raise BackendError("the machine was not started")
        await self.qmp.execute("block_resize", device=name, size=size)

    def stderr_tail(self) -> str:
        assert self.spec is not None
        return tail(self.spec.state_file("qemu.log"))


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _die_with_parent() -> None:
    """preexec_fn: QEMU gets SIGKILL if the host process that started it dies (no orphan VMs)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
