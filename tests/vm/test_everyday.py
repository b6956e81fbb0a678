"""Everyday Docker on QEMU (TCG) (issue 6): published ports, names and the host, the home share, proxies and
CA certificates — on one machine (tests/everyday.py); containers on docker's default bridge, as a user's
would be, and on a user network too for the name of the host.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests import everyday

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None
                                 or shutil.which("docker") is None or shutil.which("openssl") is None,
                                 reason="needs root, qemu-system-x86, openssl and the docker CLI")]

CONFIG = 'memory = "1GiB"\n[disk]\nsize = "1GiB"\n[swap]\nsize = "0"'


@pytest.fixture(scope="module")
def machine(request, tmp_path_factory):
    with everyday.everyday_machine("qemu", CONFIG, tmp_path_factory.mktemp("everyday"), request) as m:
        yield m


class TestEveryday(everyday.EverydayTests):
    ALSO_USER_NETWORK = True
    PORTS = 19080
