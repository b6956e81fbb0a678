"""`boxpark diagnose` on a real sandbox machine: every part there with real content, and nothing secret.

The machine runs with a proxy password in its configuration. The sandbox has no machine secret of its own
(its sockets are unix sockets, which need none), so the test gives it one where `boxpark exec` looks for it
and has the agent's log leak it: the archive must hold neither the password nor the secret, anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from boxpark import __version__
from tests.upmachine import UpMachine

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("docker") is None,
                                 reason="needs root, unshare and the docker CLI")]

PROXY_PASSWORD = "Pr0xy-Passw0rd-7d1e"
CONFIG = f"""
cpus = 1
memory = "1536MiB"
[proxy]
http = "http://diaguser:{PROXY_PASSWORD}@host.boxpark.internal:3128"
"""


@pytest.fixture(scope="module")
def machine(request):
    with UpMachine("sandbox", CONFIG, name="diag").running(request) as m:
        yield m


def machine_secret(m: UpMachine) -> bytes:
    """The machine's secret from its state directory; on the sandbox, one made for the test and leaked."""
    for path in (m.dir / "secret", m.dir / "backend" / "secret"):
        if path.exists():
            return path.read_bytes().strip()
    secret = os.urandom(32).hex().encode()
    fd = os.open(m.dir / "secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secret + b"\n")
    os.close(fd)
    with open(m.dir / "agent.log", "ab") as log:  # a log line that should never have been written
        log.write(b"debug: handshake with secret " + secret + b"\n")
    return secret


def diagnose(m: UpMachine, out: Path) -> dict[str, bytes]:
    """Run `boxpark diagnose`; every file of the archive by its name below the archive's top directory."""
    result = m.cli("diagnose", "--output", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    printed = re.fullmatch(r"(\S+) \(([\d.]+) (KiB|MiB)\)\n", result.stdout)  # the path and size, on stdout
    assert printed, result.stdout
    unit = 1024 if printed[3] == "KiB" else 1 << 20
    assert Path(printed[1]) == out and abs(float(printed[2]) * unit - out.stat().st_size) <= unit
    with tarfile.open(out) as tar:
        members = tar.getmembers()
        tops = {member.name.split("/", 1)[0] for member in members}
        assert len(tops) == 1 and tops.pop().startswith(f"boxpark-diagnose-{m.name}-")
        return {member.name.split("/", 1)[1]: tar.extractfile(member).read() for member in members if member.isfile()}


def assert_nothing_secret(files: dict[str, bytes], secret: bytes) -> None:
    for name, data in files.items():
        assert secret not in data, f"the machine secret is in {name}"
        assert PROXY_PASSWORD.encode() not in data, f"the proxy password is in {name}"
    assert not any(Path(name).name == "secret" for name in files)


def test_diagnose_a_running_machine(machine, tmp_path) -> None:
    secret = machine_secret(machine)
    status = machine.status()
    files = diagnose(machine, tmp_path / "bundle.tar.gz")
    assert_nothing_secret(files, secret)

    readme = files["README.txt"].decode()
    assert "Missing: nothing" in readme, readme
    assert all(f"  {name}\n" in readme for name in files if name != "README.txt")

    versions = json.loads(files["versions.json"])
    assert versions["host"]["boxpark"] == __version__
    assert versions["backend"]["name"] == "sandbox" and versions["backend"]["unshare"].startswith("unshare from")
    assert versions["guest"]["dockerd"].startswith("Docker version ")
    assert versions["guest"]["kernel"] == status["boot"]["kernel"]
    image = json.loads(files["image-manifest.json"])
    assert versions["image"]["inputs_hash"] == image["inputs_hash"] and image["with_docker"] is True
    assert files["guest/dockerd-version.txt"].decode().startswith("Docker version ")

    # the configuration: the file, masked, and the proxy dockerd got, masked the same
    assert b'http = "http://***:***@host.boxpark.internal:3128"' in files["config/boxpark.toml"]
    effective = json.loads(files["config/effective.json"])
    assert effective["config"]["backend"] == "sandbox" and effective["config"]["cpus"] == 1
    assert effective["dockerd_proxy_env"]["HTTP_PROXY"] == "http://***:***@host.boxpark.internal:3128"
    assert "HTTP Proxy: http://***:***@host.boxpark.internal:3128" in files["guest/docker-info.txt"].decode()

    # status --json and the boot timeline, as the agent has them
    said = json.loads(files["status.json"])
    assert said["state"] == "ready" and said["backend"] == "sandbox"
    assert said["boot"]["boot_id"] == status["boot"]["boot_id"] and said["pid"] == machine.agent_pid()
    timeline = files["boot-timeline.txt"].decode()
    assert status["boot"]["boot_id"] in timeline
    assert all(re.search(rf"^\s+{step['step']}\s", timeline, re.M) for step in status["boot"]["timeline"])

    # the logs of the state directory
    assert b"docker is ready" in files["logs/agent.log"]
    assert b"API listen on" in files["logs/docker.log"]
    assert "logs/init.log" in files and "logs/console.log" in files

    # the agent's view: its machine record and processes
    record = json.loads(files["agent/machine.json"])
    assert record["backend"] == "sandbox" and record["name"] == machine.name
    processes = files["agent/processes.txt"].decode()
    assert re.search(rf"^\s*{machine.agent_pid()}\s.*boxpark agent run --name {machine.name}", processes, re.M)
    assert "from preinit import run" in processes  # the sandbox's pre-init, parent of its PID 1

    # the guest's view, through the agent: processes, mounts, network
    guest = files["guest/processes.txt"].decode()
    assert re.search(r"^\s+1\s+0\s.*/sbin/init", guest, re.M) and re.search(r"\sdockerd\s", guest), guest
    mounts = files["guest/mounts.txt"].decode().splitlines()
    assert any(line.split()[:1] == ["/"] and line.split()[2] == "overlay" for line in mounts[1:]), mounts
    assert any("/var/lib/docker" in line and "tmpfs" in line for line in mounts), mounts
    assert b" / / " in files["guest/mountinfo.txt"]
    network = files["guest/network.txt"].decode()
    assert re.search(r"^\d+: lo: .*\n\s+inet 127\.0\.0\.1", network, re.M), network
    if shutil.which("slirp4netns"):
        assert "inet 10.0.2.100" in network and "via 10.0.2.2 dev eth0" in network
        assert "nameserver" in network
    supervised = json.loads(files["guest/supervised.json"])
    assert any(p["name"] == "dockerd" and p["running"] and p["argv"][0] == "dockerd" for p in supervised), supervised
    assert json.loads(files["guest/info.json"])["boot_id"] == status["boot"]["boot_id"]


def test_diagnose_a_machine_that_is_down_gives_a_partial_bundle_that_says_what_is_missing(machine, tmp_path) -> None:
    secret = machine_secret(machine)
    boot_id = machine.status()["boot"]["boot_id"]
    assert machine.down().returncode == 0
    files = diagnose(machine, tmp_path / "down.tar.gz")
    assert_nothing_secret(files, secret)

    readme = files["README.txt"].decode()
    assert "not running" in readme
    missing = readme.split("Missing (could not be collected):\n", 1)[1]
    assert re.search(r"^  agent's view .*: no agent is running", missing, re.M), readme
    assert re.search(r"^  guest's view .*: the machine is not running", missing, re.M), readme
    assert not any(name.startswith("guest/") for name in files)
    # what outlives the machine is still there: its logs, last boot, and what `status --json` says now
    assert b"stopped" in files["logs/agent.log"] and b"API listen on" in files["logs/docker.log"]
    assert json.loads(files["status.json"])["state"] == "stopped"
    assert json.loads(files["boot-timeline.json"])["boot_id"] == boot_id
