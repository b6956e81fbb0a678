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
