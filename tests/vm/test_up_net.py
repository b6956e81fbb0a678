"""The guest's network and DNS end to end on QEMU (TCG): containers on the default bridge and on a
user-defined network resolve host.boxpark.internal through the guest's forwarder and reach a server on the
host's loopback (QEMU's user-net maps 10.0.2.2 to it)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests import netchecks
from tests.upmachine import UpMachine

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None
                                 or shutil.which("docker") is None,
                                 reason="needs root, qemu-system-x86 and the docker CLI")]


@pytest.fixture(scope="module")
def machine(request):
    m = UpMachine("qemu", 'memory = "1GiB"\n', name="net")
    result = m.up()
    if result.returncode != 0:
        logs = m.logs()
        m.destroy()
        pytest.fail(f"boxpark up failed:\n{result.stderr}\n{logs}")
    yield m
    if request.session.testsfailed:
        print(m.logs())
    m.destroy()


def test_guest_resolves_host_name(machine) -> None:
    netchecks.guest_resolves_host_name(machine)


def test_container_on_the_default_bridge_reaches_host_by_name(machine, tmp_path) -> None:
    netchecks.container_reaches_host_by_name(machine, tmp_path)


def test_container_on_a_user_network_reaches_host_by_name(machine, tmp_path) -> None:
    with netchecks.user_network(machine, "boxpark-net") as network:
        netchecks.container_reaches_host_by_name(machine, tmp_path, network)
