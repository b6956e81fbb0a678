"""The service phase: dockerd in the guest, supervised from the host.

The user's daemon.json is loaded, changed in memory (the guest socket in `hosts`, the data root on the data
disk) and written to the guest; dockerd's environment is the init's plus the configured proxies
(HTTP_PROXY, HTTPS_PROXY, NO_PROXY: see config.proxy_env); the host listens on the service's sd_notify socket, launches dockerd with
its logs streamed back (`launch` with connect) into a rotating log file, and marks the service ready on
READY=1. If dockerd exits it is logged and restarted with a doubling delay. A dropped log stream is
re-attached from the last sequence number received, so the log file has no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from .. import protocol
from ..transport import RemoteError, TransportError
from .client import GuestClient

log = logging.getLogger("boxpark.agent.docker")

GUEST_SOCKET = "/var/run/docker.sock"
NOTIFY_SOCKET = "/run/boxpark/docker.notify"
DAEMON_JSON = "/etc/docker/daemon.json"
NAME = "dockerd"


@dataclass
class GuestPaths:
    """Where dockerd's files live in the guest (tests on a host point them at a private directory)."""

    daemon_json: str = DAEMON_JSON
    notify_socket: str = NOTIFY_SOCKET
    docker_socket: str = GUEST_SOCKET


class ServiceError(Exception):
    """The service cannot be configured (e.g. an unreadable daemon.json); the message says what to fix."""


