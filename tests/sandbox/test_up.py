"""`boxpark up` end to end on the sandbox backend: the real CLI, agent, init, dockerd, docker CLI."""

from __future__ import annotations

import os
import shutil

import pytest

from tests import upchecks
from tests.upmachine import UpMachine

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("docker") is None,
                                 reason="needs root, unshare and the docker CLI")]

MOUNTS = """
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
    m = UpMachine("sandbox", MOUNTS)
    result = m.up()
    if result.returncode != 0:
        logs = m.logs()
        m.destroy()
        pytest.fail(f"boxpark up failed:\n{result.stderr}\n{logs}")
    yield m
    if request.session.testsfailed:
        print(m.logs())
    m.destroy()


def test_docker_cli(machine, tmp_path) -> None:
    upchecks.docker_cli_everyday(machine, tmp_path)


def test_docker_python_package(machine) -> None:
    upchecks.docker_python_package(machine)


def test_exec_and_status(machine) -> None:
    upchecks.exec_and_status(machine)


def test_mounts_parent_first(machine) -> None:
    upchecks.mounts_parent_first(machine)


def test_second_up_says_already_running(machine) -> None:
    again = machine.up()
    assert again.returncode == 0 and "already running" in again.stderr


def test_dockerd_killed_and_restarted(machine) -> None:
    upchecks.dockerd_killed_and_restarted(machine)


def test_killed_agent_is_recognised(machine) -> None:
    upchecks.killed_agent_is_recognised(machine)


def test_down_leaves_nothing(machine) -> None:
    upchecks.down_leaves_nothing(machine)
