"""`boxpark up` as a user runs it, for the end-to-end tests of the sandbox and vm tiers.

An `UpMachine` is one named machine in a private BOXPARK_HOME, brought up with the real CLI from a config
file the test writes, used with the real `docker` CLI and the `docker` Python package, and brought down with
the real CLI. Teardown checks what `down` must leave behind: no process, mount, loop device or socket of
the machine; if a test failed it prints the machine's logs first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

BUSYBOX = "/bin/busybox"


def boxpark(home: Path, *args: str, timeout: float = 600, input: str | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BOXPARK_HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "boxpark", *args], capture_output=True, text=True,
                            timeout=timeout, env=env, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"boxpark {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def busybox_tarball(directory: Path) -> Path:
    """A tiny image rootfs: busybox-static and the applets the tests use."""
    root = directory / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "echo", "cat", "ls", "sleep", "httpd", "seq", "wc", "head", "true"):
        (root / "bin" / applet).symlink_to("busybox")
    tarball = directory / "busybox.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tarball), "."], check=True)
    return tarball


IMAGE = "boxpark-test/busybox:1"  # what the end-to-end tests run: busybox_tarball, imported


def load_busybox(m: UpMachine, tmp: Path) -> None:
    """Import the busybox image into the machine's dockerd, unless it is there (no registry here)."""
    if m.docker("image", "inspect", IMAGE).returncode != 0:
        imported = m.docker("import", str(busybox_tarball(tmp)), IMAGE)
        assert imported.returncode == 0, imported.stderr


class UpMachine:
    def __init__(self, backend: str, config: str = "", name: str = "t") -> None:
        self.backend = backend
        self.name = name
        self.home = Path(tempfile.mkdtemp(prefix="bph", dir="/tmp"))  # short: sockets live under it
        self.config = self.home / "boxpark.toml"
        self.config.write_text(f'backend = "{backend}"\n{config}')
        self.dir = self.home / name
        self.docker_host = ""
        self.up_result: subprocess.CompletedProcess[str] | None = None
        self._loops_before = _loop_devices()
        self.loop_device: str | None = None  # the sandbox's, as its backend recorded it while it ran

    def up(self, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = boxpark(self.home, "up", "--name", self.name, "--config", str(self.config), "--no-context",
                         timeout=timeout)
        self.up_result = result
        self._remember_loop_device()
        if result.returncode == 0:
            line = [l for l in result.stdout.splitlines() if l.startswith("export DOCKER_HOST=")]
            self.docker_host = line[-1].split("=", 1)[1]
        return result

    def down(self) -> subprocess.CompletedProcess[str]:
        self._remember_loop_device()  # `down` removes machine.json: read it first
        return boxpark(self.home, "down", "--name", self.name, timeout=120)

    def _remember_loop_device(self) -> None:
        try:
            recorded = json.loads((self.dir / "backend" / "machine.json").read_text()).get("loop_device")
        except (OSError, ValueError):
            return
        if recorded:
            self.loop_device = recorded

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return boxpark(self.home, *args, "--name", self.name, **kwargs) if args[0] in ("status", "logs") \
            else boxpark(self.home, args[0], "--name", self.name, *args[1:], **kwargs)

    def docker(self, *args: str, timeout: float = 180, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "-H", self.docker_host, *args], capture_output=True, text=True,
                              timeout=timeout, input=input)

    def status(self) -> dict[str, Any]:
        return json.loads(boxpark(self.home, "status", "--name", self.name, "--json").stdout)

    def agent_pid(self) -> int | None:
        try:
            return int((self.dir / "agent.pid").read_text().split()[0])
        except (OSError, ValueError):
            return None

    def up_or_fail(self) -> None:
        """`up`; a failure destroys what it left and fails the test with its output and the machine's logs."""
        result = self.up()
        if result.returncode != 0:
            logs = self.logs()
            self.destroy()
            pytest.fail(f"boxpark up failed:\n{result.stderr}\n{logs}")

    @contextlib.contextmanager
    def running(self, request: pytest.FixtureRequest) -> Iterator[UpMachine]:
        """Up for a fixture's life: `up_or_fail`, then, on leaving, the logs if a test failed and `destroy`."""
        self.up_or_fail()
        try:
            yield self
            if request.session.testsfailed:
                print(self.logs())
        finally:
            self.destroy()

    def logs(self) -> str:
        parts = []
        for name in ("agent.log", "init.log", "console.log", "docker.log"):
            path = self.dir / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-40:]
                parts.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(parts)

    def leftovers(self) -> list[str]:
        """What of this machine is still there: processes, mounts, loop devices, sockets."""
        found = []
        home = str(self.home)
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if home in argv or (f"--name {self.name}" in argv and "agent run" in argv and home in
                                Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")):
                found.append(f"process {pid}: {argv[:120]}")
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if home in line:
                found.append(f"mount: {line[:160]}")
        # the sandbox's own loop device, recorded while it ran (other tests may attach others)
        if self.loop_device and self.loop_device in _loop_devices() - self._loops_before:
            found.append(f"loop device {self.loop_device}")
        if self.dir.exists():
            found += [f"socket {p.name}" for p in self.dir.rglob("*.sock")]
        return found

    def destroy(self) -> None:
        """Last resort after a failed test: kill the agent and whatever it left, remove the home."""
        self._remember_loop_device()
        pid = self.agent_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(200):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        boxpark(self.home, "down", "--name", self.name, timeout=60)
        shutil.rmtree(self.home, ignore_errors=True)


def _loop_devices() -> set[str]:
    result = subprocess.run(["losetup", "-n", "-O", "NAME"], capture_output=True, text=True)
    return {line.strip() for line in result.stdout.splitlines() if line.strip()}
