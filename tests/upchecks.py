"""The end-to-end checks of `boxpark up`, shared by the sandbox and vm tiers (each takes an UpMachine)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from bench._report import guest_init_pid
from bench.efficiency import counters, switches_between
from tests.upmachine import IMAGE, UpMachine, busybox_tarball

MIB = 1 << 20
IDLE_WINDOW = 30.0  # s
IDLE_SWITCHES = 15  # context switches per window, all threads: 0.5/s, half the goal; a 1 s tick made 30+



def docker_cli_everyday(m: UpMachine, tmp: Path) -> None:
    version = m.docker("version", "--format", "{{.Server.Version}}")
    assert version.returncode == 0 and version.stdout.strip(), version.stderr
    info = m.docker("info", "--format", "{{.OperatingSystem}} {{.Driver}}")
    assert info.returncode == 0 and info.stdout.strip(), info.stderr
    imported = m.docker("import", str(busybox_tarball(tmp)), IMAGE)
    assert imported.returncode == 0, imported.stderr
    hi = m.docker("run", "--rm", IMAGE, "echo", "hi")
    assert (hi.returncode, hi.stdout) == (0, "hi\n"), hi.stderr
    piped = m.docker("run", "--rm", "-i", IMAGE, "wc", "-l", input="a\nb\nc\n")
    assert piped.returncode == 0 and piped.stdout.strip() == "3", piped.stderr
    started = m.docker("run", "-d", "--name", "ticker", IMAGE, "sh", "-c",
                       "for i in 1 2 3 4 5; do echo tick $i; sleep 0.3; done")
    assert started.returncode == 0, started.stderr
    follow = m.docker("logs", "-f", "ticker", timeout=120)  # returns when the container ends
    assert follow.stdout.split("\n")[:5] == [f"tick {i}" for i in range(1, 6)], follow.stdout
    assert m.docker("rm", "ticker").returncode == 0
    code = m.docker("run", "--rm", IMAGE, "sh", "-c", "exit 42")
    assert code.returncode == 42


def docker_python_package(m: UpMachine) -> None:
    import docker

    client = docker.DockerClient(base_url=m.docker_host, timeout=180)
    try:
        assert client.version()["Version"]
        assert client.containers.run(IMAGE, ["echo", "from python"], remove=True) == b"from python\n"
    finally:
        client.close()


def exec_and_status(m: UpMachine) -> None:
    result = m.cli("exec", "--", "sh", "-c", "echo $((6*7)); exit 3")
    assert (result.returncode, result.stdout) == (3, "42\n"), result.stderr
    piped = m.cli("exec", "-i", "--", "cat", input="through stdin\n")
    assert piped.stdout == "through stdin\n"
    status = m.status()
    assert status["state"] == "ready" and status["docker"]["state"] == "ready"
    assert [s["step"] for s in status["boot"]["timeline"]][:2] == ["rootfs", "mounts"]
    # the guest's clock counts from the machine's start (the sandbox shares the host's: not the host's uptime),
    # so its Ready falls within the agent's boot phase, which began before the machine's process
    assert 0 < status["boot"]["monotonic_ms"] <= status["phases"]["boot"] * 1000, status
    text = m.cli("status").stdout
    assert "ready" in text and "DOCKER_HOST=" in text


def status_shows_resources(m: UpMachine, vm: bool) -> None:
    """`status --json` says what the machine costs; the sandbox has no VM process and no data disk."""
    resources = m.status()["resources"]
    memory = resources["guest_memory"]
    assert memory is not None, resources
    assert 0 < memory["used"] < memory["total"] and 0 < memory["available"] <= memory["total"], memory
    if vm:
        rss, disk = resources["vm_rss"], resources["data_disk"]
        assert rss is not None and 32 * MIB < rss, resources  # a booted guest and dockerd are resident
        assert disk is not None and 0 < disk["allocated"] and disk["size"] >= 1024 * MIB, disk
    else:
        assert resources["vm_rss"] is None and resources["data_disk"] is None, resources
    text = m.cli("status").stdout
    assert "used" in text and "available" in text, text


def quiet_at_idle(m: UpMachine, sandbox: bool) -> None:
    """At idle the agent (and, in the sandbox, the guest's init: a host process there) barely wakes: at most
    IDLE_SWITCHES context switches over IDLE_WINDOW, in one of three windows (anything else this machine
    runs may wake them once; a timer would in every window). Counts, not time: robust under load."""
    agent = m.agent_pid()
    assert agent is not None
    pids = {"agent": agent, **({"init": guest_init_pid(m.dir)} if sandbox else {})}
    seen = []
    for _ in range(3):
        before = {name: counters(pid)[1] for name, pid in pids.items()}
        time.sleep(IDLE_WINDOW)
        switches = {name: switches_between(before[name], counters(pid)[1]) for name, pid in pids.items()}
        seen.append(switches)
        if max(switches.values()) <= IDLE_SWITCHES:
            return
    raise AssertionError(f"not quiet at idle: context switches per {IDLE_WINDOW:g} s window: {seen}")


def mounts_parent_first(m: UpMachine) -> None:
    """The config lists /srv/a/b/c, /srv/a, /srv/a/b; the guest must have mounted them parent-first."""
    info = m.cli("exec", "--", "cat", "/proc/self/mountinfo")
    assert info.returncode == 0, info.stderr
    points = [line.split()[4] for line in info.stdout.splitlines()]
    order = [p for p in points if p in ("/srv/a", "/srv/a/b", "/srv/a/b/c")]
    assert order == ["/srv/a", "/srv/a/b", "/srv/a/b/c"], points


def dockerd_killed_and_restarted(m: UpMachine) -> None:
    secret = m.dir / "backend" / "secret"
    extra = ["--secret-file", str(secret)] if secret.exists() else []
    killed = _guest_call(m, "signal", '{"name": "dockerd", "signal": 9}', extra)
    assert killed.returncode == 0, killed.stderr
    deadline = time.monotonic() + 60
    refused = None
    while time.monotonic() < deadline:
        attempt = m.docker("version", timeout=30)
        if attempt.returncode != 0:
            refused = attempt
            break
        time.sleep(0.05)
    assert refused is not None and "dockerd in the Boxpark guest is" in refused.stderr + refused.stdout, refused
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if m.docker("version", "--format", "{{.Server.Version}}", timeout=30).returncode == 0:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("docker did not come back after dockerd was killed:\n" + m.logs())
    # The killed dockerd's containerd went with it (its service cgroup), so exactly one runs now.
    count = m.cli("exec", "--", "sh", "-c", "grep -lx containerd /proc/[0-9]*/comm | wc -l")
    assert count.stdout.strip() == "1", count.stdout + count.stderr
    assert "exited with signal 9" in (m.dir / "docker.log").read_text()
    assert "exited with signal 9" in (m.dir / "agent.log").read_text()
    assert m.status()["docker"]["restarts"] >= 1


def _guest_call(m: UpMachine, method: str, params: str, extra: list[str]) -> subprocess.CompletedProcess[str]:
    from tests.upmachine import boxpark

    return boxpark(m.home, "guest", "call", f"unix:{m.dir}/api.sock", method, "--json", params, *extra)


def down_leaves_nothing(m: UpMachine) -> None:
    result = m.down()
    assert m.backend != "sandbox" or m.loop_device, "no loop device recorded: the leftovers check would see none"
    assert result.returncode == 0, result.stderr
    left = m.leftovers()
    assert not left, left
    assert m.status()["state"] == "stopped"


def killed_agent_is_recognised(m: UpMachine) -> None:
    """An agent killed with SIGKILL leaves state; the next `up` cleans it and comes up."""
    pid = m.agent_pid()
    assert pid is not None
    import os

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    again = m.up()
    assert again.returncode == 0, again.stderr + m.logs()
    assert "cleaned up after a dead agent" in again.stderr
    assert m.docker("version", "--format", "{{.Server.Version}}").returncode == 0
