"""The machine agent: the one long-lived process that owns a machine (like Lima's hostagent).

`boxpark up` starts it detached. It boots the VM through its backend, receives the event stream, runs the
initialization phase, supervises dockerd, serves the Guest Proxy, pushes the time, and answers the other
commands on its control socket (`agent.sock`, mode 0600, JSON lines). It also forwards `api.sock` to the
guest's API, so `exec`, `shell` and `guest call` work the same on every backend (on VZ only this process
can dial the guest's vsock ports). `down`, SIGTERM and SIGINT stop it gracefully: dockerd, then the guest,
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
from typing import Any

from .. import __version__, protocol
from ..transport import Address, dial_blocking, listen_socket, open_raw, open_raw_blocking, parse_address
from . import initphase
from .client import GuestClient
from .config import Config, proxy_env
from .guestproxy import GuestProxy
from .mountguard import MountGuard, plugin_argv, with_plugin
from .ports import PortForwards
from .service import DockerService, ServiceStatus, daemon_config
from .state import Machine
from .timesync import TimePusher

log = logging.getLogger("boxpark.agent")

FINAL = ("ready", "failed", "stopped")
MAX_CONTROL_CONNECTIONS = 64  # `status` is quick and `follow` is a handful of `up`s and `logs`: plenty
MAX_REQUEST = 4096  # bytes of one control request line
MAX_BACKLOG = 1000  # progress events queued for a follower that does not read; then it is dropped


def failure_file(machine: Machine) -> Path:
    """Why the machine ended under its agent (written by the agent as it goes; removed by the next one)."""
    return machine.dir / "failure.json"


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
        self.backend: Any = None
        self.ready_event: protocol.Ready | None = None
        self.ready_ms: float | None = None  # the machine's start to Ready, by the guest's clock
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
            "docker": docker,
            "time": None if self.time is None else {"pushes": self.time.pushes,
                                                    "last_offset_ms": None if self.time.last_offset_ns is None
                                                    else self.time.last_offset_ns / 1e6},
            "proxy": [{"path": p.path, "accepted": p.accepted, "refused": p.failed} for p in self.proxies],
            "ports": None if self.ports is None else self.ports.status(),
            "recent": [e["message"] for e in self.events[-5:]],
            "failure": self.failure or None,
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
            await self._shutdown()
        if self.failure:
            self.progress(self.failure, phase="stopped", state="failed")
            code = 1
        else:
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
            self.ready_ms = self.backend.since_start_ns(self.ready_event.monotonic_ns) / 1e6
        except (backends.BackendError, backends.EventStreamError, backends.SpecError) as exc:
            raise AgentFailure(str(exc)) from None
        self.api_address = parse_address(self.backend.api_address)
        self.secret = self.backend.secret
        ready = self.ready_event
        machine.write_json(machine.timeline_file, {"boot_id": ready.boot_id, "kernel": ready.kernel,
                                                   "monotonic_ms": self.ready_ms,
                                                   "steps": [[s.name, s.duration_ns / 1e6, s.error]
                                                             for s in ready.timeline]})
        for warning in self.backend.warnings:
            self.progress(f"warning: {warning}")
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
            mounted = await initphase.mounts(client, config.all_mounts(), getattr(self.backend, "share_sources", {}),
                                             self.progress)
            await initphase.trust_certificates(client, config.certificates.ca, self.progress)
            guard = MountGuard(self.dial, plugin_argv(config.all_mounts(), mounted))  # issue 14: the mount guard
            await guard.start(client)
        except Exception as exc:  # InitError, MountGuardError, or a call the guest refused: `up` says which
            raise AgentFailure(f"initialization failed: {exc}") from None
        stack.push_async_callback(_cancel, asyncio.ensure_future(guard.run()))

        self.progress("starting dockerd", phase="service", state="starting docker")
        extra = {"bridge": "none", "iptables": False} if config.backend == "sandbox" else {}
        try:
            daemon = with_plugin(daemon_config(config.docker.daemon_json, data_root, extra))
        except Exception as exc:
            raise AgentFailure(str(exc)) from None
        self.service = DockerService(self.dial, machine.docker_log, daemon,
                                     restart_delay=config.docker.restart_delay,
                                     restart_delay_max=config.docker.restart_delay_max,
                                     ready_timeout=config.docker.ready_timeout,
                                     log_size=config.docker_log_bytes, log_files=config.docker.log_files,
                                     on_change=self._docker_changed, env=proxy_env(config.proxy))
        service_task = asyncio.ensure_future(self.service.run())
        stack.push_async_callback(_cancel, service_task)
        stack.push_async_callback(self.service.stop)
        await self._docker_ready(config.docker.ready_timeout)
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
