"""End-to-end checks of the mount guard (issue 14, item 2): a bind of a host path that is not shared is refused
before the container exists, naming the path and the config key; shared, guest-only and volume sources work.

Each check takes an UpMachine that is up, its shared home and a scratch directory of the host that is not
shared (pytest's tmp_path: under the host's /tmp, which the guest does not have).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.upchecks import _guest_call
from tests.upmachine import IMAGE, UpMachine, load_busybox

PLUGIN = "boxpark-mounts"


def assert_refused(ran: subprocess.CompletedProcess[str], path: Path) -> None:
    out = ran.stdout + ran.stderr
    assert ran.returncode != 0, out
    assert f"authorization denied by plugin {PLUGIN}" in out and "Mounts denied" in out, out
    assert f"the path {path} is not shared from the host" in out and "[[mounts]]" in out, out


def no_container_was_made(m: UpMachine, name: str) -> None:
    listed = m.docker("ps", "-a", "--filter", f"name={name}", "--format", "{{.Names}}")
    assert listed.returncode == 0 and listed.stdout.strip() == "", (listed.stdout, listed.stderr)


def unshared_bind_is_refused(m: UpMachine, home: Path, tmp: Path) -> None:
    """`-v` and `--mount type=bind` of a host directory outside the shares: refused, nothing made in the guest."""
    load_busybox(m, tmp)
    unshared = tmp / "not-shared"
    unshared.mkdir()
    (unshared / "data").write_text("the host's\n")
    ran = m.docker("run", "--rm", "--name", "refused-v", "-v", f"{unshared}:/data", IMAGE, "cat", "/data/data")
    assert_refused(ran, unshared)
    assert str(home) in ran.stderr  # the shares are named
    no_container_was_made(m, "refused-v")
    ran = m.docker("run", "--rm", "--name", "refused-mount", "--mount",
                   f"type=bind,source={unshared},target=/data", IMAGE, "true")
    assert_refused(ran, unshared)
    no_container_was_made(m, "refused-mount")
    looked = m.cli("exec", "--", "ls", "-d", str(unshared))
    assert looked.returncode != 0, "the refused path was made in the guest"


def guard_off_lets_binds_through(m: UpMachine, tmp: Path) -> None:
    """`[docker] mount_guard = false`: no plugin in daemon.json or the guest's services, status says off, and
    a bind of a path the guest lacks is dockerd's again (made empty, the run succeeds)."""
    guard = m.status()["mount_guard"]
    assert guard == {"on": False, "starts": 0}, guard
    daemon = m.cli("exec", "--", "cat", "/etc/docker/daemon.json")
    assert daemon.returncode == 0 and PLUGIN not in daemon.stdout, (daemon.stdout, daemon.stderr)
    load_busybox(m, tmp)
    unshared = tmp / "not-shared-unguarded"
    ran = m.docker("run", "--rm", "-v", f"{unshared}:/data", IMAGE, "ls", "-A", "/data")
    assert ran.returncode == 0 and ran.stdout == "", (ran.stdout, ran.stderr)


def shared_guest_and_volume_sources_work(m: UpMachine, home: Path, tmp: Path) -> None:
    """A path under the home share, the guest's own docker.sock and /proc, a named volume and a tmpfs mount."""
    load_busybox(m, tmp)
    project = home / "guarded"
    project.mkdir(exist_ok=True)
    (project / "f").write_text("shared\n")
    ran = m.docker("run", "--rm", "-v", f"{project}:/w", "--mount", f"type=bind,source={project},target=/m",
                   IMAGE, "cat", "/w/f", "/m/f")
    assert ran.returncode == 0 and ran.stdout == "shared\nshared\n", (ran.stdout, ran.stderr)
    ran = m.docker("run", "--rm", "-v", "/var/run/docker.sock:/var/run/docker.sock", "-v", "/proc:/host/proc:ro",
                   IMAGE, "sh", "-c", "test -S /var/run/docker.sock && test -e /host/proc/1/stat && echo ok")
    assert ran.returncode == 0 and ran.stdout == "ok\n", (ran.stdout, ran.stderr)
    try:
        ran = m.docker("run", "--rm", "-v", "boxpark-guarded:/v", "--mount", "type=tmpfs,target=/t", IMAGE,
                       "sh", "-c", "echo kept > /v/f && echo t > /t/f")
        assert ran.returncode == 0, ran.stderr
        ran = m.docker("run", "--rm", "--mount", "type=volume,source=boxpark-guarded,target=/v", IMAGE,
                       "cat", "/v/f")
        assert ran.returncode == 0 and ran.stdout == "kept\n", (ran.stdout, ran.stderr)
    finally:
        m.docker("volume", "rm", "-f", "boxpark-guarded")


def compose_command() -> list[str] | None:
    """`docker compose` (the CLI plugin) or `docker-compose` (Debian's docker-compose), whichever is here."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def compose_is_guarded_too(m: UpMachine, home: Path, tmp: Path, compose: list[str]) -> None:
    """Compose sends the same container creations: its unshared volume is refused, its shared one works."""
    load_busybox(m, tmp)
    unshared = tmp / "compose-not-shared"
    unshared.mkdir()
    project = home / "composed"
    project.mkdir(exist_ok=True)
    (project / "f").write_text("composed\n")
    (tmp / "compose.yml").write_text(
        "version: '3'\nservices:\n"
        f"  good:\n    image: {IMAGE}\n    network_mode: none\n    volumes: ['{project}:/w', 'named:/v']\n"
        f"  bad:\n    image: {IMAGE}\n    network_mode: none\n    volumes: ['{unshared}:/data']\n"
        "volumes:\n  named: {}\n")
    env = {**os.environ, "DOCKER_HOST": m.docker_host}
    base = [*compose, "-p", "guarded", "-f", str(tmp / "compose.yml")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp)

    try:
        ran = run("run", "--rm", "good", "cat", "/w/f")
        assert ran.returncode == 0 and ran.stdout.strip() == "composed", (ran.stdout, ran.stderr)
        ran = run("up", "--no-start", "bad")
        assert_refused(ran, unshared)
    finally:
        run("down", "-v")


def guard_comes_back_after_it_is_killed(m: UpMachine, tmp: Path) -> None:
    """The plugin killed in the guest is started again by the agent: refusals go on (dockerd would otherwise
    fail every call)."""
    load_busybox(m, tmp)
    unshared = tmp / "after-kill"
    unshared.mkdir()
    starts = m.status()["mount_guard"]["starts"]
    assert starts >= 1
    secret = m.dir / "backend" / "secret"
    extra = ["--secret-file", str(secret)] if secret.exists() else []
    killed = _guest_call(m, "signal", f'{{"name": "{PLUGIN}", "signal": 9}}', extra)
    assert killed.returncode == 0, killed.stderr
    deadline = time.monotonic() + 90
    while True:
        ran = m.docker("run", "--rm", "-v", f"{unshared}:/data", IMAGE, "true")
        if "Mounts denied" in ran.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert_refused(ran, unshared)
    assert m.docker("version").returncode == 0
    assert m.status()["mount_guard"] == {"on": True, "starts": starts + 1}
