"""The home share, proxies and CA certificates end to end on QEMU (TCG), one machine.

The shared home belongs to a made-up user (1234:1234): virtiofsd runs in a user namespace whose root is
that user, so what a container's root writes on the share belongs to the user on the host. The proxy and
the TLS server run on the host's loopback, which the guest reaches at 10.0.2.2.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests import sharechecks, upchecks
from tests.upmachine import UpMachine

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None
                                 or shutil.which("docker") is None or shutil.which("openssl") is None,
                                 reason="needs root, qemu-system-x86, openssl and the docker CLI")]

USER = (1234, 1234)


@pytest.fixture(scope="module")
def machine(request, tmp_path_factory):
    ca = sharechecks.make_ca(tmp_path_factory.mktemp("ca"))
    with sharechecks.recording_proxy() as proxy, sharechecks.tls_server(ca) as tls_port:
        m = UpMachine("qemu")
        m.home.chmod(0o711)  # the user's virtiofsd must get through to its home, as through /home
        home = m.home / "user"
        home.mkdir()
        os.chown(home, *USER)
        https = f"http://{sharechecks.GUEST_SEES_HOST}:{proxy.port}"
        m.config.write_text(f'backend = "qemu"\nmemory = "1GiB"\n[disk]\nsize = "1GiB"\n[swap]\nsize = "0"\n'
                            f'[home]\npath = "{home}"\n'
                            f'[proxy]\nhttps = "{https}"\nno_proxy = "localhost"\nfrom_env = false\n'
                            f'[certificates]\nca = ["{ca.ca}"]\n')
        result = m.up()
        if result.returncode != 0:
            logs = m.logs()
            m.destroy()
            pytest.fail(f"boxpark up failed:\n{result.stderr}\n{logs}")
        m.user_home, m.ca, m.proxy, m.https, m.tls_port = home, ca, proxy, https, tls_port
        yield m
        if request.session.testsfailed:
            print(m.logs())
        m.destroy()


def test_docker_run_in_the_home_writes_files_the_user_owns(machine, tmp_path) -> None:
    sharechecks.home_share_write(machine, machine.user_home, USER, tmp_path)


def test_on_the_home_share_the_users_files_are_roots_and_others_files_are_not_writable(machine, tmp_path) -> None:
    sharechecks.home_share_others_files(machine, machine.user_home, tmp_path)


def test_dockerd_has_the_proxies(machine) -> None:
    sharechecks.dockerd_has_proxies(machine, {"HTTPS_PROXY": machine.https, "NO_PROXY": "localhost"})


def test_a_pull_goes_through_the_proxy(machine) -> None:
    sharechecks.pull_goes_through_the_proxy(machine, machine.proxy)


def test_the_guest_trusts_the_configured_ca(machine) -> None:
    sharechecks.ca_in_the_guest_bundle(machine, machine.ca)
    sharechecks.tls_from_the_guest_trusts_the_ca(machine, machine.ca, host_port=machine.tls_port)


def test_down_leaves_nothing(machine) -> None:
    upchecks.down_leaves_nothing(machine)
