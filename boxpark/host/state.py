"""A machine's state directory: where its agent, sockets, logs and records live, and whether it is alive.

One directory per named machine under the user's data directory ($BOXPARK_HOME, else
$XDG_DATA_HOME/boxpark, else ~/.local/share/boxpark). Several machines never share a file, socket or port.
An agent that died leaves a pid file whose process is gone (or is someone else): `stale()` says so and
`clean()` removes what it left, killing only processes whose pid files it wrote and that are still ours.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

# The C module under `socket`: `socket` itself builds its enums when imported, which costs `boxpark status`
# (a unix socket, one line each way) more than the rest of this module (measured: bench/cli_startup.py).
from _socket import AF_UNIX, SOCK_STREAM, socket as _unix_socket  # non-inheritable, as socket.socket (PEP 446)

from ..dirs import config_home as config_home, data_home as data_home  # one XDG rule for all of Boxpark
from ..errors import BoxparkError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (every `boxpark status` loads this module)
if TYPE_CHECKING:
    from typing import Any, Iterator

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class StateError(BoxparkError):
    """A machine name or state directory problem; the message says what to do."""

    exit_code = 2


class Machine:
    """The files of one machine. (A plain class, not a dataclass: dataclasses costs `boxpark status` more
    to import than all the rest of its own code.)"""

    __slots__ = ("name", "dir")

    def __init__(self, name: str, dir: Path) -> None:
        self.name = name
        self.dir = dir

    def __repr__(self) -> str:
        return f"Machine(name={self.name!r}, dir={self.dir!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Machine):
            return NotImplemented
        return (self.name, self.dir) == (other.name, other.dir)

    __hash__ = None  # type: ignore[assignment]  # as a dataclass's: mutable, so unhashable

    @classmethod
    def named(cls, name: str, home: Path | None = None) -> Machine:
        if not NAME.match(name):
            raise StateError(f"bad machine name {name!r}: use 1-32 of a-z, 0-9, '-' and '_', starting with a "
                             f"letter or digit")
        return cls(name, (home or data_home()) / name)

    def ensure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)

    # -- paths
    @property
    def agent_pid_file(self) -> Path: return self.dir / "agent.pid"
    @property
    def agent_socket(self) -> Path: return self.dir / "agent.sock"
    @property
    def api_socket(self) -> Path: return self.dir / "api.sock"
    @property
    def docker_socket(self) -> Path: return self.dir / "docker.sock"
    @property
    def agent_log(self) -> Path: return self.dir / "agent.log"
    @property
    def docker_log(self) -> Path: return self.dir / "docker.log"
    @property
    def console_log(self) -> Path: return self.dir / "console.log"
    @property
    def init_log(self) -> Path: return self.dir / "init.log"
    @property
    def timeline_file(self) -> Path: return self.dir / "boot-timeline.json"
    @property
    def failure_file(self) -> Path: return self.dir / "failure.json"  # why it ended; the agent writes it
    @property
    def pending_resize_file(self) -> Path: return self.dir / "pending-resize.json"
    @property
    def secret_file(self) -> Path: return self.dir / "secret"
    @property
    def data_disk(self) -> Path: return self.dir / "data.img"
    @property
    def backend_dir(self) -> Path: return self.dir / "backend"

    # -- liveness
    def agent_pid(self) -> int | None:
        """The agent's pid, if the pid file names a live boxpark agent process."""
        try:
            pid = int(self.agent_pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _is_agent(pid, self.name) else None

    def control_answers(self, timeout: float = 2.0) -> bool:
        sock = _unix_socket(AF_UNIX, SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.agent_socket))
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def running(self) -> bool:
        return self.agent_pid() is not None and self.control_answers()

    def stale(self) -> bool:
        """Files of an agent that is gone."""
        return not self.running() and any(p.exists() for p in (self.agent_pid_file, self.agent_socket,
                                                                  self.api_socket, self.docker_socket))

    def clean(self) -> list[str]:
        """Remove what a dead agent left behind; return what was done, for the log."""
        import signal

        done = []
        pid = self.agent_pid()
        if pid is not None:  # alive but not answering: hung; stop it
            os.kill(pid, signal.SIGKILL)
            done.append(f"killed the hung agent (pid {pid})")
        for child in sorted(self.backend_dir.glob("*.pid")) if self.backend_dir.exists() else []:
            done += _kill_recorded(child)
        for path in (self.agent_pid_file, self.agent_socket, self.api_socket, self.docker_socket):
            try:
                path.unlink()
                done.append(f"removed {path.name}")
            except FileNotFoundError:
                pass
        return done

    def request(self, op: str, timeout: float | None = 10.0) -> Iterator[dict[str, Any]]:
        """One request on the agent's control socket; each JSON line it answers. OSError: no agent there."""
        sock = _unix_socket(AF_UNIX, SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(self.agent_socket))
            sock.sendall(json.dumps({"op": op}).encode() + b"\n")
            pending = b""
            while data := sock.recv(65536):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    yield json.loads(line)
            if pending:
                yield json.loads(pending)
        finally:
            sock.close()

    def offline_status(self) -> dict[str, Any]:
        """What `status --json` says of a machine with no agent: stopped, failed (and why) or stale files."""
        info: dict[str, Any] = {"name": self.name, "state": "stopped" if not self.stale() else "dead (stale files)"}
        last = self.read_json(self.timeline_file)
        if last:
            info["last_boot"] = last
        failure = self.read_json(self.failure_file)
        if isinstance(failure, dict) and info["state"] == "stopped":
            info["state"], info["failure"] = "failed", failure.get("reason", "")
        return info

    def write_json(self, path: Path, value: Any) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        os.replace(tmp, path)

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_agent(pid: int, name: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    if not Path("/proc").is_dir():  # macOS: no /proc; trust the pid file and the control socket
        return True
    argv = _cmdline(pid)
    return "agent" in argv and name in argv


def record_pid(path: Path, pid: int, argv0: str) -> None:
    """Record a helper process (QEMU, virtiofsd) so that a later `clean()` can stop it if it outlived us."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid} {argv0}\n")


def _kill_recorded(pid_file: Path) -> list[str]:
    try:
        pid_text, argv0 = pid_file.read_text().split(maxsplit=1)
        pid = int(pid_text)
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return []
    import signal
    import time

    argv = _cmdline(pid)
    done = []
    if argv and os.path.basename(argv[0]) == os.path.basename(argv0.strip()):
        try:
            os.kill(pid, signal.SIGKILL)
            done.append(f"killed the leftover {os.path.basename(argv[0])} (pid {pid})")
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.02)
        except ProcessLookupError:
            pass
    pid_file.unlink(missing_ok=True)
    return done
