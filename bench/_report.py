"""What the benchmarks share: the one way to report a figure, a server process up until its socket is there
(the Guest API server, an echo), a sandbox machine brought up with the real CLI, the host's own dockerd
(private directories, no bridge, no iptables: the reference for Docker figures) and the busybox image the
tests load without a network.

Imported by the others; not a benchmark itself. Nothing here may touch what other users of this machine
own: the host dockerd lives in a private directory and is stopped, with all it started, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator


def wait_for(path: str, server: subprocess.Popen[bytes] | None = None, timeout: float = 15.0, *,
             connect: bool = False) -> None:
    """Until the unix socket `path` is there (with `connect`: until it accepts, for a server that takes a
    probe); fail at once if the server process has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"{server.args} exited with {server.returncode}")
        if os.path.exists(path):
            if not connect:
                return
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                    return
                except OSError:
                    pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {path} after {timeout:.0f} s")
        time.sleep(0.01)


@contextlib.contextmanager
def server_process(argv: list[str], path: str, *, connect: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` running until the block ends, once its unix socket `path` is there (see `wait_for`)."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(path, process, connect=connect)
        yield process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout` s; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def guest_server(path: str) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """`boxpark guest serve` on the unix socket `path` (the Guest API server, as a separate process)."""
    return server_process([sys.executable, "-m", "boxpark", "guest", "serve", "--listen", f"unix:{path}"], path,
                          connect=True)  # bound is not yet listening


def figure(name: str, value: float, unit: str, reference: float | None, goal: str,
           ratio: float | None = None, reference_is: str | None = None) -> None:
    """Print one figure as a JSON line; `ratio` defaults to value / reference. `reference_is` says what kind
    of reference it is where it is not the same work done another way: "floor" (a part of the work, what
    no implementation can beat) or "share" (the whole the value is a part of)."""
    if ratio is None and reference:
        ratio = value / reference
    line = {"name": name, "value": round(value, 3), "unit": unit,
            "reference": None if reference is None else round(reference, 3),
            "ratio": None if ratio is None else round(ratio, 3), "goal": goal}
    if reference_is:
        line["reference_is"] = reference_is
    print(json.dumps(line), flush=True)
    print(f"   {name}: {value:.3f} {unit} (reference {reference}, ratio {line['ratio']}, goal {goal})",
          file=sys.stderr)


def say(text: str) -> None:
    """A line of progress for people (stderr)."""
    print(f"   {text}", file=sys.stderr, flush=True)


def boxpark_command() -> list[str]:
    """The `boxpark` command as a user types it: the installed script beside this Python, or `-m boxpark`."""
    script = Path(sys.executable).parent / "boxpark"
    return [str(script)] if script.exists() else [sys.executable, "-m", "boxpark"]


def boxpark(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with its own BOXPARK_HOME."""
    return subprocess.run([sys.executable, "-m", "boxpark", *args], capture_output=True, text=True,
                          env={**os.environ, "BOXPARK_HOME": str(home)}, timeout=600)


def machine_home(backend: str = "sandbox", config: str = "") -> Path:
    """A fresh BOXPARK_HOME (short: sockets live under it) with a boxpark.toml for `backend` (+ `config`)."""
    home = Path(tempfile.mkdtemp(prefix="bpb", dir="/tmp"))
    (home / "boxpark.toml").write_text(f'backend = "{backend}"\n{config}')
    return home


def up(home: Path, name: str = "b") -> None:
    """`boxpark up` of machine `name` in `home` (see `machine_home`); fails with its stderr."""
    result = boxpark(home, "up", "--name", name, "--config", str(home / "boxpark.toml"), "--no-context")
    if result.returncode != 0:
        raise RuntimeError(f"boxpark up failed: {result.stderr.strip()[-2000:]}")


def down(home: Path, name: str = "b") -> None:
    boxpark(home, "down", "--name", name)


@contextlib.contextmanager
def sandbox_machine(backend: str = "sandbox", config: str = "") -> Iterator[Path]:
    """A machine (sandbox unless told) up for the block (`boxpark up`), down and removed after it; yields its
    directory (its BOXPARK_HOME is the directory's parent). `config` is more of boxpark.toml."""
    home = machine_home(backend, config)
    try:
        up(home)
        yield home / "b"
    finally:
        down(home)
        shutil.rmtree(home, ignore_errors=True)


def machine_api(machine_dir: Path) -> tuple[str, bytes | None]:
    """The address of a running machine's Guest API (the agent's api.sock, its Guest Proxy) and the secret
    a client proves, as `boxpark exec` finds them."""
    from boxpark.transport import read_secret

    for path in (machine_dir / "secret", machine_dir / "backend" / "secret"):
        if path.exists():
            return f"unix:{machine_dir}/api.sock", read_secret(str(path))
    return f"unix:{machine_dir}/api.sock", None


def machine_docker(machine_dir: Path) -> list[str]:
    """The docker CLI aimed at a machine's Docker socket (the agent's Guest Proxy)."""
    return ["docker", "-H", f"unix://{machine_dir}/docker.sock"]


def docker_ping(path: str, timeout: float = 5.0) -> bool:
    """Whether the Docker API on unix socket `path` answers GET /_ping with 200 (one new connection)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n")
            head = b""
            while b"\r\n" not in head:
                data = sock.recv(4096)
                if not data:
                    return False
                head += data
            return head.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def load_test_image(docker: list[str], directory: Path) -> str:
    """The tests' busybox image (no registry here) in the dockerd that `docker` reaches; returns its name."""
    from tests.upmachine import IMAGE, busybox_tarball

    if subprocess.run([*docker, "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        work = Path(tempfile.mkdtemp(prefix="bench-image-", dir=directory))
        try:
            subprocess.run([*docker, "import", str(busybox_tarball(work)), IMAGE], check=True, capture_output=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return IMAGE


def run_container(docker: list[str], image: str, timeout: float = 300) -> None:
    """`docker run --rm --network none IMAGE true`: the same work on every dockerd (the host's has no
    bridge, so none of the measured ones uses a network)."""
    result = subprocess.run([*docker, "run", "--rm", "--network", "none", image, "true"], capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(docker)} run failed ({result.returncode}): {result.stderr.strip()}")


def wall(argv: list[str], *, env: dict[str, str] | None = None, check: bool = True) -> float:
    """Seconds one run of `argv` takes, start to exit (its output discarded)."""
    start = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=600)
    elapsed = time.perf_counter() - start
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}: {result.stderr.decode()[-500:]}")
    return elapsed


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


class HostDockerd:
    """The host's own dockerd in private directories under `directory` (data, exec root, socket, pid file)
    and its own mount namespace, with no bridge and no iptables: it changes nothing global. `start()` returns once it answers /_ping;
    `stop()` ends it and everything it started (found by the private directory in their command lines),
    and unmounts what it left mounted there. Data stays in `directory` between starts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = str(directory / "docker.sock")
        self.docker = ["docker", "-H", f"unix://{self.socket}"]
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.monotonic() at the spawn

    def start(self, timeout: float = 120.0) -> float:
        """Start it; seconds from the spawn to its first answer to /_ping."""
        d = self.directory
        dockerd = ["dockerd", f"--data-root={d}/data", f"--exec-root={d}/exec", f"--host=unix://{self.socket}",
                   f"--pidfile={d}/docker.pid", "--bridge=none", "--iptables=false", "--ip6tables=false"]
        # dockerd 20.10 keeps libnetwork's hook sockets in /run/docker/libnetwork whatever its exec root, and
        # another dockerd on this machine (other users run theirs) removes that directory when it stops: our
        # containers then fail to start. A private mount namespace with its own /run/docker keeps it apart
        # (unshare and sh exec in place: the process is dockerd's).
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mkdir -p /run/docker && mount -t tmpfs -o mode=0700 tmpfs /run/docker && exec "$@"', "sh", *dockerd]
        log = open(d / "dockerd.log", "ab")
        self.started_at = time.monotonic()
        with log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        while not docker_ping(self.socket, timeout=1.0):
            if self.process.poll() is not None:
                raise RuntimeError(f"the host's dockerd exited with {self.process.returncode}; see {d}/dockerd.log")
            if time.monotonic() - self.started_at > timeout:
                raise RuntimeError(f"the host's dockerd did not answer in {timeout:.0f} s; see {d}/dockerd.log")
            time.sleep(0.005)
        return time.monotonic() - self.started_at

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            running = subprocess.run([*self.docker, "ps", "-aq"], capture_output=True, text=True).stdout.split()
            if running:  # a container left running keeps its shim (and mounts) past dockerd's exit
                subprocess.run([*self.docker, "rm", "-f", *running], capture_output=True)
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        for pid in _pids_mentioning(f"{self.directory}/"):  # containerd and shims, all ours: our private dir
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        _unmount_under(self.directory)

    def __enter__(self) -> HostDockerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def host_dockerd() -> Iterator[HostDockerd]:
    """The host's dockerd (see `HostDockerd`) running for the block, its directory removed after it."""
    directory = Path(tempfile.mkdtemp(prefix="bphd", dir="/tmp"))
    try:
        with HostDockerd(directory) as dockerd:
            yield dockerd
    finally:
        _unmount_under(directory)
        shutil.rmtree(directory, ignore_errors=True)


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found


def _unmount_under(directory: Path) -> None:
    """Unmount what is mounted at or under `directory` in this mount namespace, deepest first."""
    prefix = str(directory)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def guest_init_pid(machine_dir: Path) -> int:
    """The host pid of a sandbox's init: the child of the unshare its backend recorded."""
    record = json.loads((machine_dir / "backend" / "machine.json").read_text())
    parent = record["pids"][0]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                return int(entry)
    raise RuntimeError("the sandbox's init was not found")


def main() -> None:  # not a benchmark
    pass
