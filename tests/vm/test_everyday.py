"""Everyday Docker on QEMU (TCG) (issue 6): published ports, names and the host, the home share, proxies and
CA certificates — on one machine (tests/everyday.py); containers on docker's default bridge, as a user's
would be, and on a user network for the name of the host.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests import everyday, netchecks, portchecks, sharechecks, upchecks

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None
                                 or shutil.which("docker") is None or shutil.which("openssl") is None,
                                 reason="needs root, qemu-system-x86, openssl and the docker CLI")]

CONFIG = 'memory = "1GiB"\n[disk]\nsize = "1GiB"\n[swap]\nsize = "0"'
NET: list[str] = []


@pytest.fixture(scope="module")
def machine(request, tmp_path_factory):
    with everyday.everyday_machine("qemu", CONFIG, tmp_path_factory.mktemp("everyday"), request) as m:
        yield m


def test_published_tcp_port(machine) -> None:
    portchecks.published_tcp_port(machine, NET)


def test_published_udp_port(machine) -> None:
    portchecks.published_udp_port(machine, NET)


def test_host_port_in_use_is_reported(machine) -> None:
    portchecks.host_port_in_use_is_reported(machine, NET)


def test_guest_resolves_host_name(machine) -> None:
    netchecks.guest_resolves_host_name(machine)


def test_container_on_the_default_bridge_reaches_host_by_name(machine, tmp_path) -> None:
    netchecks.container_reaches_host_by_name(machine, tmp_path)


def test_container_on_a_user_network_reaches_host_by_name(machine, tmp_path) -> None:
    with netchecks.user_network(machine, "boxpark-net") as network:
        netchecks.container_reaches_host_by_name(machine, tmp_path, network)


def test_docker_run_in_the_home_writes_files_the_user_owns(machine, tmp_path) -> None:
    sharechecks.home_share_write(machine, machine.user_home, everyday.USER, tmp_path)


def test_on_the_home_share_the_users_files_are_roots_and_others_files_are_not_writable(machine, tmp_path) -> None:
    sharechecks.home_share_others_files(machine, machine.user_home, tmp_path)


def test_dockerd_has_the_proxies(machine) -> None:
    sharechecks.dockerd_has_proxies(machine, {"HTTPS_PROXY": machine.https, "NO_PROXY": "localhost"})


def test_a_pull_goes_through_the_proxy(machine) -> None:
    sharechecks.pull_goes_through_the_proxy(machine, machine.proxy)


def test_the_guest_trusts_the_configured_ca(machine) -> None:
    sharechecks.ca_in_the_guest_bundle(machine, machine.ca)
    sharechecks.tls_from_the_guest_trusts_the_ca(machine, machine.ca, host_port=machine.tls_port)


def test_ports_come_back_after_dockerd_restarts(machine) -> None:
    portchecks.ports_come_back_after_dockerd_restarts(
        machine, NET, lambda: upchecks.dockerd_killed_and_restarted(machine))


def test_down_leaves_nothing(machine) -> None:
    upchecks.down_leaves_nothing(machine)
    assert (machine.user_home / "src" / "project" / "f").read_text() == "x\n"
