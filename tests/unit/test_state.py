"""A machine's state directory: names, liveness, and cleaning up after a dead agent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from boxpark.host.state import Machine, StateError, record_pid


def test_names(tmp_path) -> None:
    assert Machine.named("dev-1", tmp_path).dir == tmp_path / "dev-1"
    for bad in ("", "Dev", "../x", "a b", "x" * 33, "-x"):
        with pytest.raises(StateError, match="bad machine name"):
            Machine.named(bad, tmp_path)


def test_separate_machines_share_nothing(tmp_path) -> None:
    a, b = Machine.named("a", tmp_path), Machine.named("b", tmp_path)
    paths = lambda m: {m.agent_socket, m.api_socket, m.docker_socket, m.agent_pid_file, m.data_disk}
    assert not paths(a) & paths(b)


def test_a_dead_agents_files_are_stale_and_cleaned(tmp_path) -> None:
    machine = Machine.named("m", tmp_path)
    machine.ensure()
    assert os.stat(machine.dir).st_mode & 0o777 == 0o700
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    machine.agent_pid_file.write_text(f"{dead.pid} boxpark-agent\n")
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(machine.docker_socket))
    leftover.close()
    assert not machine.running() and machine.stale()
    done = machine.clean()
    assert "removed docker.sock" in done and "removed agent.pid" in done
    assert not machine.stale() and not machine.docker_socket.exists()


def test_a_pid_file_naming_someone_else_is_not_an_agent(tmp_path) -> None:
    machine = Machine.named("m", tmp_path)
    machine.ensure()
    machine.agent_pid_file.write_text(f"{os.getpid()} boxpark-agent\n")  # pytest, not an agent
    assert machine.agent_pid() is None


def test_clean_kills_a_recorded_leftover_helper_but_not_a_reused_pid(tmp_path) -> None:
    machine = Machine.named("m", tmp_path)
    machine.ensure()
    helper = subprocess.Popen(["sleep", "60"])
    record_pid(machine.backend_dir / "qemu.pid", helper.pid, "sleep")
    innocent = subprocess.Popen(["sleep", "60"])
    record_pid(machine.backend_dir / "virtiofsd.pid", innocent.pid, "virtiofsd")  # pid reused by someone else
    try:
        done = machine.clean()
        assert helper.wait(60) == -9 and any("sleep" in d for d in done)
        assert innocent.poll() is None
    finally:
        for process in (helper, innocent):
            process.kill()
            process.wait()
