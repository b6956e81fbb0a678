"""The sandbox's network end to end: slirp4netns gives it QEMU's user-net layout; a container on a
user-defined network (the sandbox's dockerd has no default bridge) resolves host.boxpark.internal and
reaches a server on the host's loopback."""

from __future__ import annotations

import os
import shutil

import pytest

from tests import netchecks
from tests.upmachine import UpMachine

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("docker") is None,
                                 reason="needs root, unshare and the docker CLI"),
              pytest.mark.skipif(shutil.which("slirp4netns") is None,
                                 reason="needs slirp4netns (the sandbox has loopback only without it)")]


@pytest.fixture(scope="module")
def machine(request):
    m = UpMachine("sandbox", name="net")
    result = m.up()
    if result.returncode != 0:
        logs = m.logs()
        m.destroy()
        pytest.fail(f"boxpark up failed:\n{result.stderr}\n{logs}")
    yield m
    if request.session.testsfailed:
        print(m.logs())
    m.destroy()
    assert not m.leftovers()


def test_guest_resolves_host_name(machine) -> None:
    netchecks.guest_resolves_host_name(machine)


def test_container_reaches_host_by_name(machine, tmp_path) -> None:
    with netchecks.user_network(machine, "boxpark-net") as network:
        netchecks.container_reaches_host_by_name(machine, tmp_path, network)
