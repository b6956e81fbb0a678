"""The machine agent: the one long-lived process that owns a machine (like Lima's hostagent).

`boxpark up` starts it detached. It boots the VM through its backend, receives the event stream, runs the
initialization phase, supervises dockerd, serves the Guest Proxy, pushes the time, and answers the other
commands on its control socket (`agent.sock`, mode 0600, JSON lines). It also forwards `api.sock` to the
guest's API, so `exec`, `shell` and `guest call` work the same on every backend (on VZ only this process
can dial the guest's vsock ports). Every stream into the guest is a dial of the backend (`guestlink`):
the agent never dials an address of its own. `_bring_up` reads as the host's list of phases, in the
seed's order, as `guest/init.py` does the guest's. `down`, SIGTERM and SIGINT stop it gracefully: dockerd, then the guest,
then the sockets and the pid file.

Control requests, one JSON object a line: {"op": "status"} → one reply; {"op": "follow"} → every progress
event so far and to come, until the machine is ready, failed or stopped; {"op": "down"} → progress until
stopped. Anything else on the control socket (junk, an overlong or unfinished line, an unknown op) gets an
error line or a close, never the agent: connections, line length and a follower's backlog are bounded.

Once the machine is up the agent watches it: if the VM (QEMU, the sandbox's PID 1) ends or the guest boots
again behind its back, the agent says why (`failure.json`, which `boxpark status` shows), shuts down what
is left and exits, so that the next `up` starts clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import msgspec

from .. import __version__, protocol
from ..transport import listen_socket, parse_address
from . import hostservices, initphase, resources
from .balloon import Balloon, Policy
from .backends.base import Backend
from .client import GuestClient
from .config import Config, expand, proxy_env
from .guestlink import GuestLink
from .guestproxy import GuestProxy
from .machinespec import spec_from_config
from .mountguard import MountGuard, plugin_argv, with_plugin
from .ports import PortForwards
from .service import DockerService, ServiceStatus, daemon_config
from .spec import MachineSpec, SpecError
from .state import Machine
from .timesync import TimePusher
from .watchdog import StopWatchdog

log = logging.getLogger("boxpark.agent")

FINAL = ("ready", "failed", "stopped")
MAX_CONTROL_CONNECTIONS = 64  # `status` is quick and `follow` is a handful of `up`s and `logs`: plenty
MAX_REQUEST = 4096  # bytes of one control request line
STOP_DEADLINE = 120.0  # s: a stop that takes longer hangs somewhere; the agent ends itself (host/watchdog.py)
MAX_BACKLOG = 1000  # progress events queued for a follower that does not read; then it is dropped


def failure_file(machine: Machine) -> Path:
    """Why the machine ended under its agent (written by the agent as it goes; removed by the next one)."""
    return machine.failure_file


class AgentFailure(Exception):
    """The machine could not be brought up; the message is for the person who ran `boxpark up`."""


class Agent:
    def __init__(self, machine: Machine, config: Config) -> None:
        self.machine = machine
        self.config = config
        self.state = "starting"
        self.phase = "agent"
        self.events: list[dict[str, Any]] = []
        self._followers: dict[asyncio.Queue[dict[str, Any]], asyncio.StreamWriter] = {}
        self._controls = 0
        self.failure = ""  # why the machine ended under the agent, once it did
        self._stop = asyncio.Event()
        self.backend: Backend | None = None
        self._link: GuestLink | None = None  # the guest's API through the backend, once it started
        self.ready_event: protocol.Ready | None = None
        self.ready_ms: float | None = None  # the machine's start to Ready, by the guest's clock
        self.disk_discard: bool | None = None  # whether the data disk gives freed space back (None: unknown)
        self.service: DockerService | None = None
        self.guard: MountGuard | None = None  # the mount guard, unless docker.mount_guard = false
        self.time: TimePusher | None = None
        self.proxies: list[GuestProxy] = []
        self.ports: PortForwards | None = None
        self.host_services: list[hostservices.ReverseForward] = []
        self.host_services_note = ""  # why a host service is not there (no SSH_AUTH_SOCK), said once
        self.balloon: Balloon | None = None  # where the backend has one: its last figures and target (for status)
        self.started = time.time()
        self.phase_times: dict[str, float] = {}
        self._phase_started = time.monotonic()
        self.data_disk: Path | None = None  # its image on the host, for `status`

    # ------------------------------------------------------------------------------- progress

    def progress(self, message: str, *, phase: str | None = None, state: str | None = None) -> None:
        if phase is not None and phase != self.phase:
            now = time.monotonic()
            self.phase_times[self.phase] = round(now - self._phase_started, 3)
            self._phase_started = now
            self.phase = phase
        if state is not None:
            self.state = state
        event = {"time": time.time(), "phase": self.phase, "state": self.state, "message": message}
        self.events.append(event)
        del self.events[:-500]
        log.info("[%s] %s", self.phase, message)
        for queue, writer in list(self._followers.items()):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # it stopped reading: drop it rather than hold its backlog
                del self._followers[queue]
                writer.transport.abort()

    # ------------------------------------------------------------------------------- control

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._controls += 1
        try:
            if self._controls > MAX_CONTROL_CONNECTIONS:
                writer.write(b'{"error": "too many connections to the agent"}\n')
                return
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
            except ValueError:  # longer than the reader's limit
                writer.write(b'{"error": "request too long"}\n')
                return
            try:
                request = json.loads(line)
                op = request["op"]
                if not isinstance(op, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError, IndexError, RecursionError):
                writer.write(b'{"error": "expected a JSON object with an op"}\n')
                return
            if op == "status":
                writer.write(json.dumps({**self.status(), "resources": await self.resources()}).encode() + b"\n")
            elif op in ("follow", "down"):
                if op == "down":
                    self._stop.set()
                await self._stream_progress(writer, until=("stopped",) if op == "down" else FINAL,
                                            replay=op == "follow")
            else:
                writer.write(json.dumps({"error": f"unknown op {op!r}"}).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            self._controls -= 1
            writer.close()

    async def _stream_progress(self, writer: asyncio.StreamWriter, until: tuple[str, ...], replay: bool) -> None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_BACKLOG)
        for event in self.events[-MAX_BACKLOG // 2:] if replay else ():
            queue.put_nowait(event)
        self._followers[queue] = writer
        try:
            while True:
                event = await queue.get()
                writer.write(json.dumps(event).encode() + b"\n")
                await writer.drain()
                if event["state"] in until and queue.empty():
                    return
        finally:
            self._followers.pop(queue, None)

    def status(self) -> dict[str, Any]:
        docker = None
        if self.service is not None:
            s = self.service.status
            docker = {"state": s.state, "status": s.status, "pid": s.pid, "restarts": s.restarts,
                      "last_exit": s.last_exit, "last_error": s.last_error, "next_start_in": s.next_start_in,
                      "history": s.history[-5:]}
        ready = self.ready_event
        return {
            "name": self.machine.name, "state": self.state, "phase": self.phase, "pid": os.getpid(),
            "backend": self.config.backend, "version": __version__, "started": self.started,
            "docker_host": f"unix://{self.machine.docker_socket}" if self.state == "ready" else None,
            "api": f"unix:{self.machine.api_socket}",
            "boot": None if ready is None else {
                "boot_id": ready.boot_id, "kernel": ready.kernel, "arch": ready.arch,
                "monotonic_ms": self.ready_ms,
                "timeline": [{"step": s.name, "ms": round(s.duration_ns / 1e6, 2), "error": s.error}
                             for s in ready.timeline]},
            "phases": self.phase_times,
            "disk_discard": self.disk_discard,
            "docker": docker,
            "time": None if self.time is None else {"pushes": self.time.pushes,
                                                    "last_offset_ms": None if self.time.last_offset_ns is None
                                                    else self.time.last_offset_ns / 1e6},
            "proxy": [{"path": p.path, "accepted": p.accepted, "refused": p.failed} for p in self.proxies],
            "mount_guard": {"on": self.config.docker.mount_guard,
                            "starts": self.guard.starts if self.guard is not None else 0},
            "ports": None if self.ports is None else self.ports.status(),
            "host_services": {"forwards": [f.status() for f in self.host_services],
                              "note": self.host_services_note or None},
            "recent": [e["message"] for e in self.events[-5:]],
            "failure": self.failure or None,
            "config": msgspec.to_builtins(self.config),  # what it runs with: `up` names what changed since
        }

    async def resources(self) -> dict[str, Any]:
        """What the machine costs (`status`): read now, the guest's part only once it is ready."""
        backend, balloon = self.backend, self.balloon
        return await resources.resources(self.dial if self.state == "ready" else None,
                                         backend.vm_pid() if backend is not None else None, self.data_disk,
                                         balloon.policy.size - balloon.target if balloon is not None else None)

    # ------------------------------------------------------------------------------- guest access

    @property
    def link(self) -> GuestLink:
        assert self._link is not None, "the machine was not started"
        return self._link

    async def dial(self) -> GuestClient:
        return await self.link.client()

    async def open_docker(self) -> socket.socket:
        return await self.link.connect(protocol.Connect(path="/var/run/docker.sock"))

    def open_docker_blocking(self) -> socket.socket:
        return self.open_connect_blocking(protocol.Connect(path="/var/run/docker.sock"))

    def open_connect_blocking(self, request: protocol.Connect, timeout: float = 10.0) -> socket.socket:
        return self.link.connect_blocking(request, timeout)

    def open_api_blocking(self) -> socket.socket:
        return self.link.api_blocking()

    # ------------------------------------------------------------------------------- the run

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        failure_file(self.machine).unlink(missing_ok=True)
        control = listen_socket(parse_address(f"unix:{self.machine.agent_socket}"))
        server = await asyncio.start_unix_server(self._control, sock=control, limit=MAX_REQUEST)
        self.machine.agent_pid_file.write_text(f"{os.getpid()} boxpark-agent\n")
        code = 0
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._remove_files)
            stack.push_async_callback(self._close_server, server)
            try:
                main = asyncio.ensure_future(self._bring_up(stack))
                stop = asyncio.ensure_future(self._stop.wait())
                done, _ = await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
                if main in done:
                    main.result()
                    await self._stop.wait()
                else:
                    main.cancel()
                    self.progress("stop requested during start-up", phase="stopping", state="stopping")
            except AgentFailure as exc:
                self.progress(str(exc), state="failed")
                self._record_failure(str(exc))
                code = 1
            except Exception as exc:  # the agent must say what happened, never just vanish
                log.exception("agent failure")
                self.progress(f"internal error: {type(exc).__name__}: {exc}", state="failed")
                self._record_failure(f"internal error: {type(exc).__name__}: {exc}")
                code = 1
            watchdog = StopWatchdog(loop, STOP_DEADLINE, self._stop_expired)
            watchdog.start()
            await self._shutdown()
        watchdog.finished()
        if self.failure:
            self.progress(self.failure, phase="stopped", state="failed")
            code = 1
        else:
            self.progress("stopped", phase="stopped", state="stopped")
        await asyncio.sleep(0.05)  # let followers read the last event
        return code

    def _stop_expired(self, waiting: list[str]) -> None:
        """The stop hung (the watchdog's thread): say on what, leave the reason for `status`, and end; the
        machine's processes die with the agent (PR_SET_PDEATHSIG) and the next `up` cleans what is left."""
        log.error("the agent did not finish stopping within %g s; its tasks wait on:\n  %s", STOP_DEADLINE,
                  "\n  ".join(waiting) or "nothing")
        with contextlib.suppress(Exception):
            self._record_failure(f"the agent's stop hung for {STOP_DEADLINE:g} s and it ended itself (agent.log "
                                 "says on what)")
        self._remove_files()
        logging.shutdown()
        os._exit(1)

    async def _close_server(self, server: asyncio.AbstractServer) -> None:
        server.close()

    def _remove_files(self) -> None:
        for path in (self.machine.agent_socket, self.machine.agent_pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ------------------------------------------------------------------------------- the bring-up

    async def _bring_up(self, stack: contextlib.AsyncExitStack) -> None:
        """The host's list, in the seed's order, one phase a line; whatever a phase starts is on `stack`."""
        disk, spec = self._prepare()
        await self._boot(spec, stack)
        await self._forward_api(stack)
        self._push_time(stack)
        self._resolve_names(stack)
        self.progress("initializing", phase="initialize", state="initializing")
        client = await self._client(stack)
        with _fails_as("initialization failed"):  # InitError, or a call the guest refused: `up` says which
            client = await self._data_disk(client, disk, stack)
            await self._swap(client, disk)
            mounted = await self._mounts(client, spec)
            await self._certificates(client)
            await self._guard_mounts(client, mounted, stack)
        daemon = self._docker_config(disk)
        await self._launch_docker(daemon, stack)  # the service listens for dockerd's notify, then launches it
        await self._proxy_docker(stack)
        self._forward_ports(stack)
        await self._host_services(stack)
        self._balloon(stack)
        self.progress(f"docker is ready: DOCKER_HOST=unix://{self.machine.docker_socket}", phase="running",
                      state="ready")
        self._watch(stack)

    def _prepare(self) -> tuple[initphase.DiskPlan | None, MachineSpec]:
        """Before boot: the data disk (created, or its resize recorded) and the machine's spec."""
        self.progress("preparing", phase="prepare", state="starting")
        config = self.config
        disk = initphase.prepare_data_disk(self.machine, config) if config.backend != "sandbox" else None
        self.data_disk = disk.path if disk else None
        try:
            return disk, spec_from_config(config, self.machine, data_disk=disk.path if disk else None)
        except SpecError as exc:
            raise AgentFailure(f"cannot boot this configuration: {exc}") from None

    async def _boot(self, spec: MachineSpec, stack: contextlib.AsyncExitStack) -> None:
        """Start the backend, wait for the guest's Ready, record its timeline."""
        from .backends import BackendError, EventStreamError, open_backend

        self.progress(f"booting ({self.config.backend})", phase="boot", state="booting")
        try:
            self.backend = backend = await stack.enter_async_context(open_backend(self.config.backend, spec))
            self._link = GuestLink(backend)
            self.ready_event = ready = await backend.wait_ready(timeout=120)
            self.ready_ms = backend.since_start_ns(ready.monotonic_ns) / 1e6
        except (BackendError, EventStreamError, SpecError) as exc:
            raise AgentFailure(str(exc)) from None
        self.machine.write_json(self.machine.timeline_file, {
            "boot_id": ready.boot_id, "kernel": ready.kernel, "monotonic_ms": self.ready_ms,
            "steps": [[s.name, s.duration_ns / 1e6, s.error] for s in ready.timeline]})
        for warning in backend.warnings:
            self.progress(f"warning: {warning}")
        took = f" in {time.monotonic() - backend.spawned_at:.2f} s" if backend.spawned_at is not None else ""
        self.progress(f"guest ready{took} (kernel {ready.kernel}, init steps "
                      f"{sum(s.duration_ns for s in ready.timeline) / 1e6:.0f} ms)")

    async def _forward_api(self, stack: contextlib.AsyncExitStack) -> None:
        """api.sock: `exec`, `shell` and `guest call` reach the guest's API the same way on every backend.
        Its bytes move in a relay process (`handoff`), not behind the GIL of the agent's burst relays."""
        api = GuestProxy(str(self.machine.api_socket), self.open_api_blocking, refusal=lambda reason: b"",
                         handoff=True)
        await api.start()
        stack.callback(api.close)

    def _push_time(self, stack: contextlib.AsyncExitStack) -> None:
        """The host's time into the guest, now and at every interval (and, on a Mac, at once on wake)."""
        from .wake import watch_wake  # a no-op off macOS

        self.time = TimePusher(self.dial, self.config.time.push_interval)
        stack.push_async_callback(_cancel, asyncio.ensure_future(self.time.run()))
        stack.callback(watch_wake(self.time.poke).close)

    def _resolve_names(self, stack: contextlib.AsyncExitStack) -> None:
        """The host's resolver for the guest's DNS forwarder: names the host knows resolve in containers."""
        from .resolver import HostResolver

        if not self.config.dns.host_resolver:
            return

        async def open_link() -> Any:
            client = await self.dial()
            try:
                return await client.host_resolver()
            finally:
                await client.close()

        resolver = HostResolver(open_link, expand(self.config.dns.hosts_file))
        stack.push_async_callback(_cancel, asyncio.ensure_future(resolver.run()))

    async def _client(self, stack: contextlib.AsyncExitStack) -> GuestClient:
        client = await self.dial()
        stack.push_async_callback(client.close)
        return client

    async def _data_disk(self, client: GuestClient, disk: initphase.DiskPlan | None,
                         stack: contextlib.AsyncExitStack) -> GuestClient:
        """Format, grow (rebooting the guest where the backend must) and mount the data disk; the client to go
        on with. The sandbox has none: dockerd's data goes on a tmpfs (overlay2 cannot stack on its root)."""
        if disk is None:
            await client.mount("tmpfs", "/var/lib/docker", "tmpfs", ["mode=0711"], mkdir=True)
            return client
        if disk.note:
            self.progress(disk.note)
        assert self.backend is not None
        rebooted = await initphase.data_disk(client, self.machine, disk, self.progress, self.backend,
                                             self._reboot_guest)
        if rebooted is not client:
            stack.push_async_callback(rebooted.close)
        self.disk_discard = bool(disk.discard_max)
        if not self.disk_discard:
            self.progress(initphase.NO_DISCARD)
        return rebooted

    async def _swap(self, client: GuestClient, disk: initphase.DiskPlan | None) -> None:
        if disk is not None and self.config.swap_bytes:
            self.progress(await initphase.swap(client, self.config.swap_bytes, self.progress,
                                               discard=self.disk_discard is True))

    async def _mounts(self, client: GuestClient, spec: MachineSpec) -> list[str]:
        assert self.backend is not None
        return await initphase.mounts(client, self.config.all_mounts(),
                               initphase.share_sources(spec, self.backend.binds_shares), self.progress)

    async def _certificates(self, client: GuestClient) -> None:
        await initphase.trust_certificates(client, self.config.certificates.ca, self.progress)

    async def _guard_mounts(self, client: GuestClient, mounted: list[str], stack: contextlib.AsyncExitStack) -> None:
        """The mount guard (dockerd's authorization plugin): a bind of a path the guest neither shares nor has
        is refused with a sentence, before dockerd starts; it comes back if it dies. `docker.mount_guard =
        false` turns it off."""
        if not self.config.docker.mount_guard:
            return
        self.guard = guard = MountGuard(self.dial, plugin_argv(self.config.all_mounts(), mounted))
        await guard.start(client)
        stack.push_async_callback(_cancel, asyncio.ensure_future(guard.run()))

    def _docker_config(self, disk: initphase.DiskPlan | None) -> dict[str, Any]:
        """dockerd's daemon.json: the user's, with what Boxpark owns on this backend."""
        self.progress("starting dockerd", phase="service", state="starting docker")
        data_root = f"{initphase.DATA_MOUNT}/docker" if disk is not None else ""
        extra: dict[str, Any] = {"bridge": "none", "iptables": False} if self.config.backend == "sandbox" else {}
        with _fails_as(""):
            daemon = daemon_config(self.config.docker.daemon_json, data_root, extra)
        return with_plugin(daemon) if self.config.docker.mount_guard else daemon

    async def _launch_docker(self, daemon: dict[str, Any], stack: contextlib.AsyncExitStack) -> None:
        """dockerd as a supervised service (its sd_notify socket first, then the launch), until READY=1."""
        docker = self.config.docker
        self.service = DockerService(self.dial, self.machine.docker_log, daemon,
                                     restart_delay=docker.restart_delay, restart_delay_max=docker.restart_delay_max,
                                     ready_timeout=docker.ready_timeout, log_size=self.config.docker_log_bytes,
                                     log_files=docker.log_files, on_change=self._docker_changed,
                                     env=proxy_env(self.config.proxy))
        stack.push_async_callback(_cancel, asyncio.ensure_future(self.service.run()))
        stack.push_async_callback(self.service.stop)
        await self._docker_ready(docker.ready_timeout)

    async def _proxy_docker(self, stack: contextlib.AsyncExitStack) -> None:
        """docker.sock on the host: each connection its own `Connect` to the guest's dockerd."""
        assert self.service is not None
        proxy = GuestProxy(str(self.machine.docker_socket), self.open_docker_blocking,
                           unavailable=self.service.unavailable)
        await proxy.start()
        self.proxies.append(proxy)
        stack.callback(proxy.close)

    def _forward_ports(self, stack: contextlib.AsyncExitStack) -> None:
        """Containers' published ports on the host, from dockerd's events."""
        if not self.config.ports.forward:
            return
        # a client of a published port waits as for a slow server, not 10 s (a burst on a TCG guest)
        self.ports = PortForwards(self.open_docker, lambda request: self.open_connect_blocking(request, 60),
                                  all_interfaces=self.config.ports.all_interfaces)
        stack.push_async_callback(_cancel, asyncio.ensure_future(self.ports.run()))

    async def _host_services(self, stack: contextlib.AsyncExitStack) -> None:
        """The host's SSH agent (and later other host sockets) at their Docker Desktop paths in the guest; there
        when `up` says ready (a guest that is slow to answer gets it a little later: said in the log)."""
        service, why_not = hostservices.ssh_agent(self.config.ssh_agent)
        if service is None:
            self.host_services_note = why_not
            self.progress(why_not)
            return
        forward = hostservices.ReverseForward(service, self.dial,
                                              lambda request: self.link.connect_blocking(request, 60))
        self.host_services.append(forward)
        stack.push_async_callback(_cancel, asyncio.ensure_future(forward.run()))
        try:
            await asyncio.wait_for(forward.first_listen.wait(), 10)
        except asyncio.TimeoutError:
            log.warning("%s is not yet listening in the guest; it will be once the guest answers",
                        service.guest_path)
            return
        self.progress(f"the host's SSH agent ({service.host_path}) is at {service.guest_path} in the guest")

    def _balloon(self, stack: contextlib.AsyncExitStack) -> None:
        """The guest's unused memory back to the host, as the backend can (host/balloon.py)."""
        assert self.backend is not None and self.backend.spec is not None
        if self.backend.balloon and self.backend.spec.memory:
            balloon = Balloon(self.dial, self.backend, Policy(self.backend.spec.memory * 1024 * 1024,
                                                              self.backend.balloon))
            self.balloon = balloon
            stack.push_async_callback(_cancel, asyncio.ensure_future(balloon.run()))

    def _watch(self, stack: contextlib.AsyncExitStack) -> None:
        assert self.ready_event is not None
        stack.push_async_callback(_cancel, asyncio.ensure_future(self._watch_machine(self.ready_event.boot_id)))

    def _docker_changed(self, status: ServiceStatus) -> None:
        if status.state == "restarting" and status.history and self.state != "ready":
            self.progress(status.history[-1].split(" ", 1)[1])  # `up` shows why dockerd keeps exiting

    async def _docker_ready(self, timeout: float) -> None:
        """Until dockerd's first READY=1; a dockerd that exits three times before it fails `up` with its reason
        (a bad daemon.json does not get better), and so does a machine that ends meanwhile."""
        assert self.service is not None and self.backend is not None
        service = self.service
        deadline = time.monotonic() + timeout + 15  # the service stops a silent dockerd after `timeout`
        ended = asyncio.ensure_future(self.backend.wait())
        try:
            while not service.ready.is_set():
                if ended.done():
                    raise AgentFailure(self.backend.ended_message(ended.result(), "while dockerd was starting"))
                if service.status.restarts >= 3 or time.monotonic() > deadline:
                    raise AgentFailure(f"dockerd did not become ready: {service.why()}; "
                                       f"see {self.machine.docker_log}")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(service.ready.wait()), 0.2)
        finally:
            ended.cancel()

    async def _watch_machine(self, boot_id: str) -> None:
        """Once up: the machine ending, or the guest booting again (its mounts and dockerd gone), ends the
        agent with the reason, for `status` and the next `up`."""
        assert self.backend is not None
        waits = [asyncio.ensure_future(self.backend.wait())]
        if self.backend.events is not None:
            waits.append(asyncio.ensure_future(self.backend.events.wait_rebooted(boot_id)))
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self._stop.is_set():
            return  # `down`: the machine ending is expected
        ended, *_ = done
        if ended is waits[0]:
            message = self.backend.ended_message(ended.result(), "while the agent ran")
        else:
            message = (f"the guest booted again on its own (boot {ended.result().boot_id}, was {boot_id}): "
                       f"its mounts and dockerd are gone")
        log.error("%s", message)
        self._record_failure(message, "; `boxpark up` starts it again")
        self.progress(message.splitlines()[0], state="failed")
        self._stop.set()

    def _record_failure(self, message: str, hint: str = "") -> None:
        """Why the agent ends, for `status` once it is gone: the first line (the rest is in agent.log)."""
        self.failure = f"{message.splitlines()[0]} at {time.strftime('%H:%M:%S')}{hint}"
        self.machine.write_json(failure_file(self.machine), {"time": time.time(), "reason": self.failure,
                                                            "detail": message})

    async def _reboot_guest(self, why: str) -> GuestClient:
        """Reboot the guest in the bring-up (a disk it can see grown only after one); a client of the new boot."""
        from .backends import BackendError, EventStreamError

        assert self.backend is not None
        self.progress(why)
        try:
            self.ready_event = await self.backend.reboot(timeout=120)
        except (BackendError, EventStreamError) as exc:
            raise initphase.InitError(f"the guest did not come back from its reboot: {exc}") from None
        self.progress(f"guest ready again after its reboot (boot {self.ready_event.boot_id})")
        return await self.dial()

    async def _shutdown(self) -> None:
        self.progress("stopping", phase="stopping", state="stopping")
        if self.service is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.service.stop(), 30)
        if self.backend is not None:
            with contextlib.suppress(Exception):
                await self.backend.stop(timeout=30)


@contextlib.contextmanager
def _fails_as(what: str) -> Iterator[None]:
    """A phase's failure as the sentence `up` shows: `what: why` (or only why)."""
    try:
        yield
    except AgentFailure:
        raise
    except Exception as exc:
        raise AgentFailure(f"{what}: {exc}" if what else str(exc)) from None


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


def main(name: str, config_path: str | None) -> int:
    """`boxpark agent run`: the agent in the foreground (what `up` starts detached)."""
    from .config import load

    machine = Machine.named(name)
    machine.ensure()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load(config_path)
    return asyncio.run(Agent(machine, config).run())
