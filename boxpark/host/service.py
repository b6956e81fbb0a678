"""The service phase: dockerd in the guest, supervised from the host.

The user's daemon.json is loaded, changed in memory (the guest socket in `hosts`, the data root on the data
disk) and written to the guest; dockerd's environment is the init's plus the configured proxies
(HTTP_PROXY, HTTPS_PROXY, NO_PROXY: see config.proxy_env); the host listens on the service's sd_notify socket, launches dockerd with
its logs streamed back (`launch` with connect) into a rotating log file, and marks the service ready on
READY=1. If dockerd exits it is logged and restarted after a delay that doubles up to a cap and starts over
once dockerd has been ready for a while (`RestartPolicy`); a dockerd that sends no READY=1 within its time
is stopped and counts as an exit, so a crash loop never spins and `status` says why (the exit and dockerd's
last error line). A dropped log stream is re-attached from the last sequence number received, so the log
file has no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
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


@dataclass
class RestartPolicy:
    """How long to wait before starting dockerd again: `initial` seconds, doubling on every exit up to
    `maximum`, and `initial` again after a run that stayed ready for `healthy` seconds. Pure: the caller
    measures the run with its own clock."""

    initial: float = 1.0
    maximum: float = 30.0
    healthy: float = 60.0
    _next: float = field(default=0.0, repr=False)

    def delay(self, ready_for: float) -> float:
        """The wait before the next start, given how long the run that just ended was ready (0: never)."""
        if not self._next or ready_for >= self.healthy:
            self._next = self.initial
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay


class RotatingLog:
    """A log file that rolls over at `limit` bytes, keeping `keep` old ones (docker.log.1 the newest, …)."""

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
        if self._file.tell() > self.limit:
            self._rotate()

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.keep:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
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
    last_error: str = ""  # dockerd's last line on stderr: why it refused to run, as a rule
    next_start_in: float | None = None  # seconds, while restarting
    ready_since: float | None = None
    history: list[str] = field(default_factory=list)


class DockerService:
    """Runs dockerd in the guest until `stop()`: launch, follow logs and notify, restart on exit."""

    def __init__(self, dial: Callable[[], Awaitable[GuestClient]], log_path: Path, daemon_json: dict[str, Any],
                 *, restart_delay: float = 1.0, restart_delay_max: float = 30.0, healthy: float = 60.0,
                 ready_timeout: float = 120.0, log_size: int = 10 * 1024 * 1024, log_files: int = 3,
                 on_change: Callable[[ServiceStatus], None] | None = None,
                 paths: GuestPaths | None = None, name: str = NAME, env: dict[str, str] | None = None,
                 command: list[str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._dial = dial
        self.env = env or {}  # added to the init's environment (the proxies): see `environment`
        self.paths = paths or GuestPaths()
        self.name = name
        self.command = command or ["dockerd", "--config-file", self.paths.daemon_json]
        self.log = RotatingLog(log_path, log_size, log_files)
        self.daemon_json = daemon_json
        self.policy = RestartPolicy(restart_delay, restart_delay_max, healthy)
        self.ready_timeout = ready_timeout
        self.clock = clock
        self.starts: list[float] = []  # clock() at each launch, the last few (tests check the backoff with it)
        self.status = ServiceStatus()
        self.ready = asyncio.Event()
        self._on_change = on_change or (lambda status: None)
        self._stopping = False
        self._ready_at: float | None = None
        self._timed_out = ""
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
            self._ready_at = self.clock()
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

    def why(self) -> str:
        """Why dockerd is not running, in a sentence (for `up` and `status`)."""
        error = f": {self.status.last_error}" if self.status.last_error else ""
        return f"dockerd {self.status.last_exit or self.status.state}{error}"

    async def run(self) -> None:
        while not self._stopping:
            self._ready_at = None
            try:
                await self._run_once()
            except (TransportError, RemoteError, ConnectionError, protocol.ProtocolError) as exc:
                if self._stopping:
                    break
                self.status.last_exit = f"could not be run: {exc}"
                self._set("exited", f"cannot run dockerd: {exc}")
            if self._stopping:
                break
            ready_for = self.clock() - self._ready_at if self._ready_at is not None else 0.0
            delay = self.policy.delay(ready_for)
            self.status.restarts += 1
            self.status.next_start_in = delay
            self._set("restarting", f"{self.why()}; restarting in {delay:.1f} s")
            await asyncio.sleep(delay)
            self.status.next_start_in = None

    async def _run_once(self) -> None:
        client = await self._dial()
        async with client:
            paths = self.paths
            await client.write_file(paths.daemon_json, json.dumps(self.daemon_json, indent=2).encode(),
                                    parents=True)
            await client.mkdir(os.path.dirname(paths.notify_socket), parents=True)
            notify = await client.notify_listen(paths.notify_socket, since=self._notify_seq)
            watcher = asyncio.ensure_future(self._watch_notify(notify))
            watchdog: asyncio.Future[None] | None = None
            try:
                self._set("starting", "starting")
                env = await environment(client, self.env)
                self._timed_out = ""
                stream = await client.launch_connect(self.name, self.command, env=env,
                                                     notify_socket=paths.notify_socket, replace=True)
                launched = stream.first
                assert isinstance(launched, protocol.Launched)
                self.status.pid = launched.pid
                self.status.last_error = ""
                self.starts = [*self.starts[-19:], self.clock()]
                self._last_seq = 0
                self.log.note(f"dockerd started (pid {launched.pid})")
                watchdog = asyncio.ensure_future(self._ready_watchdog(client))
                exit_ = await self._follow(client, stream)
            finally:
                if watchdog is not None:
                    watchdog.cancel()
                watcher.cancel()
                notify.close()
        how = f"status {exit_.code}" if exit_.code is not None else f"signal {exit_.signal}"
        how = f"{self._timed_out} (stopped: {how})" if self._timed_out else f"exited with {how}"
        self.status.last_exit = f"{how} at {time.strftime('%H:%M:%S')}"
        self.log.note(f"dockerd {how}")
        self._set("stopped" if self._stopping else "exited", how)

    async def _ready_watchdog(self, client: GuestClient) -> None:
        """A dockerd that never says READY=1 is stopped (TERM, then KILL): its exit restarts it with backoff."""
        try:
            await asyncio.wait_for(self.ready.wait(), self.ready_timeout)
            return
        except asyncio.TimeoutError:
            pass
        self._timed_out = f"sent no READY=1 within {self.ready_timeout:g} s"
        self.log.note(f"dockerd {self._timed_out}; stopping it")
        log.warning("dockerd %s; stopping it", self._timed_out)
        with contextlib.suppress(RemoteError, TransportError, ConnectionError):
            await client.signal(self.name, signal.SIGTERM)
            await asyncio.sleep(10)
            await client.signal(self.name, signal.SIGKILL)

    async def _follow(self, client: GuestClient, stream: Any) -> protocol.Exit:
        def write(batch: protocol.LogBatch) -> None:
            self.log.write_records(batch.records, batch.dropped)
            if batch.records:
                self._last_seq = batch.records[-1].seq
            for record in reversed(batch.records):
                error = _error_line(record.data) if record.stream == 2 else ""
                if error:
                    self.status.last_error = error
                    break

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


def _error_line(data: bytes, limit: int = 300) -> str:
    """A stderr line of dockerd as a short sentence ("" if it is not an error): a plain line (how it refuses
    its config) as is, a logrus line of level error or fatal reduced to its msg."""
    text = data.decode(errors="replace").strip()
    level = re.search(r'\blevel=(\w+)', text)
    if level is None:
        return text[:limit]
    if level[1] not in ("error", "fatal", "panic"):
        return ""
    msg = re.search(r'\bmsg="((?:[^"\\]|\\.)*)"', text) or re.search(r"\bmsg=(\S+)", text)
    return (msg[1].replace('\\"', '"') if msg else text)[:limit]
