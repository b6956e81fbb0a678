"""Everyday Docker on the sandbox backend (issue 6): published ports, names and the host, the home share,
proxies and CA certificates — on one machine (tests/everyday.py).

The sandbox's dockerd runs without a default bridge (it shares the host's kernel: `bridge: none,
iptables: false`), so the containers join a user network made here, in the sandbox's own network
namespace: docker-proxy publishes their ports there as in a VM, and Docker's embedded DNS answers them.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests import everyday

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("docker") is None
                                 or shutil.which("openssl") is None or shutil.which("slirp4netns") is None,
                                 reason="needs root, unshare, slirp4netns, openssl and the docker CLI")]


@pytest.fixture(scope="module")
def machine(request, tmp_path_factory):
    with everyday.everyday_machine("sandbox", "", tmp_path_factory.mktemp("everyday"), request) as m:
        made = m.docker("network", "create", TestEveryday.NETWORK)
        assert made.returncode == 0, made.stderr
        yield m


class TestEveryday(everyday.EverydayTests):
    NETWORK = "everyday"
    NET = ["--network", NETWORK]
