"""The machine agent: the one long-lived process that owns a machine (like Lima's hostagent).

`boxpark up` starts it detached. It boots the VM through its backend, receives the event stream, runs the
initialization phase, supervises dockerd, serves the Guest Proxy, pushes the time, and answers the other
commands on its control socket (`agent.sock`, mode 0600, JSON lines). It also forwards `api.sock` to the
guest's API, so `exec`, `shell` and `guest call` work the same on every backend (on VZ only this process
can dial the guest's vsock ports). `down`, SIGTERM and SIGINT stop it gracefully: dockerd, then the guest,
then the sockets and the pid file.

Control requests, one JSON object a line: {"op": "status"} → one reply; {"op": "follow"} → every progress
event so far and to come, until the machine is ready, failed or stopped; {"op": "down"} → progress until
stopped.
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
from typing import Any

from .. import __version__, protocol
from ..transport import Address, dial_blocking, listen_socket, open_raw, open_raw_blocking, parse_address
from . import initphase
from .client import GuestClient
from .config import Config, proxy_env
from .guestproxy import GuestProxy
from .ports import PortForwards
from .service import DockerService, daemon_config
from .state import Machine
from .timesync import TimePusher

log = logging.getLogger("boxpark.agent")

FINAL = ("ready", "failed", "stopped")


class AgentFailure(Exception):
    """The machine could not be brought up; the message is for the person who ran `boxpark up`."""


class Agent:
    def __init__(self, machine: Machine, config: Config) -> None:
        self.machine = machine
        self.config = config
        self.state = "starting"
        self.phase = "agent"
        self.events: list[dict[str, Any]] = []
        self._followers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._stop = asyncio.Event()
        self.backend: Any = None
        self.ready_event: protocol.Ready | None = None
        self.api_address: Address | None = None
        self.secret: bytes | None = None
        self.service: DockerService | None = None
        self.time: TimePusher | None = None
        self.proxies: list[GuestProxy] = []
        self.ports: PortForwards | None = None
        self.started = time.time()
        self.phase_times: dict[str, float] = {}
        self._phase_started = time.monotonic()

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
        for queue in self._followers:
            queue.put_nowait(event)

    # ------------------------------------------------------------------------------- control

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = json.loads(line)
                op = request["op"]
            except (ValueError, KeyError, TypeError):
                writer.write(b'{"error": "expected a JSON object with an op"}\n')
                return
            if op == "status":
                writer.write(json.dumps(self.status()).encode() + b"\n")
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
            writer.close()

    async def _stream_progress(self, writer: asyncio.StreamWriter, until: tuple[str, ...], replay: bool) -> None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for event in self.events if replay else ():
            queue.put_nowait(event)
        self._followers.add(queue)
        try:
            while True:
                event = await queue.get()
                writer.write(json.dumps(event).encode() + b"\n")
                await writer.drain()
                if event["state"] in until and queue.empty():
                    return
        finally:
            self._followers.discard(queue)

    def status(self) -> dict[str, Any]:
        docker = None
        if self.service is not None:
            s = self.service.status
            docker = {"state": s.state, "status": s.status, "pid": s.pid, "restarts": s.restarts,
                      "last_exit": s.last_exit, "history": s.history[-5:]}
        ready = self.ready_event
        return {
            "name": self.machine.name, "state": self.state, "phase": self.phase, "pid": os.getpid(),
            "backend": self.config.backend, "version": __version__, "started": self.started,
            "docker_host": f"unix://{self.machine.docker_socket}" if self.state == "ready" else None,
            "api": f"unix:{self.machine.api_socket}",
            "boot": None if ready is None else {
                "boot_id": ready.boot_id, "kernel": ready.kernel, "arch": ready.arch,
                "monotonic_ms": ready.monotonic_ns / 1e6,
                "timeline": [{"step": s.name, "ms": round(s.duration_ns / 1e6, 2), "error": s.error}
                             for s in ready.timeline]},
            "phases": self.phase_times,
            "docker": docker,
            "time": None if self.time is None else {"pushes": self.time.pushes,
                                                    "last_offset_ms": None if self.time.last_offset_ns is None
                                                    else self.time.last_offset_ns / 1e6},
            "proxy": [{"path": p.path, "accepted": p.accepted, "refused": p.failed} for p in self.proxies],
            "ports": None if self.ports is None else self.ports.status(),
            "recent": [e["message"] for e in self.events[-5:]],
        }

    # ------------------------------------------------------------------------------- guest access

    async def dial(self) -> GuestClient:
        assert self.api_address is not None
        return await GuestClient.open(self.api_address, secret=self.secret)

    async def open_docker(self) -> socket.socket:
        assert self.api_address is not None
        return await open_raw(self.api_address, protocol.Connect(path="/var/run/docker.sock"), secret=self.secret)

    def open_docker_blocking(self) -> socket.socket:
        return self.open_connect_blocking(protocol.Connect(path="/var/run/docker.sock"))

    def open_connect_blocking(self, request: protocol.Connect, timeout: float = 10.0) -> socket.socket:
        assert self.api_address is not None
        return open_raw_blocking(self.api_address, request, secret=self.secret, timeout=timeout)

    def open_api_blocking(self) -> socket.socket:
        assert self.api_address is not None
        return dial_blocking(self.api_address)

    # ------------------------------------------------------------------------------- the run

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        control = listen_socket(parse_address(f"unix:{self.machine.agent_socket}"))
        server = await asyncio.start_unix_server(self._control, sock=control)
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
                code = 1
            except Exception as exc:  # the agent must say what happened, never just vanish
                log.exception("agent failure")
                self.progress(f"internal error: {type(exc).__name__}: {exc}", state="failed")
                code = 1
            await self._shutdown()
        self.progress("stopped", phase="stopped", state="stopped")
        await asyncio.sleep(0.05)  # let followers read the last event
        return code

    async def _close_server(self, server: asyncio.AbstractServer) -> None:
        server.close()

    def _remove_files(self) -> None:
        for path in (self.machine.agent_socket, self.machine.agent_pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _bring_up(self, stack: contextlib.AsyncExitStack) -> None:
        from . import backends

        machine, config = self.machine, self.config
        self.progress("preparing", phase="prepare", state="starting")
        plan = initphase.prepare_data_disk(machine, config) if config.backend != "sandbox" else None
        try:
            spec = backends.spec_from_config(config, machine, data_disk=plan.path if plan else None)
        except backends.SpecError as exc:
            raise AgentFailure(f"cannot boot this configuration: {exc}") from None

        self.progress(f"booting ({config.backend})", phase="boot", state="booting")
        try:
            self.backend = await stack.enter_async_context(backends.open_backend(config.backend, spec))
            self.ready_event = await self.backend.wait_ready(timeout=120)
        except (backends.BackendError, backends.EventStreamError, backends.SpecError) as exc:
            raise AgentFailure(str(exc)) from None
        self.api_address = parse_address(self.backend.api_address)
        self.secret = self.backend.secret
        ready = self.ready_event
        machine.write_json(machine.timeline_file, {"boot_id": ready.boot_id, "kernel": ready.kernel,
                                                   "monotonic_ms": ready.monotonic_ns / 1e6,
                                                   "steps": [[s.name, s.duration_ns / 1e6, s.error]
                                                             for s in ready.timeline]})
        spawned = getattr(self.backend, "spawned_at", None)
        took = f" in {time.monotonic() - spawned:.2f} s" if spawned else ""
        self.progress(f"guest ready{took} (kernel {ready.kernel}, init steps "
                      f"{sum(s.duration_ns for s in ready.timeline) / 1e6:.0f} ms)")

        api = GuestProxy(str(machine.api_socket), self.open_api_blocking, refusal=lambda reason: b"")
        await api.start()
        stack.callback(api.close)

        self.time = TimePusher(self.dial, config.time.push_interval)
        stack.push_async_callback(_cancel, asyncio.ensure_future(self.time.run()))
        from .wake import watch_wake  # macOS: push the time at once when the Mac wakes (a no-op elsewhere)
        stack.callback(watch_wake(self.time.poke).close)

        self.progress("initializing", phase="initialize", state="initializing")
        client = await self.dial()
        stack.push_async_callback(client.close)
        try:
            data_root = ""
            if plan is not None:
                if plan.note:
                    self.progress(plan.note)
                rebooted = await initphase.data_disk(client, machine, plan, self.progress, self.backend,
                                                     self._reboot_guest)
                if rebooted is not client:
                    client = rebooted
                    stack.push_async_callback(client.close)
                data_root = f"{initphase.DATA_MOUNT}/docker"
                if config.swap_bytes:
                    self.progress(await initphase.swap(client, config.swap_bytes, self.progress))
            else:
                # the sandbox: no disk; dockerd's data on a tmpfs (overlay2 cannot stack on the root overlay)
                await client.mount("tmpfs", "/var/lib/docker", "tmpfs", ["mode=0711"], mkdir=True)
            await initphase.mounts(client, config.all_mounts(), getattr(self.backend, "share_sources", {}),
                                    self.progress)
            await initphase.trust_certificates(client, config.certificates.ca, self.progress)
        except Exception as exc:  # InitError, or a call the guest refused: `up` says which
            raise AgentFailure(f"initialization failed: {exc}") from None

        self.progress("starting dockerd", phase="service", state="starting docker")
        extra = {"bridge": "none", "iptables": False} if config.backend == "sandbox" else {}
        try:
            daemon = daemon_config(config.docker.daemon_json, data_root, extra)
        except Exception as exc:
            raise AgentFailure(str(exc)) from None
        self.service = DockerService(self.dial, machine.docker_log, daemon,
                                     restart_delay=config.docker.restart_delay,
                                     restart_delay_max=config.docker.restart_delay_max,
                                     env=proxy_env(config.proxy))
        service_task = asyncio.ensure_future(self.service.run())
        stack.push_async_callback(_cancel, service_task)
        stack.push_async_callback(self.service.stop)
        try:
            await asyncio.wait_for(self.service.ready.wait(), 120)
        except asyncio.TimeoutError:
            raise AgentFailure(f"dockerd did not become ready within 120 s; see {machine.docker_log}") from None
        proxy = GuestProxy(str(machine.docker_socket), self.open_docker_blocking,
                           unavailable=self.service.unavailable)
        await proxy.start()
        self.proxies.append(proxy)
        stack.callback(proxy.close)
        if config.ports.forward:
            # a client of a published port waits as for a slow server, not 10 s (a burst on a TCG guest)
            self.ports = PortForwards(self.open_docker, lambda request: self.open_connect_blocking(request, 60),
                                      all_interfaces=config.ports.all_interfaces)
            stack.push_async_callback(_cancel, asyncio.ensure_future(self.ports.run()))
        self.progress(f"docker is ready: DOCKER_HOST=unix://{machine.docker_socket}", phase="running",
                      state="ready")

    async def _reboot_guest(self, why: str) -> GuestClient:
        """Reboot the guest in the bring-up (a disk it can see grown only after one); a client of the new boot."""
        from .backends import BackendError, EventStreamError

        self.progress(why)
        try:
            self.ready_event = await self.backend.reboot(timeout=120)
        except (BackendError, EventStreamError) as exc:
            raise initphase.InitError(f"the guest did not come back from its reboot: {exc}") from None
        self.api_address = parse_address(self.backend.api_address)
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
