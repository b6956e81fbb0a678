"""End-to-end checks of the host's SSH agent in containers (issue 14, item 4), with a real `ssh-agent`.

`host_ssh_agent` runs an ssh-agent on the host with a fresh ed25519 key in it (the machine's config names its
socket as `ssh_agent`). The container runs the host's own `ssh-add` (an image made here of it, the shared
libraries `ldd` names and busybox: there is no registry), so `ssh-add -l` speaks the agent protocol end to end:
container → /run/host-services/ssh-auth.sock in the guest → the agent's Listen/TakeConnection → the host.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.upmachine import BUSYBOX, UpMachine

GUEST_SOCKET = "/run/host-services/ssh-auth.sock"
IMAGE = "boxpark-test/ssh-add:1"
COMMENT = "boxpark-test-key"


@dataclass
class HostAgent:
    socket: Path
    fingerprint: str  # SHA256:…


def available() -> bool:
    return all(shutil.which(tool) for tool in ("ssh-agent", "ssh-add", "ssh-keygen", "ldd"))


@contextlib.contextmanager
def host_ssh_agent() -> Iterator[HostAgent | None]:
    """A real ssh-agent (ours, by pid) holding one new key; gone at the end. None without OpenSSH's tools."""
    if not available():
        yield None
        return
    directory = Path(tempfile.mkdtemp(prefix="bpssh", dir="/tmp"))  # short: a unix socket path
    sock = directory / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert agent.poll() is None, f"ssh-agent exited with {agent.returncode}"
            assert time.monotonic() < deadline, "ssh-agent did not make its socket within 60 s"
            time.sleep(0.05)
        key = directory / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", COMMENT, "-f", str(key)], check=True)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", str(key)], check=True, env=env, capture_output=True)
        listed = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], check=True, capture_output=True, text=True)
        yield HostAgent(sock, listed.stdout.split()[1])
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        shutil.rmtree(directory, ignore_errors=True)


def load_ssh_add_image(m: UpMachine, tmp: Path) -> None:
    """An image with the host's ssh-add, its libraries at their paths, and busybox's sh."""
    if m.docker("image", "inspect", IMAGE).returncode == 0:
        return
    root = tmp / "ssh-add-rootfs"
    ssh_add = shutil.which("ssh-add")
    assert ssh_add
    libraries = re.findall(r"(/\S+) \(0x", subprocess.run(["ldd", ssh_add], capture_output=True, text=True,
                                                           check=True).stdout)
    for path in [ssh_add, *libraries]:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(path), target)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    (root / "tmp").mkdir()
    tarball = tmp / "ssh-add.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tarball), "."], check=True)
    imported = m.docker("import", str(tarball), IMAGE)
    assert imported.returncode == 0, imported.stderr


def skip_without(agent: HostAgent | None) -> HostAgent:
    if agent is None:
        pytest.skip("needs ssh-agent, ssh-add, ssh-keygen and ldd (openssh-client: scripts/setup installs it)")
    return agent


def ssh_add_lists_the_host_key(m: UpMachine, agent: HostAgent, tmp: Path) -> None:
    """`docker run -v /run/host-services/ssh-auth.sock:… -e SSH_AUTH_SOCK=… ssh-add -l`, as on Docker Desktop."""
    load_ssh_add_image(m, tmp)
    for _ in range(2):  # a second connection works as the first did
        ran = m.docker("run", "--rm", "-v", f"{GUEST_SOCKET}:{GUEST_SOCKET}", "-e", f"SSH_AUTH_SOCK={GUEST_SOCKET}",
                       IMAGE, "ssh-add", "-l")
        assert ran.returncode == 0, (ran.stdout, ran.stderr)
        assert agent.fingerprint in ran.stdout and COMMENT in ran.stdout and "ED25519" in ran.stdout, ran.stdout
    forwards = m.status()["host_services"]["forwards"]
    assert [(f["name"], f["guest"], f["host"], f["listening"]) for f in forwards] == [
        ("ssh-agent", GUEST_SOCKET, str(agent.socket), True)], forwards
    assert forwards[0]["accepted"] >= 2
    shown = m.cli("status")
    assert f"ssh-agent: {GUEST_SOCKET} in the guest → {agent.socket} (listening" in shown.stdout, shown.stdout


def docker_build_ssh_default(m: UpMachine, agent: HostAgent, tmp: Path) -> subprocess.CompletedProcess[str]:
    """`docker build --ssh default` with BuildKit (the Debian 20.10 CLI has it built in): the client's agent
    reaches `RUN --mount=type=ssh` over the build's session, through the Guest Proxy. Returns the build."""
    load_ssh_add_image(m, tmp)
    context = tmp / "build"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {IMAGE}\nRUN --mount=type=ssh ssh-add -l > /listed\n"
                                        "CMD [\"sh\", \"-c\", \"cat /listed\"]\n")
    env = {**os.environ, "DOCKER_BUILDKIT": "1", "SSH_AUTH_SOCK": str(agent.socket), "DOCKER_HOST": m.docker_host}
    # no network: the step needs none, and the sandbox's dockerd has no default bridge for it
    return subprocess.run(["/usr/bin/docker", "build", "--ssh", "default", "--network", "none",
                           "-t", "boxpark-test/ssh-build:1",
                           str(context)], capture_output=True, text=True, timeout=300, env=env)
