"""Everyday Docker on the sandbox backend: published ports (TCP, UDP, a port in use, after dockerd restarts).

One machine for the module. The sandbox's dockerd runs without a default bridge (it shares the host's
kernel: `bridge: none, iptables: false`), so the containers join a user network made here, in the sandbox's
own network namespace; docker-proxy publishes their ports there as it does in a VM.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests import portchecks, upchecks
from tests.upmachine import UpMachine, busybox_tarball

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("docker") is None,
                                 reason="needs root, unshare and the docker CLI")]

NET = ["--network", "everyday"]


@pytest.fixture(scope="module")
def machine(request, tmp_path_factory):
    m = UpMachine("sandbox")
    result = m.up()
    if result.returncode != 0:
        logs = m.logs()
        m.destroy()
        pytest.fail(f"boxpark up failed:\n{result.stderr}\n{logs}")
    try:
        loaded = m.docker("import", str(busybox_tarball(tmp_path_factory.mktemp("bb"))), portchecks.IMAGE)
        assert loaded.returncode == 0, loaded.stderr
        made = m.docker("network", "create", "everyday")
        assert made.returncode == 0, made.stderr
    except BaseException:
        m.destroy()
        raise
    yield m
    if request.session.testsfailed:
        print(m.logs())
    m.destroy()


def test_published_tcp_port(machine) -> None:
    portchecks.published_tcp_port(machine, NET)


def test_published_udp_port(machine) -> None:
    portchecks.published_udp_port(machine, NET)


def test_host_port_in_use_is_reported(machine) -> None:
    portchecks.host_port_in_use_is_reported(machine, NET)


def test_ports_come_back_after_dockerd_restarts(machine) -> None:
    portchecks.ports_come_back_after_dockerd_restarts(
        machine, NET, lambda: upchecks.dockerd_killed_and_restarted(machine))
