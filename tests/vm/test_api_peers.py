"""The Guest API over QEMU's user networking serves the host's forward only (issue 10): it listens on
tcp:0.0.0.0:1024 in the guest, where every container can reach it; a container on docker's default bridge
and one on a user network get the connection closed without a byte of theirs read, while the host's
connections (from slirp's gateway, which the test checks in the guest's own socket table) are served.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterator

import pytest

from boxpark import protocol
from tests.upmachine import IMAGE, UpMachine, load_busybox

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None
                                 or shutil.which("docker") is None,
                                 reason="needs root, qemu-system-x86 and the docker CLI")]

CONFIG = 'memory = "1GiB"\n[disk]\nsize = "1GiB"\n[swap]\nsize = "0"'
API_PORT = 1024
NETWORK = "boxpark-api-peers"


@pytest.fixture(scope="module")
def machine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpMachine]:
    m = UpMachine("qemu", CONFIG)
    m.up_or_fail()
    try:
        load_busybox(m, tmp_path_factory.mktemp("busybox"))
        yield m
        if request.session.testsfailed:
            print(m.logs())
    finally:
        m.destroy()


def established_peers(table: str, port: int) -> list[str]:
    """The remote IPv4 addresses of established connections to local `port`, from /proc/net/tcp."""
    peers = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state == "01" and int(local.split(":")[1], 16) == port:
            packed = bytes.fromhex(remote.split(":")[0])
            peers.append(".".join(str(b) for b in reversed(packed)))  # the kernel prints it little-endian
    return peers


def test_the_hosts_connections_come_from_the_user_net_gateway(machine: UpMachine) -> None:
    # while this container runs, the docker CLI's own connection is forwarded through the Guest API
    table = machine.docker("run", "--rm", "--network", "host", IMAGE, "cat", "/proc/net/tcp")
    assert table.returncode == 0, table.stderr
    peers = established_peers(table.stdout, API_PORT)
    assert peers and set(peers) == {"10.0.2.2"}, peers


@pytest.mark.parametrize("network", [None, NETWORK])
def test_a_container_cannot_get_a_byte_read_by_the_guest_api(machine: UpMachine, network: str | None) -> None:
    if network is not None:
        machine.docker("network", "rm", network)
        created = machine.docker("network", "create", network)
        assert created.returncode == 0, created.stderr
    hello = "".join(f"\\{byte:03o}" for byte in protocol.encode(protocol.Hello()))
    # the guest's eth0 address and the container's gateway (docker0 or the network's bridge): both the guest
    script = ("gateway=$(busybox ip route | busybox awk '/^default/ {print $3}'); "
              "for target in 10.0.2.15 $gateway; do "
              f"  got=$(printf '{hello}' | busybox nc -w 10 $target {API_PORT} | busybox wc -c); "
              "  echo \"$target $got\"; "
              "done")
    args = ["--network", network] if network else []
    run = machine.docker("run", "--rm", *args, IMAGE, "sh", "-c", script, timeout=180)
    assert run.returncode == 0, f"{run.stderr}\n{run.stdout}"
    answers = dict(line.split() for line in run.stdout.splitlines())
    assert len(answers) == 2 and "10.0.2.15" in answers, run.stdout
    # the server answers a Hello with a Challenge: any byte back means it read the container's Hello
    assert set(answers.values()) == {"0"}, f"{run.stdout}\n{run.stderr}"
    if network is not None:
        machine.docker("network", "rm", network)