def daemon_config(user_file: str, data_root: str, extra: dict[str, Any] | None = None,
                  socket: str = GUEST_SOCKET) -> dict[str, Any]:
    """The user's daemon.json with what Boxpark needs: the guest socket in `hosts`, the data root."""
    config: dict[str, Any] = {}
    if user_file:
        try:
            config = json.loads(Path(os.path.expanduser(user_file)).read_text())
        except OSError as exc:
            raise ServiceError(f"cannot read the docker daemon config {user_file}: {exc.strerror}") from None
        except ValueError as exc:
            raise ServiceError(f"the docker daemon config {user_file} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ServiceError(f"the docker daemon config {user_file} must be a JSON object")
    hosts = [h for h in config.get("hosts", []) if not h.startswith("unix://")]
    config["hosts"] = [f"unix://{socket}", *hosts]
    if data_root:
        config["data-root"] = data_root
    config.update(extra or {})
    return config


async def environment(client: GuestClient, extra: dict[str, str]) -> dict[str, str] | None:
    """The guest init's own environment with `extra` on top; None (the init's, unchanged) when nothing is added.

    A Launch's `env` replaces the whole environment, so the init's is read first (/proc/1/environ).
    """
    if not extra:
        return None
    data = b""
    while True:
        chunk = await client.read_file("/proc/1/environ", offset=len(data))
        data += chunk.data
        if chunk.eof or not chunk.data:
            break
    base = dict(item.split("=", 1) for item in data.decode(errors="replace").split("\0") if "=" in item)
    return {**base, **extra}


async def follow_logs(client: GuestClient, name: str, stream: Any, write: Callable[[protocol.LogBatch], None], *,
                      since: Callable[[], int], stopped: Callable[[], bool] = lambda: False,
                      patience: float = 30.0) -> protocol.Exit:
    """Hand every log batch of `name` to `write` until its Exit.

    When the stream drops, re-attach after the last sequence number written (`since()`), so the log has no
    gap and no duplicate; keep trying for `patience` seconds while the guest does not answer.
    """
    while True:
        try:
            async for frame in stream:
                if isinstance(frame, protocol.LogBatch):
                    write(frame)
                elif isinstance(frame, protocol.Exit):
                    return frame
        except (ConnectionError, protocol.ProtocolError) as exc:
            log.info("%s's log stream dropped (%s); re-attaching", name, exc)
        stream.close()
        if stopped():
            return protocol.Exit(code=None, signal=signal.SIGTERM)
        deadline = time.monotonic() + patience
        delay = 0.05
        while True:
            try:
                stream = await client.attach(name, since=since())
                break
            except (TransportError, ConnectionError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("re-attaching to %s's logs: %s", name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


class RotatingLog:
    """A log file that rolls over at `limit` bytes, keeping `keep` old ones (docker.log.1, …)."""

    def __init__(self, path: Path, limit: int = 10 * 1024 * 1024, keep: int = 3) -> None:
        self.path = path
        self.limit = limit
        self.keep = keep
        self._file = open(path, "ab")

    def write_records(self, records: list[protocol.LogRecord], dropped: int = 0) -> None:
        lines = []
        if dropped:
            lines.append(f"--- boxpark: {dropped} log records were dropped in the guest ---\n".encode())
        for record in records:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.time_ns // 1_000_000_000))
            lines.append(b"%s.%03dZ %s %s%s" % (stamp.encode(), record.time_ns // 1_000_000 % 1000,
                                                 b"out" if record.stream == 1 else b"err", record.data,
                                                 b"" if record.partial else b"\n"))
        self._file.write(b"".join(lines))
        self._file.flush()
        if self._file.tell() > self.limit:
            self._rotate()

    def note(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._file.write(f"{stamp} --- boxpark: {text} ---\n".encode())
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "ab")

    def close(self) -> None:
        self._file.close()


@dataclass
class ServiceStatus:
    state: str = "stopped"  # stopped, starting, ready, exited, restarting, stopping
    status: str = ""  # the service's own STATUS= text
    pid: int | None = None
    restarts: int = 0
    last_exit: str = ""
    ready_since: float | None = None
    history: list[str] = field(default_factory=list)


class DockerService:
    """Runs dockerd in the guest until `stop()`: launch, follow logs and notify, restart on exit."""

    def __init__(self, dial: Callable[[], Awaitable[GuestClient]], log_path: Path, daemon_json: dict[str, Any],
                 *, restart_delay: float = 1.0, restart_delay_max: float = 30.0,
                 on_change: Callable[[ServiceStatus], None] | None = None,
                 paths: GuestPaths | None = None, name: str = NAME, env: dict[str, str] | None = None) -> None:
        self._dial = dial
        self.env = env or {}  # added to the init's environment (the proxies): see `environment`
        self.paths = paths or GuestPaths()
        self.name = name
        self.log = RotatingLog(log_path)
        self.daemon_json = daemon_json
        self.restart_delay = restart_delay
        self.restart_delay_max = restart_delay_max
        self.status = ServiceStatus()
        self.ready = asyncio.Event()
        self._on_change = on_change or (lambda status: None)
        self._stopping = False
        self._last_seq = 0
        self._notify_seq = 0  # the guest keeps the notify socket's messages: resume after the last one seen

    def _set(self, state: str, note: str = "") -> None:
        self.status.state = state
        if note:
            self.status.history.append(f"{time.strftime('%H:%M:%S')} {note}")
            del self.status.history[:-20]
            log.info("dockerd: %s", note)
        if state == "ready":
            self.status.ready_since = time.time()
            self.ready.set()
        else:
            self.ready.clear()
        self._on_change(self.status)

    def unavailable(self) -> str | None:
        """Why a Docker connection cannot be served now, or None when dockerd is ready."""
        if self.status.state == "ready":
            return None
        detail = f" (last exit: {self.status.last_exit})" if self.status.last_exit else ""
        return f"dockerd in the Boxpark guest is {self.status.state}{detail}; see `boxpark logs docker`"

    async def run(self) -> None:
        delay = self.restart_delay
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._run_once()
            except (TransportError, RemoteError, ConnectionError, protocol.ProtocolError) as exc:
                if self._stopping:
                    break
                self.status.last_exit = f"lost: {exc}"
                self._set("exited", f"cannot run dockerd: {exc}")
            if self._stopping:
                break
            if time.monotonic() - started > 60:
                delay = self.restart_delay  # it ran for a while: start over with a short delay
            self.status.restarts += 1
            self._set("restarting", f"restarting in {delay:.1f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.restart_delay_max)

    async def _run_once(self) -> None:
        client = await self._dial()
        async with client:
            paths = self.paths
            await client.write_file(paths.daemon_json, json.dumps(self.daemon_json, indent=2).encode(),
                                    parents=True)
            await client.mkdir(os.path.dirname(paths.notify_socket), parents=True)
            notify = await client.notify_listen(paths.notify_socket, since=self._notify_seq)
            watcher = asyncio.ensure_future(self._watch_notify(notify))
            try:
                self._set("starting", "starting")
                env = await environment(client, self.env)
                stream = await client.launch_connect(self.name, ["dockerd", "--config-file", paths.daemon_json],
                                                     env=env, notify_socket=paths.notify_socket, replace=True)
                launched = stream.first
                assert isinstance(launched, protocol.Launched)
                self.status.pid = launched.pid
                self._last_seq = 0
                self.log.note(f"dockerd started (pid {launched.pid})")
                exit_ = await self._follow(client, stream)
            finally:
                watcher.cancel()
                notify.close()
        how = f"status {exit_.code}" if exit_.code is not None else f"signal {exit_.signal}"
        self.status.last_exit = f"{how} at {time.strftime('%H:%M:%S')}"
        self.log.note(f"dockerd exited with {how}")
        self._set("stopped" if self._stopping else "exited", f"exited with {how}")

    async def _follow(self, client: GuestClient, stream: Any) -> protocol.Exit:
        def write(batch: protocol.LogBatch) -> None:
            self.log.write_records(batch.records, batch.dropped)
            if batch.records:
                self._last_seq = batch.records[-1].seq

        return await follow_logs(client, self.name, stream, write, since=lambda: self._last_seq,
                                 stopped=lambda: self._stopping and self.status.state == "stopped")

    async def _watch_notify(self, notify: Any) -> None:
        async for message in notify:
            self._notify_seq = message.seq
            if message.status is not None:
                self.status.status = message.status
            if message.ready:
                self._set("ready", f"READY=1 from pid {message.pid}")
            if message.stopping:
                self._set("stopping", "STOPPING=1")
            self._on_change(self.status)

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM dockerd, SIGKILL after `timeout`; the run loop ends."""
        self._stopping = True
        if self.status.state in ("stopped", "exited"):
            return
        try:
            client = await self._dial()
        except TransportError:
            return
        async with client:
            try:
                await client.signal(self.name, signal.SIGTERM)
                await client.wait(self.name, timeout)
            except RemoteError as exc:
                if exc.code == protocol.ErrorCode.TIMEOUT:
                    await client.signal(self.name, signal.SIGKILL)
                    await client.wait(self.name, 5)
        self._set("stopped", "stopped")
