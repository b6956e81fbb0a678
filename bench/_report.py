"""What the benchmarks share: the one way to report a figure, a server process up until its socket is there
(the Guest API server, an echo), and a sandbox machine brought up with the real CLI.

Imported by the others; not a benchmark itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
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
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def guest_server(path: str) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """`boxpark guest serve` on the unix socket `path` (the Guest API server, as a separate process)."""
    return server_process([sys.executable, "-m", "boxpark", "guest", "serve", "--listen", f"unix:{path}"], path)


def figure(name: str, value: float, unit: str, reference: float | None, goal: str,
           ratio: float | None = None) -> None:
    """Print one figure as a JSON line; `ratio` defaults to value / reference."""
    if ratio is None and reference:
        ratio = value / reference
    line = {"name": name, "value": round(value, 3), "unit": unit,
            "reference": None if reference is None else round(reference, 3),
            "ratio": None if ratio is None else round(ratio, 3), "goal": goal}
    print(json.dumps(line), flush=True)
    print(f"   {name}: {value:.3f} {unit} (reference {reference}, ratio {line['ratio']}, goal {goal})",
          file=sys.stderr)


def boxpark(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with its own BOXPARK_HOME."""
    return subprocess.run([sys.executable, "-m", "boxpark", *args], capture_output=True, text=True,
                          env={**os.environ, "BOXPARK_HOME": str(home)}, timeout=600)


@contextlib.contextmanager
def sandbox_machine(backend: str = "sandbox", config: str = "") -> Iterator[Path]:
    """A machine (sandbox unless told) up for the block (`boxpark up`), down and removed after it; yields its
    directory. `config` is more of boxpark.toml."""
    home = Path(tempfile.mkdtemp(prefix="bpb", dir="/tmp"))
    (home / "boxpark.toml").write_text(f'backend = "{backend}"\n{config}')
    try:
        up = boxpark(home, "up", "--name", "b", "--config", str(home / "boxpark.toml"), "--no-context")
        if up.returncode != 0:
            raise RuntimeError(up.stderr)
        yield home / "b"
    finally:
        boxpark(home, "down", "--name", "b")
        shutil.rmtree(home, ignore_errors=True)


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
