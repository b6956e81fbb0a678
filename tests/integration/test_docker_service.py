"""The host's Docker service and Guest Proxy against a real Guest API server and a real dockerd.

The guest side runs on this host with private paths (never /etc/docker or /var/run/docker.sock here):
dockerd gets its own data-root, exec-root, pidfile and socket, `--bridge=none --iptables=false`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from boxpark.host.client import GuestClient
from boxpark.host.guestproxy import GuestProxy
from boxpark.host.service import DockerService, GuestPaths, daemon_config
from boxpark.protocol import Connect
from boxpark.transport import open_raw_blocking
from tests.guestserver import running_server

pytestmark = pytest.mark.integration

needs_dockerd = pytest.mark.skipif(shutil.which("dockerd") is None or os.geteuid() != 0,
                                   reason="needs dockerd (Debian docker.io) and root")


@pytest.fixture
def short_tmp():
    directory = tempfile.mkdtemp(prefix="bp", dir="/tmp")  # unix socket paths must stay short
    yield Path(directory)
    # A SIGKILLed dockerd leaves its containerd behind: stop every process that runs from our directory.
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if directory.encode() in argv:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    subprocess.run(["umount", "-R", "-l", f"{directory}/data"], capture_output=True)
    shutil.rmtree(directory, ignore_errors=True)


def docker(host: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "-H", f"unix://{host}", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_daemon_config_keeps_the_users_settings_and_adds_ours(tmp_path) -> None:
    user = tmp_path / "daemon.json"
    user.write_text(json.dumps({"hosts": ["unix:///elsewhere.sock", "tcp://0.0.0.0:2375"], "debug": True}))
    config = daemon_config(str(user), "/var/lib/boxpark/docker")
    assert config["hosts"] == ["unix:///var/run/docker.sock", "tcp://0.0.0.0:2375"]
    assert config["data-root"] == "/var/lib/boxpark/docker" and config["debug"] is True
    user.write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        daemon_config(str(user), "")


@needs_dockerd
def test_dockerd_supervised_through_the_api_and_proxied(short_tmp: Path) -> None:
    d = short_tmp
    with running_server(d) as srv:
        async def scenario() -> dict:
            async def dial() -> GuestClient:
                return await GuestClient.open(srv.address)

            daemon = daemon_config("", str(d / "data"), {
                "exec-root": str(d / "exec"), "pidfile": str(d / "docker.pid"), "bridge": "none",
                "iptables": False, "ip-masq": False}, socket=str(d / "docker.sock"))
            service = DockerService(dial, d / "docker.log", daemon, restart_delay=0.5, restart_delay_max=1.0,
                                    paths=GuestPaths(str(d / "daemon.json"), str(d / "notify.sock"),
                                                     str(d / "docker.sock")), name="dockerd-test")

            def open_docker() -> socket.socket:
                return open_raw_blocking(srv.address, Connect(path=str(d / "docker.sock")))

            runner = asyncio.ensure_future(service.run())
            proxy = GuestProxy(str(d / "proxy.sock"), open_docker, unavailable=service.unavailable)
            results: dict = {}
            try:
                await asyncio.wait_for(service.ready.wait(), 60)
                await proxy.start()
                assert os.stat(d / "proxy.sock").st_mode & 0o777 == 0o600
                version = await asyncio.to_thread(docker, str(d / "proxy.sock"), "version", "--format",
                                                  "{{.Server.Version}}")
                results["version"] = version
                first_pid = service.status.pid
                os.kill(first_pid, signal.SIGKILL)  # dockerd dies in the "guest"
                deadline = time.monotonic() + 60
                while service.status.state == "ready" and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                results["while_down"] = await asyncio.to_thread(docker, str(d / "proxy.sock"), "version")
                await asyncio.wait_for(service.ready.wait(), 60)
                results["after"] = await asyncio.to_thread(docker, str(d / "proxy.sock"), "version", "--format",
                                                           "{{.Server.Version}}")
                results["restarts"] = service.status.restarts
                results["pids"] = (first_pid, service.status.pid)
            finally:
                proxy.close()
                await service.stop(timeout=20)
                runner.cancel()
            results["stopped_pid"] = service.status.pid
            return results

        results = asyncio.run(scenario())
    assert results["version"].returncode == 0, results["version"].stderr
    assert results["version"].stdout.strip()
    down = results["while_down"]
    assert down.returncode != 0 and "dockerd in the Boxpark guest is" in (down.stderr + down.stdout)
    assert results["after"].returncode == 0 and results["restarts"] >= 1
    assert results["pids"][0] != results["pids"][1]
    with pytest.raises(ProcessLookupError):
        os.kill(results["stopped_pid"], 0)
    log = (d / "docker.log").read_text()
    assert "dockerd started" in log and "exited with signal 9" in log and "API listen on" in log


def test_a_cut_log_stream_resumes_with_no_gap_and_no_duplicate(tmp_path) -> None:
    """The agent's log follower: the guest drops the stream twice mid-flood; the file still has 1..N once."""
    from boxpark import protocol
    from boxpark.host.service import follow_logs

    with running_server(tmp_path) as srv:
        async def cut_streams() -> int:
            cut = 0
            for task in list(srv.server._connections):
                task.cancel()
                cut += 1
            return cut

        async def scenario() -> tuple[list[bytes], int]:
            lines: list[bytes] = []
            last = 0

            def write(batch: protocol.LogBatch) -> None:
                nonlocal last
                assert not batch.dropped
                for record in batch.records:
                    assert record.seq == last + 1, (record.seq, last)  # no gap, no duplicate
                    last = record.seq
                    lines.append(record.data)

            async with await GuestClient.open(srv.address) as client:
                stream = await client.launch_connect("counter", ["sh", "-c",
                                                                 "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); "
                                                                 "echo $i; [ $((i % 1000)) -eq 0 ] && sleep 0.1; "
                                                                 "done; true"])
                follower = asyncio.ensure_future(follow_logs(client, "counter", stream, write, since=lambda: last))
                cuts = 0
                for _ in range(2):
                    while len(lines) < 5000 * (cuts + 1) and not follower.done():
                        await asyncio.sleep(0.01)
                    assert not follower.done() and len(lines) < 30000  # the cut falls mid-stream
                    cuts += await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(cut_streams(), srv.loop))
                exit_ = await asyncio.wait_for(follower, 120)
                assert exit_.code == 0
            return lines, cuts

        lines, cuts = asyncio.run(scenario())
    assert cuts >= 2
    assert lines == [str(i).encode() for i in range(1, 30001)]


