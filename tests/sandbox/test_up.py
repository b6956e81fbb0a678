"""`boxpark up` end to end on the sandbox backend: the real CLI, agent, init, dockerd, docker CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests import upchecks
from tests.upmachine import UpMachine

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("docker") is None,
                                 reason="needs root, unshare and the docker CLI")]

MOUNTS = """
cpus = 1
memory = "1536MiB"
[[mounts]]
source = "tmpfs"
target = "/srv/a/b/c"
type = "tmpfs"
[[mounts]]
source = "tmpfs"
target = "/srv/a"
type = "tmpfs"
[[mounts]]
source = "tmpfs"
target = "/srv/a/b"
type = "tmpfs"
"""


@pytest.fixture(scope="module")
def machine(request):
    with UpMachine("sandbox", MOUNTS).running(request) as m:
        yield m


def test_docker_cli(machine, tmp_path) -> None:
    upchecks.docker_cli_everyday(machine, tmp_path)


def test_docker_python_package(machine) -> None:
    upchecks.docker_python_package(machine)


def test_exec_and_status(machine) -> None:
    upchecks.exec_and_status(machine)


def test_status_shows_what_the_machine_costs(machine) -> None:
    upchecks.status_shows_resources(machine, vm=False)


def test_agent_and_init_are_quiet_at_idle(machine) -> None:
    upchecks.quiet_at_idle(machine, sandbox=True)


def test_exec_stdin_from_a_file_or_dev_null(machine, tmp_path) -> None:
    # epoll refuses regular files and /dev/null: `exec -i` once waited on them forever
    import subprocess
    import sys

    data = tmp_path / "in.txt"
    data.write_bytes(b"a line from a file\n" * 10000)
    env = {**os.environ, "BOXPARK_HOME": str(machine.home)}
    for stdin, size in ((data, "190000"), (Path(os.devnull), "0")):
        with open(stdin, "rb") as f:
            result = subprocess.run([sys.executable, "-m", "boxpark", "exec", "--name", machine.name, "-i", "--",
                                     "wc", "-c"], stdin=f, capture_output=True, text=True, env=env, timeout=120)
        assert (result.returncode, result.stdout.strip()) == (0, size), result.stderr


def test_cpus_and_memory_limit_the_sandboxs_cgroup_or_up_says_they_do_not(machine) -> None:
    import json

    from boxpark.host.backends.sandbox import cgroup2_controllers

    cgroup = Path(json.loads((machine.dir / "backend" / "machine.json").read_text())["cgroup"])
    assert cgroup.is_dir()
    controllers = cgroup2_controllers()
    if "memory" in controllers:
        assert (cgroup / "memory.max").read_text().strip() == str(1536 * 1024 * 1024)
    if "cpu" in controllers:
        assert (cgroup / "cpu.max").read_text().split() == ["100000", "100000"]
    missing = [c for c in ("cpu", "memory") if c not in controllers]
    said = [line for line in (machine.dir / "agent.log").read_text().splitlines() if "without its limits" in line]
    if missing:  # never silently: `up` printed it (the agent's progress, also in its log)
        assert said, machine.logs()
        assert all(c in said[-1] for c in missing) and "cpus = 1" in said[-1] and "memory = 1536 MiB" in said[-1]
        assert all(not (cgroup / f"{c}.max").exists() for c in missing)
    else:
        assert not said


def test_mounts_parent_first(machine) -> None:
    upchecks.mounts_parent_first(machine)


def test_second_up_says_already_running_and_what_changed(machine) -> None:
    again = machine.up()
    assert again.returncode == 0 and "already running" in again.stderr
    assert "changed since it started" not in again.stderr, again.stderr
    original = machine.config.read_text()
    try:  # the same memory in other words is no change; another cpus and swap size are
        machine.config.write_text(original.replace('cpus = 1\nmemory = "1536MiB"',
                                                   f'cpus = 2\nmemory = {1536 << 20}\n[swap]\nsize = "2GiB"'))
        changed = machine.up()
    finally:
        machine.config.write_text(original)
    assert changed.returncode == 0, changed.stderr
    line = next((l for l in changed.stderr.splitlines() if "changed since it started" in l), "")
    assert "cpus, swap.size" in line and "memory" not in line, changed.stderr


def test_dockerd_killed_and_restarted(machine) -> None:
    upchecks.dockerd_killed_and_restarted(machine)


def test_killed_agent_is_recognised(machine) -> None:
    upchecks.killed_agent_is_recognised(machine)


def test_shell_is_a_pty_that_follows_the_window_and_dies_with_its_client(machine) -> None:
    import fcntl
    import pty
    import select
    import signal
    import struct
    import subprocess
    import sys
    import termios
    import time

    def set_size(fd: int, rows: int, cols: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def read_until(fd: int, text: bytes, timeout: float = 30) -> bytes:
        seen = b""
        deadline = time.monotonic() + timeout
        while text not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {text!r} in {seen[-500:]!r}"
            if select.select([fd], [], [], left)[0]:
                seen += os.read(fd, 65536)
        return seen

    master, slave = pty.openpty()
    set_size(slave, 30, 100)
    env = {**os.environ, "BOXPARK_HOME": str(machine.home), "TERM": "xterm"}
    client = subprocess.Popen([sys.executable, "-m", "boxpark", "shell", "--name", machine.name],
                              stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                              preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    try:
        read_until(master, b"# ")  # the prompt: the shell is up
        os.write(master, b"stty size; echo marker-$((1+1))\n")
        assert b"30 100" in read_until(master, b"marker-2")
        set_size(master, 40, 120)  # the kernel sends SIGWINCH to the client, which forwards the size
        time.sleep(0.3)
        os.write(master, b"stty size\n")
        read_until(master, b"40 120")
        os.write(master, b"exec sleep 1000\n")
        time.sleep(0.5)
        client.send_signal(signal.SIGKILL)  # the client dies; its shell in the guest must get SIGHUP
        client.wait(60)
    finally:
        os.close(master)
        if client.poll() is None:
            client.kill()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ps = machine.cli("exec", "--", "sh", "-c", "ls /proc | grep -c '^[0-9]' ; cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
        if "sleep 1000" not in ps.stdout:
            break
        time.sleep(0.2)
    assert "sleep 1000" not in ps.stdout, ps.stdout
    assert machine.status()["docker"]["state"] == "ready"  # the agent did not notice a thing


def test_killing_up_midway_harms_nothing() -> None:
    import signal
    import subprocess
    import sys
    import time

    m = UpMachine("sandbox", name="k")
    try:
        env = {**os.environ, "BOXPARK_HOME": str(m.home)}
        up = subprocess.Popen([sys.executable, "-m", "boxpark", "up", "--name", "k", "--config", str(m.config),
                               "--no-context"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while m.agent_pid() is None:
            assert time.monotonic() < deadline and up.poll() is None
            time.sleep(0.005)
        up.send_signal(signal.SIGKILL)
        up.wait()
        again = m.up()
        assert again.returncode == 0, again.stderr + m.logs()
        assert m.docker("version", "--format", "{{.Server.Version}}").returncode == 0
        assert m.down().returncode == 0 and not m.leftovers()
    finally:
        m.destroy()


def test_killing_logs_follow_harms_nothing(machine) -> None:
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "BOXPARK_HOME": str(machine.home)}
    follower = subprocess.Popen([sys.executable, "-m", "boxpark", "logs", "-f", "docker", "--name", machine.name],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert follower.stdout.readline()  # it prints the log so far, then follows
        machine.docker("version")  # dockerd writes more while we follow
        time.sleep(0.5)
    finally:
        follower.send_signal(signal.SIGKILL)
        follower.wait(60)
    assert machine.status()["docker"]["state"] == "ready"
    assert machine.docker("version", "--format", "{{.Server.Version}}").returncode == 0

# last: it takes the module's machine down
def test_down_leaves_nothing(machine) -> None:
    upchecks.down_leaves_nothing(machine)
