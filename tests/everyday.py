"""The machine that the everyday-Docker tests of both tiers share (tests/*/test_everyday.py).

One machine a tier, configured as a user's would be for issue 6's features at once: a shared home owned by
a made-up user (1234:1234), HTTPS_PROXY pointing at a recording proxy on the host's loopback, an extra CA,
ports published by default. The checks live in portchecks, netchecks and sharechecks; `EverydayTests` runs
them in order (a tier's `TestEveryday` subclass gives the `machine` fixture and its containers' network).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import pytest

from tests import mountchecks, netchecks, portchecks, sharechecks, sshchecks, upchecks
from tests.upmachine import UpMachine, load_busybox

USER = (1234, 1234)


@contextlib.contextmanager
def everyday_machine(backend: str, extra: str, tmp: Path, request: pytest.FixtureRequest) -> Iterator[UpMachine]:
    ca = sharechecks.make_ca(tmp / "ca")
    with sharechecks.recording_proxy() as proxy, sharechecks.tls_server(ca) as tls_port, \
            sshchecks.host_ssh_agent() as ssh_agent:
        m = UpMachine(backend)
        m.home.chmod(0o711)  # the user's virtiofsd must get through to its home, as through /home
        home = m.home / "user"
        home.mkdir()
        os.chown(home, *USER)
        https = f"http://{sharechecks.GUEST_SEES_HOST}:{proxy.port}"
        hosts = netchecks.host_only_hosts_file(tmp)
        agent_key = f'ssh_agent = "{ssh_agent.socket}"\n' if ssh_agent else ""
        m.config.write_text(f'backend = "{backend}"\n{agent_key}{extra}\n[home]\npath = "{home}"\n'
                            f'[dns]\nhosts_file = "{hosts}"\n'
                            f'[proxy]\nhttps = "{https}"\nno_proxy = "localhost"\nfrom_env = false\n'
                            f'[certificates]\nca = ["{ca.ca}"]\n')
        m.up_or_fail()
        try:
            load_busybox(m, tmp)
        except BaseException:
            m.destroy()
            raise
        m.user_home, m.ca, m.proxy, m.https, m.tls_port = home, ca, proxy, https, tls_port  # type: ignore[attr-defined]
        m.ssh_agent = ssh_agent  # type: ignore[attr-defined]
        yield m
        if request.session.testsfailed:
            print(m.logs())
        m.destroy()


class EverydayTests:
    """The tests of a tier's machine, in order: dockerd is killed near the end, `down` is the last."""

    NET: list[str] = []  # `docker run` network arguments
    NETWORK: str | None = None  # the same network, by name (None: docker's default bridge)
    PORTS = 18080  # the first of the host ports the port checks publish (tiers may run side by side)
    ALSO_USER_NETWORK = False  # the name of the host checked on a user network too (Docker's embedded DNS)

    def test_published_tcp_port(self, machine: UpMachine) -> None:
        portchecks.published_tcp_port(machine, self.NET, self.PORTS)

    def test_published_udp_port(self, machine: UpMachine) -> None:
        portchecks.published_udp_port(machine, self.NET, self.PORTS)

    def test_host_port_in_use_is_reported(self, machine: UpMachine) -> None:
        portchecks.host_port_in_use_is_reported(machine, self.NET, self.PORTS)

    def test_guest_resolves_host_name(self, machine: UpMachine) -> None:
        netchecks.guest_resolves_host_name(machine)

    def test_container_reaches_host_by_name(self, machine: UpMachine, tmp_path: Path) -> None:
        netchecks.container_reaches_host_by_name(machine, tmp_path, self.NETWORK)
        if self.ALSO_USER_NETWORK:
            with netchecks.user_network(machine, "boxpark-net") as network:
                netchecks.container_reaches_host_by_name(machine, tmp_path, network)

    def test_a_container_resolves_a_name_only_the_host_knows(self, machine: UpMachine, tmp_path: Path) -> None:
        netchecks.container_resolves_host_only_name(machine, tmp_path, self.NETWORK)  # issue 14

    def test_docker_run_in_the_home_writes_files_the_user_owns(self, machine: UpMachine, tmp_path: Path) -> None:
        sharechecks.home_share_write(machine, machine.user_home, USER, tmp_path)  # type: ignore[attr-defined]

    def test_on_the_home_share_the_users_files_are_roots_and_others_not_writable(self, machine: UpMachine,
                                                                                 tmp_path: Path) -> None:
        sharechecks.home_share_others_files(machine, machine.user_home, tmp_path)  # type: ignore[attr-defined]

    def test_dockerd_has_the_proxies(self, machine: UpMachine) -> None:
        sharechecks.dockerd_has_proxies(machine, {"HTTPS_PROXY": machine.https,  # type: ignore[attr-defined]
                                                  "NO_PROXY": "localhost"})
        assert "HTTP_PROXY" not in sharechecks.dockerd_environment(machine)

    def test_a_pull_goes_through_the_proxy(self, machine: UpMachine) -> None:
        sharechecks.pull_goes_through_the_proxy(machine, machine.proxy)  # type: ignore[attr-defined]

    def test_the_guest_trusts_the_configured_ca(self, machine: UpMachine) -> None:
        sharechecks.ca_in_the_guest_bundle(machine, machine.ca)  # type: ignore[attr-defined]
        sharechecks.tls_from_the_guest_trusts_the_ca(machine, machine.ca,  # type: ignore[attr-defined]
                                                     host_port=machine.tls_port)  # type: ignore[attr-defined]

    def test_a_bind_of_an_unshared_path_is_refused(self, machine: UpMachine, tmp_path: Path) -> None:  # issue 14
        mountchecks.unshared_bind_is_refused(machine, machine.user_home, tmp_path)  # type: ignore[attr-defined]

    def test_shared_guest_and_volume_sources_still_work(self, machine: UpMachine, tmp_path: Path) -> None:
        mountchecks.shared_guest_and_volume_sources_work(machine, machine.user_home,  # type: ignore[attr-defined]
                                                         tmp_path)

    def test_compose_is_refused_an_unshared_path_too(self, machine: UpMachine, tmp_path: Path) -> None:
        compose = mountchecks.compose_command()
        if compose is None:
            pytest.skip("neither `docker compose` nor `docker-compose` is installed (scripts/setup installs it)")
        mountchecks.compose_is_guarded_too(machine, machine.user_home, tmp_path, compose)  # type: ignore[attr-defined]

    def test_ssh_add_in_a_container_lists_the_host_agents_key(self, machine: UpMachine, tmp_path: Path) -> None:
        agent = sshchecks.skip_without(machine.ssh_agent)  # type: ignore[attr-defined]
        sshchecks.ssh_add_lists_the_host_key(machine, agent, tmp_path)

    def test_docker_build_ssh_default(self, machine: UpMachine, tmp_path: Path) -> None:
        agent = sshchecks.skip_without(machine.ssh_agent)  # type: ignore[attr-defined]
        built = sshchecks.docker_build_ssh_default(machine, agent, tmp_path)
        assert built.returncode == 0, built.stderr
        ran = machine.docker("run", "--rm", "boxpark-test/ssh-build:1")
        assert agent.fingerprint in ran.stdout, (ran.stdout, ran.stderr)

    def test_the_mount_guard_comes_back_after_it_is_killed(self, machine: UpMachine, tmp_path: Path) -> None:
        mountchecks.guard_comes_back_after_it_is_killed(machine, tmp_path)

    def test_ports_come_back_after_dockerd_restarts(self, machine: UpMachine) -> None:
        portchecks.ports_come_back_after_dockerd_restarts(
            machine, self.NET, self.PORTS, lambda: upchecks.dockerd_killed_and_restarted(machine))

    def test_down_leaves_nothing(self, machine: UpMachine) -> None:
        upchecks.down_leaves_nothing(machine)
        assert (machine.user_home / "src" / "project" / "f").read_text() == "x\n"  # type: ignore[attr-defined]