def private_daemon(d: Path, **user: object) -> dict:
    """A daemon.json for a dockerd on this host with private paths (plus the test's own keys)."""
    return daemon_config("", str(d / "data"), {
        "exec-root": str(d / "exec"), "pidfile": str(d / "docker.pid"), "bridge": "none",
        "iptables": False, "ip-masq": False, **user}, socket=str(d / "docker.sock"))


def service_for(srv, d: Path, daemon: dict, **options: object) -> DockerService:
    async def dial() -> GuestClient:
        return await GuestClient.open(srv.address)

    return DockerService(dial, d / "docker.log", daemon, paths=GuestPaths(str(d / "daemon.json"),
                                                                         str(d / "notify.sock"),
                                                                         str(d / "docker.sock")),
                         name="dockerd-test", **options)


async def until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


@needs_dockerd
def test_a_dockerd_that_refuses_its_config_is_restarted_on_the_backoff_and_says_why(short_tmp: Path) -> None:
    """A crash loop: every exit is recorded with dockerd's own reason, and the starts follow the policy
    (0.2, 0.4, 0.8, 0.8 s apart at least: never a busy loop)."""
    d = short_tmp
    with running_server(d) as srv:
        restarting: list[str] = []  # what the service said each time it scheduled a restart
        service = service_for(srv, d, private_daemon(d, frobnicate=True), restart_delay=0.2,
                              restart_delay_max=0.8,
                              on_change=lambda s: s.state == "restarting" and restarting.append(service.why()))

        async def scenario() -> None:
            runner = asyncio.ensure_future(service.run())
            try:
                await until(lambda: len(service.starts) >= 5, "five starts")
            finally:
                await service.stop(timeout=10)
                runner.cancel()

        asyncio.run(scenario())
    status = service.status
    assert status.restarts >= 4 and not service.ready.is_set()
    assert len(restarting) >= 4
    for why in restarting:
        assert why.startswith("dockerd exited with status 1 at ") and "frobnicate" in why, why
    gaps = [b - a for a, b in zip(service.starts, service.starts[1:])]
    for gap, delay in zip(gaps, [0.2, 0.4, 0.8, 0.8]):
        assert gap >= delay, (gaps, "a restart came before its delay")
    assert [h.split(" ", 1)[1].rsplit("restarting in ", 1)[1] for h in status.history
            if "restarting in" in h][:4] == ["0.2 s", "0.4 s", "0.8 s", "0.8 s"]
    assert "frobnicate" in (d / "docker.log").read_text()


def test_a_daemon_that_never_sends_ready_is_stopped_after_its_timeout_and_restarted(tmp_path: Path) -> None:
    """The service's READY=1 deadline, with a stand-in daemon that runs but never notifies: it is stopped,
    the exit says why, and the next start comes after the backoff."""
    with running_server(tmp_path) as srv:
        service = service_for(srv, tmp_path, {}, restart_delay=0.1, restart_delay_max=0.1, ready_timeout=0.5,
                              command=["sleep", "600"])

        async def scenario() -> None:
            runner = asyncio.ensure_future(service.run())
            try:
                await until(lambda: len(service.starts) >= 2, "a second start")
            finally:
                await service.stop(timeout=10)
                runner.cancel()

        asyncio.run(scenario())
    assert any("sent no READY=1 within 0.5 s (stopped: signal 15)" in h for h in service.status.history), \
        service.status.history
    assert not service.ready.is_set()
    assert "sent no READY=1 within 0.5 s; stopping it" in (tmp_path / "docker.log").read_text()
    assert service.starts[1] - service.starts[0] >= 0.5  # it had its whole time to say READY=1
