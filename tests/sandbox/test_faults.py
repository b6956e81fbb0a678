"""`boxpark up` on the sandbox backend when things go wrong: the user's daemon.json end to end (and one that
conflicts with Boxpark's keys), docker.log rotation, junk on the agent's control socket, and the machine
dying under its agent (the sandbox's PID 1 killed: the fast analogue of QEMU dying)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.upmachine import UpMachine

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("docker") is None,
                                 reason="needs root, unshare and the docker CLI")]

USER_DAEMON = {"labels": ["boxpark-test=kept"], "log-level": "debug", "hosts": ["tcp://127.0.0.1:2375"]}


@pytest.fixture(scope="module")
def machine(request, tmp_path_factory):
    daemon = tmp_path_factory.mktemp("daemon") / "daemon.json"
    daemon.write_text(json.dumps(USER_DAEMON))
    # a small docker.log, so that debug logging rolls it over within the tests
    with UpMachine("sandbox", f'[docker]\ndaemon_json = "{daemon}"\nlog_size = "64KiB"\nlog_files = 2\n'
                             f'restart_delay = 0.2\nrestart_delay_max = 1.0\n').running(request) as m:
        yield m


def test_the_users_daemon_json_is_kept_and_boxparks_keys_added_in_the_guest(machine: UpMachine) -> None:
    written = machine.cli("exec", "--", "cat", "/etc/docker/daemon.json")
    assert written.returncode == 0, written.stderr
    daemon = json.loads(written.stdout)
    assert daemon["labels"] == ["boxpark-test=kept"] and daemon["log-level"] == "debug"
    assert daemon["hosts"] == ["unix:///var/run/docker.sock", "tcp://127.0.0.1:2375"]
    assert daemon["bridge"] == "none" and daemon["iptables"] is False  # the sandbox's own
    labels = machine.docker("info", "--format", "{{json .Labels}}")
    assert "boxpark-test=kept" in labels.stdout, labels.stdout + labels.stderr  # dockerd took it


def test_docker_log_rolls_over_and_keeps_its_number_of_files(machine: UpMachine) -> None:
    deadline = time.monotonic() + 120
    while not (machine.dir / "docker.log.2").exists():  # debug logging: every call writes lines
        assert time.monotonic() < deadline, "docker.log never rolled over twice"
        assert machine.docker("info", "--format", "{{.ID}}").returncode == 0
    for _ in range(5):
        machine.docker("version")
    logs = sorted(p.name for p in machine.dir.glob("docker.log*"))
    assert logs == ["docker.log", "docker.log.1", "docker.log.2"], logs
    for name in logs:  # a batch of records may end past the limit, never far
        assert (machine.dir / name).stat().st_size < 64 * 1024 + 64 * 1024, name


def control(machine: UpMachine, data: bytes, *, close: bool = True, timeout: float = 30.0) -> bytes:
    """Send raw bytes to the agent's control socket; everything it answers until it closes."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(machine.dir / "agent.sock"))
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it gave up reading (an overlong line): what it said is still there to read
        if close:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                return reply
            reply += chunk
        return reply


def test_junk_on_the_control_socket_gets_an_error_or_a_close_and_the_agent_goes_on(machine: UpMachine) -> None:
    def errors(reply: bytes) -> str:
        assert reply.count(b"\n") <= 1, reply[:200]
        return json.loads(reply)["error"] if reply else ""

    assert "expected a JSON object" in errors(control(machine, b"\xff\xfe\x00junk\n"))
    assert "expected a JSON object" in errors(control(machine, b'{"op": "sta'))  # half, then the close
    assert "expected a JSON object" in errors(control(machine, b"[1, 2]\n"))
    assert "expected a JSON object" in errors(control(machine, b'{"op": ["status"]}\n'))
    assert "expected a JSON object" in errors(control(machine, b"[" * 3000 + b"\n"))
    assert "unknown op 'reboot-the-world'" in errors(control(machine, b'{"op": "reboot-the-world"}\n'))
    assert "too long" in errors(control(machine, b'{"op": "' + b"x" * (4 << 20) + b'"}\n'))
    assert control(machine, b'{"op": "status"', close=False) == b""  # half, held open: closed by the agent
    held = []
    try:  # more idle connections than it serves: the extra ones are told so, and nothing piles up
        for _ in range(80):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(machine.dir / "agent.sock"))
            held.append(sock)
        held[-1].settimeout(30)
        assert b"too many connections" in held[-1].recv(4096)
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 30
    while True:  # the held ones are closed: the agent answers again
        try:
            status = machine.status()
            break
        except json.JSONDecodeError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert status["state"] == "ready" and status["docker"]["state"] == "ready"
    assert machine.docker("version", "--format", "{{.Server.Version}}").returncode == 0


