"""The sandbox backend: the real init as PID 1 in Linux namespaces over the real squashfs root, no VM.

For development and tests (root only, Linux only). The host attaches the image's root.squashfs to a loop
device (read-only), makes a cgroup of the sandbox's own, listens on the event socket in the state
directory, and runs `preinit.py` (see there), which unshares new pid/mount/net/uts/ipc/cgroup namespaces
once the host has moved it into that cgroup, forks, and execs the image's /sbin/init as PID 1 (it stays as
its parent, as `unshare --fork` did). The guest's API and event sockets are unix sockets in the state directory,
which the guest sees at /run/boxpark/host; docker.sock and published-port streams skip the API (the host
opens the guest's socket itself: `connect_direct`, `sandboxdial`). Directory shares (the spec's virtiofs
shares) need no virtiofsd: the preinit binds each host directory at /run/boxpark/shares/TAG (`binds_shares`) and the agent's init
phase binds that on the share's target. A share with an owner (the home) is an idmapped mount, where the guest's root acts as the
owner, as with the qemu backend's virtiofsd; other shares keep the host's ids (root writes as root).
`cpus` and `memory` become the cgroup's cpu.max and memory.max where the host's cgroup2 has those
controllers; where it has not (they are bound to cgroup v1), the sandbox runs unlimited and says so.

The network: slirp4netns attaches a tap (eth0) to the sandbox's network namespace and gives it QEMU's
user-mode layout (gateway 10.0.2.2 = the host's loopback, DNS 10.0.2.3, the guest at 10.0.2.100), so the
guest and its containers reach the host and, through the host's sockets, the world. Without slirp4netns the
sandbox has loopback only (the log says so).

It is not a security boundary, but it never touches what is global to the machine: no host /dev, no
CAP_SYS_TIME, no CAP_SYS_BOOT, no swap; every process lands in its cgroup, so stopping finds them all.
Stopping leaves nothing behind: no process (the cgroup is killed and removed), no mount (the mount
namespace dies with its last process), no loop device (detached from the host side).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ... import protocol
from ...transport import Address, TransportError, dial_blocking, dial_socket, listen_socket, parse_address
from ..eventstream import EventStream
from ..spec import SHARES_DIR, MachineSpec, host_arch
from .base import API_PORT, Backend, BackendError, UnsupportedSpec
from .cgroup import Cgroup, cgroup2_controllers, cgroup2_mount, sandbox_cgroup
from .loopdev import loop_device
from .process import PidfdProcess, die_with_parent
from .sandboxdial import GuestDialer
from .userns import owner_namespace

__all__ = ["SandboxBackend", "cgroup2_controllers", "cgroup2_mount", "loop_device", "share_arguments"]

log = logging.getLogger("boxpark.host.sandbox")

GUEST_HOST_DIR = "/run/boxpark/host"
# what the pre-init does itself, as util-linux's unshare: for the floor of bench/boot.py
UNSHARE = ("unshare", "--pid", "--mount", "--net", "--uts", "--ipc", "--cgroup", "--fork", "--kill-child")
PREINIT = str(Path(__file__).with_name("preinit.py"))
# imported, not run as a script: a script is compiled anew on every boot, an import uses __pycache__
PREINIT_RUN = f"import sys; sys.path.append({str(Path(PREINIT).parent)!r}); from preinit import run; run()"
SLIRP_NET = "static:10.0.2.100/24,10.0.2.2,10.0.2.3"  # slirp4netns's own default guest address
SLIRP_ARGS = ("--enable-sandbox", "--enable-seccomp")  # it runs in an empty root, with a syscall filter
CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18


class SandboxBackend(Backend):
    """`get_backend("sandbox")`: namespaces, a loop-mounted squashfs root, unix-socket transport."""

    name = "sandbox"
    binds_shares = True

    def __init__(self) -> None:
        super().__init__()
        self.cgroup: Cgroup | None = None
        self.loop_device: str | None = None
        self.slirp4netns = shutil.which("slirp4netns")
        self.slirp: PidfdProcess | None = None
        self.unshare: PidfdProcess | None = None  # the machine's process: unshare, parent of the guest's PID 1
        self._dialer: tuple[PidfdProcess, GuestDialer] | None = None  # of this unshare's guest (a reboot: anew)
        self._dialer_lock = threading.Lock()  # relay threads ask for it at once

    def check(self, spec: MachineSpec) -> None:
        if sys.platform != "linux":
            raise BackendError("the sandbox backend needs Linux (namespaces); use qemu or vz here")
        if os.geteuid() != 0:
            raise BackendError("the sandbox backend needs root (namespaces, mounts, a loop device); "
                               "run as root or use the qemu backend")
        if spec.arch != host_arch():
            raise UnsupportedSpec("arch", f"the sandbox runs the image on this host's CPU ({host_arch()}); "
                                          f"a {spec.arch} image needs the qemu backend")
        if spec.disks:
            raise UnsupportedSpec("disks", "the sandbox has no extra disks (nor swap, which lives on one); "
                                           "use the qemu backend for disks and swap")
        for key, value in (("api", spec.api), ("events", spec.events)):
            if value is not None and parse_address(value).kind != "unix":
                raise UnsupportedSpec(key, "the sandbox talks over unix sockets in its state directory only; "
                                           "leave it unset")
        try:
            with open(spec.root, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise UnsupportedSpec("root", f"cannot read {spec.root}: {exc.strerror}") from None
        if magic != b"hsqs":
            raise UnsupportedSpec("root", f"{spec.root} is not a squashfs image")

    def settings(self, spec: MachineSpec) -> dict[str, str]:
        """The `boxpark.*` settings this backend hands the init."""
        return {
            "api": f"unix:{GUEST_HOST_DIR}/api.sock",
            "events": f"unix:{GUEST_HOST_DIR}/events.sock",
            "sandbox": "1",
            "logfile": f"{GUEST_HOST_DIR}/init.log",
            "net": spec.net or (SLIRP_NET if self.slirp4netns else "none"),
            "hostname": spec.name,
        }

    async def _start(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        state = Path(spec.state_dir)
        for name in ("console.log", "init.log"):
            (state / name).write_bytes(b"")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state / "api.sock")  # a previous boot's; the guest makes a fresh one
        mountpoint = state / "root"
        mountpoint.mkdir(exist_ok=True)
        command_line = spec.kernel_command_line(self.settings(spec))
        (state / "cmdline").write_text(command_line + "\n", encoding="utf-8")

        cpus, memory = self._limits(spec)
        self.cgroup = stack.enter_context(sandbox_cgroup(spec.name, cpus, memory))
        self.loop_device = stack.enter_context(loop_device(spec.root))

        events_address = parse_address(f"unix:{state}/events.sock")
        listener = listen_socket(events_address)
        self.events = EventStream(events_address, sock=listener,
                                  logs=f"{state}/init.log and {state}/console.log")
        await self.events.start()
        stack.push_async_callback(self.events.close)
        # a guest that is killed cannot remove its socket: a file that answers nobody must not outlive us
        stack.callback(_remove, state / "api.sock")

        userns = {tag: stack.enter_context(owner_namespace(*owner, idmap=True))
                  for tag, owner in spec.share_owners.items()}
        sync_read, sync_write = os.pipe()  # the pre-init waits on it until it is in the cgroup
        argv = [os.path.realpath(sys.executable), "-S", "-I", "-c", PREINIT_RUN, str(sync_read), str(os.getpid()),
                self.loop_device, str(mountpoint), str(state), "/sbin/init", command_line,
                *share_arguments(spec.shares, userns)]
        console = os.open(state / "console.log", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            self.spawned_at = time.monotonic()
            # no preexec_fn: Python spawns with vfork, without copying the agent's page tables
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=console,
                                     close_fds=True, pass_fds=[sync_read, *userns.values()])
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(sync_write)
            raise BackendError(f"cannot start the sandbox ({argv[0]}): {getattr(exc, 'strerror', None) or exc}") from None
        finally:
            os.close(console)
            os.close(sync_read)
        self.child = self.unshare = PidfdProcess(popen, "unshare")
        self._record_pid(self.unshare, argv[0])
        stack.push_async_callback(self._reap)
        await self._join_cgroup(popen.pid, sync_write)
        if self.settings(spec)["net"] != "none":
            await self._start_network(state, stack)
        elif not self.slirp4netns:
            log.warning("slirp4netns is not installed: the sandbox has loopback only, its containers cannot "
                        "reach the host or the network (apt-get install slirp4netns)")

    async def _join_cgroup(self, pid: int, sync: int) -> None:
        """Move the pre-init into the sandbox's cgroup, then let it go on (it waits on `sync` to unshare).

        The move waits for an RCU grace period (~16 ms here): on a thread, while the pre-init's Python starts.
        """
        assert self.cgroup is not None
        try:
            await asyncio.to_thread(self.cgroup.join, pid)
            os.write(sync, b"1")
        except OSError as exc:  # the pre-init reads EOF and ends
            raise BackendError(f"cannot move the sandbox into its cgroup {self.cgroup.path}: {exc.strerror}") from None
        finally:
            os.close(sync)

    def _limits(self, spec: MachineSpec) -> tuple[int | None, int | None]:
        """(cpus, memory MiB) that the cgroup can enforce here; a warning for each it cannot.

        Both go through the sandbox's cgroup2 directory (cpu.max, memory.max). A host whose cpu or memory
        controller is bound to a cgroup v1 hierarchy cannot limit that in cgroup2: the sandbox still runs
        (`memory` and `cpus` always have a value, the defaults included), and the user is told.
        """
        controllers = cgroup2_controllers()
        wanted = {"cpu": (spec.cpus, f"cpus = {spec.cpus}"), "memory": (spec.memory, f"memory = {spec.memory} MiB")}
        missing = [c for c, (value, _) in wanted.items() if value is not None and c not in controllers]
        if missing:
            what = " and ".join(wanted[c][1] for c in missing)
            message = (f"the sandbox runs without its limits ({what}): this host's cgroup2 has no "
                       f"{' or '.join(missing)} controller (on cgroup v1 here, or not delegated)")
            log.warning("%s", message)
            self.warnings.append(message)
        return (None if "cpu" in missing else spec.cpus), (None if "memory" in missing else spec.memory)

    async def _start_network(self, state: Path, stack: contextlib.AsyncExitStack) -> None:
        """slirp4netns on the sandbox's network namespace (once its PID 1 is there); the guest waits for eth0.

        Not in the sandbox's cgroup: the guest owns that tree. It dies with us (PDEATHSIG) and is recorded
        in slirp4netns.pid like every helper.
        """
        assert self.slirp4netns is not None and self.unshare is not None
        deadline = time.monotonic() + 5.0
        while (pid := self.init_pid()) is None:
            if self.unshare.returncode is not None or time.monotonic() > deadline:
                log.error("the sandbox's PID 1 did not appear: no network")
                return
            await asyncio.sleep(0.002)
        argv = [self.slirp4netns, *SLIRP_ARGS, str(pid), "eth0"]
        output = os.open(state / "slirp4netns.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                     preexec_fn=_slirp_preexec, close_fds=True)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("cannot start slirp4netns: %s; the sandbox has loopback only", exc)
            return
        finally:
            os.close(output)
        self.slirp = PidfdProcess(popen, "slirp4netns")
        self._record_pid(self.slirp, argv[0])
        stack.push_async_callback(self._stop_network)

    async def _stop_network(self) -> None:
        assert self.slirp is not None
        self.slirp.signal(signal.SIGTERM)
        if await self.slirp.wait_for(2.0) is None:
            log.warning("slirp4netns did not end on SIGTERM; killing it")
        self.slirp.close()

    async def _graceful_stop(self) -> None:
        """SIGTERM to the init (PID 1 inside): it stops its services, syncs and exits."""
        pid = self.init_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # a pid read from the running unshare's children: ours
        if self.child is not None:
            await self.child.wait()

    async def _reap(self) -> None:
        """Kill every process in the sandbox's cgroup and wait until it is empty."""
        assert self.unshare is not None and self.cgroup is not None
        self.cgroup.kill()
        await self.unshare.wait_for(5.0)
        deadline = time.monotonic() + 5.0
        while self.cgroup.populated():
            if time.monotonic() > deadline:
                log.error("the sandbox's cgroup %s still has processes after SIGKILL", self.cgroup.path)
                break
            self.cgroup.kill()
            await asyncio.sleep(0.01)
        self.unshare.close()
        with self._dialer_lock:
            if self._dialer is not None:
                self._dialer[1].close()
                self._dialer = None

    def address(self, port: int) -> Address:
        """The guest's API socket in the state directory; the sandbox has no other port for the host."""
        if port != API_PORT or self.spec is None:
            raise TransportError(f"the sandbox reaches only the guest's API (port {API_PORT}), by its socket")
        return parse_address(f"unix:{self.spec.state_dir}/api.sock")

    async def dial(self, port: int, timeout: float = 10.0) -> socket.socket:
        return await dial_socket(self.address(port), timeout)

    def dial_blocking(self, port: int, timeout: float = 10.0) -> socket.socket:
        return dial_blocking(self.address(port), timeout)  # from the thread itself: no trip through the loop

    def connect_direct(self, request: protocol.Connect) -> socket.socket | None:
        """The guest's socket opened from the host (`sandboxdial`): no API handshake, call or guest relay."""
        if not GuestDialer.handles(request):
            return None
        return self._guest_dialer().connect(request)

    def _guest_dialer(self) -> GuestDialer:
        with self._dialer_lock:
            unshare = self.unshare
            if self._dialer is not None and self._dialer[0] is not unshare:
                self._dialer[1].close()
                self._dialer = None
            if self._dialer is None:
                pid = self.init_pid()
                if unshare is None or pid is None:
                    raise TransportError("the sandbox is not running")
                self._dialer = (unshare, GuestDialer.of(pid))
            return self._dialer[1]

    def init_pid(self) -> int | None:
        """The host pid of the sandbox's PID 1 (the child of unshare), if it runs."""
        if self.unshare is None or self.unshare.returncode is not None:
            return None
        try:
            with open(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children") as f:
                children = f.read().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def since_start_ns(self, guest_monotonic_ns: int) -> int:
        """The guest's clock is the host's (no VM, no time namespace): its uptime, not the sandbox's."""
        if self.spawned_at is None:
            return guest_monotonic_ns
        return guest_monotonic_ns - round(self.spawned_at * 1e9)  # time.monotonic is CLOCK_MONOTONIC

    def describe(self) -> dict[str, object]:
        return {"loop_device": self.loop_device, "cgroup": self.cgroup.path if self.cgroup else None,
                "init_pid": self.init_pid()}

    def pids(self) -> list[int]:
        pids = set(super().pids())
        if self.cgroup is not None:
            pids |= set(self.cgroup.pids())
        if self.slirp is not None and self.slirp.returncode is None:
            pids.add(self.slirp.pid)
        return sorted(pids)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _slirp_preexec() -> None:
    """preexec_fn of slirp4netns: dies with us, and gets a private mount namespace of its own.

    `--enable-sandbox` unmounts what it does not need in the mount namespace it starts in, and with the
    host's shared propagation those unmounts reached the host: `ip netns` mounts under /run/netns vanished
    within two seconds of a sandbox's start (slirp4netns 1.2.0, Debian 12). A private copy keeps them here.
    """
    die_with_parent()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "cannot give slirp4netns a private mount namespace")


def share_arguments(shares: dict[str, str], userns: dict[str, int]) -> list[str]:
    """The preinit's TAG[:FD]=DIRECTORY arguments: each share is bound (recursively) at
    /run/boxpark/shares/TAG, idmapped by the user namespace at FD (passed down) when it has an owner."""
    return [f"{tag}{f':{userns[tag]}' if tag in userns else ''}={os.path.realpath(directory)}"
            for tag, directory in shares.items()]


def _unshare() -> list[str]:
    for directory in ("/usr/bin", "/bin"):
        if os.access(f"{directory}/unshare", os.X_OK):
            return [f"{directory}/unshare", *UNSHARE[1:]]
    raise BackendError("the sandbox needs unshare (util-linux): apt-get install util-linux")