def test_a_daemon_json_that_sets_a_boxpark_key_is_refused_before_anything_boots(tmp_path: Path) -> None:
    daemon = tmp_path / "daemon.json"
    daemon.write_text('{"data-root": "/srv/docker", "debug": true}')
    m = UpMachine("sandbox", f'[docker]\ndaemon_json = "{daemon}"\n', name="conflict")
    try:
        result = m.up(timeout=60)
        assert result.returncode == 2, result.stderr
        assert "docker.daemon_json" in result.stderr and '"data-root"' in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2
        assert m.agent_pid() is None and not (m.dir / "agent.log").exists()  # nothing started
    finally:
        m.destroy()


def sandbox_init_pid(m: UpMachine) -> int:
    """The host pid of the sandbox's PID 1: the child of the unshare the backend recorded."""
    unshare = int((m.dir / "backend" / "unshare.pid").read_text().split()[0])
    children = Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()
    return int(children[0])


# last: it ends the module's machine (and brings it back)
def test_the_machine_dying_under_its_agent_is_reported_and_up_recovers(machine: UpMachine) -> None:
    init = sandbox_init_pid(machine)
    agent = machine.agent_pid()
    assert agent is not None
    os.kill(init, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # the agent notices at once (it waits on the machine's process), cleans up and exits
        shown = machine.cli("status")
        if "failed" in shown.stdout and not Path(f"/proc/{agent}").exists():
            break
        assert time.monotonic() < deadline, shown.stdout + shown.stderr + machine.logs()
        time.sleep(0.2)
    assert shown.returncode == 3
    assert "the sandbox machine" in shown.stdout and "while the agent ran" in shown.stdout, shown.stdout
    assert "boxpark up" in shown.stdout
    assert not machine.leftovers(), machine.leftovers()
    down = machine.docker("version", timeout=30)
    assert down.returncode != 0  # no socket left that would hang a client
    again = machine.up()
    assert again.returncode == 0, again.stderr + machine.logs()
    assert "cleaned up after a dead agent" not in again.stderr  # the agent had cleaned up itself
    assert machine.docker("version", "--format", "{{.Server.Version}}").returncode == 0
    status = machine.status()
    assert status["state"] == "ready" and status["failure"] is None
    assert machine.down().returncode == 0 and not machine.leftovers()
    assert machine.status()["state"] == "stopped"  # a clean `down` is no failure


def test_a_dockerd_that_refuses_its_config_fails_up_with_its_reason(tmp_path: Path) -> None:
    """A daemon.json option dockerd does not know: `up` gives up after three exits (on the backoff) and
    says what dockerd said; `status` says it too once the agent is gone."""
    daemon = tmp_path / "daemon.json"
    daemon.write_text('{"frobnicate": true}')
    m = UpMachine("sandbox", f'[docker]\ndaemon_json = "{daemon}"\nrestart_delay = 0.2\n', name="refused")
    try:
        result = m.up(timeout=300)
        assert result.returncode == 1, result.stderr
        assert "dockerd did not become ready: dockerd exited with status 1" in result.stderr, result.stderr
        assert "frobnicate" in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.count("restarting in") >= 3, result.stderr  # each exit shown as it happens
        deadline = time.monotonic() + 60
        while m.agent_pid() is not None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        shown = m.cli("status")
        assert shown.stdout.startswith("refused: failed: dockerd did not become ready") and \
            "frobnicate" in shown.stdout, shown.stdout
        while m.leftovers():  # the agent removes its pid file before its process has quite ended
            assert time.monotonic() < deadline, m.leftovers()
            time.sleep(0.1)
    finally:
        m.destroy()
