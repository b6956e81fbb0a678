"""Private mount namespaces, disk images and loop devices for tests that must touch real mounts and disks.

    with short_tmpdir() as tmp:                         # /tmp/bp-XXXX: unix socket paths stay short
        make_image(f"{tmp}/disk.img", 400 * MiB, partitions=[16 * MiB, None])   # sparse file + gpt table
        with loop_device(f"{tmp}/disk.img") as loop:    # losetup --partscan; always detached after
            mkfs(loop.partition(2), "ext4")
            with guest_namespace(tmp) as ns:            # a Guest API server in its own mount namespace
                ns.address                              # "unix:/tmp/bp-XXXX/api.sock"
                ns.run(["df", "-B1", "/mnt/x"])         # any command in the same namespace
        # leaving: every process in the namespace is killed by PID, then the loop device is detached

What a test mounts in the namespace stays there (`unshare --mount --propagation private`) and goes away
with it. The server runs with CAP_SYS_TIME and CAP_SYS_BOOT dropped from its bounding set, so not even
a bug can set this host's clock or power it off. Needs root, `unshare`, `nsenter`, `setpriv`, `losetup`,
`sfdisk`.

The API:
- `guest_namespace(tmp, uts=False, argv=None)` → `Namespace`: `.address`, `.pid`, `.run(argv)`,
  `.spawn(argv)` (killed with it), `.argv(argv)` (wrapped in nsenter), `.mounts()`, `.server_log()`,
  `.close()`; with `argv` any command instead of the server.
- `run_in_namespace(argv, uts=False)`: one command in a fresh namespace; `python_argv(code, *args)` makes
  a `python -c` command line with the repository importable; `namespace_argv(argv)` just wraps.
- `make_image(path, size, partitions=[bytes or None…], label="gpt"|"dos")`, `grow_image(path, size)`,
  `mkfs(device_or_file, "ext4"|"xfs"|…)`.
- `loop_device(image)` → `LoopDevice`: `.path`, `.partition(n)`, `.refresh()` (losetup -c), `.size(dev)`.
- `dockerd(ns, notify_socket=None)` → `Dockerd`: `.pid`, `.socket`, `.root`; a real dockerd in `ns`.
- pytest fixtures (registered in conftest.py): `short_tmp` (a short temp dir) and `guest_ns` (a
  namespace server in it); `requires_root` marks tests that need root.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest

MiB = 1024 * 1024
REPO = str(Path(__file__).resolve().parent.parent)
PYTHON = sys.executable  # an absolute interpreter: a pyenv shim would fork dozens of helpers
DROPPED_CAPS = "-sys_time,-sys_boot"

_loops: set[str] = set()  # every loop device attached by this process, detached at exit at the latest


def is_root() -> bool:
    return os.geteuid() == 0


requires_root = pytest.mark.skipif(not is_root(), reason="needs root (mount namespaces, loop devices)")


def sh(argv: Sequence[str], *, check: bool = True, input: bytes | None = None,
       timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a helper command; on failure raise with its stderr in the message."""
    result = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout)
    out = subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                      result.stderr.decode(errors="replace"))
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
    return out


@contextlib.contextmanager
def short_tmpdir(prefix: str = "bp-") -> Iterator[str]:
    """A fresh directory under /tmp with a short name (unix socket paths must stay under 108 bytes)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------ disk images


def make_image(path: str, size: int, partitions: Sequence[int | None] | None = None, label: str = "gpt") -> str:
    """A sparse file of `size` bytes; with `partitions` (sizes in bytes, None = the rest) a partition table.

    The partitions are Linux filesystem partitions numbered from 1 in order.
    """
    with open(path, "wb") as f:
        f.truncate(size)
    if partitions is not None:
        lines = [f"label: {label}"]
        for part in partitions:
            kind = "L" if label == "gpt" else "83"
            lines.append(f",{part // 512 if part else ''},{kind}")
        sh(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", path], input="\n".join(lines).encode() + b"\n")
    return path


def grow_image(path: str, size: int) -> None:
    """Make the image file `size` bytes long (sparse); refresh an attached loop device with `.refresh()`."""
    with open(path, "r+b") as f:
        f.truncate(size)


def mkfs(device: str, fstype: str, label: str | None = None) -> None:
    """Make an ext2/3/4 or xfs filesystem on a device or image file (quietly, overwriting)."""
    if fstype.startswith("ext"):
        argv = [f"mkfs.{fstype}", "-q", "-F"] + (["-L", label] if label else [])
    elif fstype == "xfs":
        argv = ["mkfs.xfs", "-q", "-f"] + (["-L", label] if label else [])
    else:
        argv = [f"mkfs.{fstype}"]
    sh(argv + [device])


@dataclass
class LoopDevice:
    """An attached loop device: `path` (/dev/loopN), its partitions' nodes, and `refresh()` after growing."""

    path: str
    image: str

    def partition(self, number: int) -> str:
        return f"{self.path}p{number}"

    def refresh(self) -> None:
        """Tell the loop driver the backing file changed size (`losetup -c`); partitions are not touched."""
        sh(["losetup", "--set-capacity", self.path])

    def size(self, device: str | None = None) -> int:
        return int(sh(["blockdev", "--getsize64", device or self.path]).stdout)


def _trailing_number(node: str) -> int:
    digits = ""
    for ch in reversed(node):
        if not ch.isdigit():
            break
        digits = ch + digits
    return int(digits)


@contextlib.contextmanager
def loop_device(image: str) -> Iterator[LoopDevice]:
    """Attach `image` to a free loop device with partition scanning; detach it on the way out, always.

    A kernel without a parser for the table's label (this build machine has none at all) shows no
    partitions after `--partscan`, so missing ones are added with `partx --add` (BLKPG), as a guest would.
    """
    path = sh(["losetup", "--find", "--show", "--partscan", image]).stdout.strip()
    _loops.add(path)
    try:
        loop = LoopDevice(path, image)
        out = sh(["sfdisk", "--json", image], check=False)
        if out.returncode == 0:
            entries = json.loads(out.stdout)["partitiontable"].get("partitions", [])
            missing = [n for n in (_trailing_number(e["node"]) for e in entries)
                       if not os.path.exists(loop.partition(n))]
            if missing:
                sh(["partx", "--add", path])
            _wait_for(lambda: all(os.path.exists(loop.partition(n)) for n in missing), 5.0,
                      f"partitions {missing} of {path}")
        yield loop
    finally:
        detach_loop(path)


def detach_loop(path: str) -> None:
    """Detach a loop device (still in use: the kernel detaches it when its last user lets go)."""
    sh(["losetup", "--detach", path], check=False)
    _loops.discard(path)


@atexit.register
def _detach_leftovers() -> None:
    for path in list(_loops):
        detach_loop(path)


def _wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------------------------------ namespaces


def _ns_inode(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def _pids_in(ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Namespace:
    """A process in a private mount namespace (a Guest API server unless told otherwise)."""

    process: subprocess.Popen[bytes]
    tmp: str
    address: str
    log: str
    ns: str = ""
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def socket_path(self) -> str:
        return self.address.removeprefix("unix:")

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run in this namespace (nsenter execs it: its pid is the command's)."""
        return ["nsenter", f"--target={self.pid}", "--mount", "--"] + list(argv)

    def run(self, argv: Sequence[str], *, check: bool = True, input: bytes | None = None,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in this namespace."""
        return sh(self.argv(argv), check=check, input=input, timeout=timeout)

    def spawn(self, argv: Sequence[str], **popen: object) -> subprocess.Popen[bytes]:
        """Start a long-running command in this namespace; it is killed (by PID) with the namespace."""
        process = subprocess.Popen(self.argv(argv), **popen)  # type: ignore[call-overload]
        self.extra.append(process)
        return process

    def mounts(self) -> str:
        with open(f"/proc/{self.pid}/mountinfo") as f:
            return f.read()

    def server_log(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def close(self, grace: float = 10.0) -> None:
        """SIGTERM the server, then SIGKILL every process left in the namespace; all by PID."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for process in self.extra:
            if process.poll() is None:
                process.kill()
            process.wait()
        if self.ns:
            deadline = time.monotonic() + grace
            while (left := [pid for pid in _pids_in(self.ns) if _alive(pid)]) and time.monotonic() < deadline:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)


def namespace_argv(argv: Sequence[str], *, uts: bool = False) -> list[str]:
    """`argv` wrapped to run in a new private mount (and UTS) namespace without CAP_SYS_TIME/CAP_SYS_BOOT."""
    unshare = ["unshare", "--mount", "--propagation", "private"] + (["--uts"] if uts else [])
    setpriv = ["setpriv", f"--bounding-set={DROPPED_CAPS}", f"--inh-caps={DROPPED_CAPS}"]
    return unshare + ["--"] + setpriv + ["--"] + list(argv)


def run_in_namespace(argv: Sequence[str], *, uts: bool = False, input: bytes | None = None,
                     check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run one command to completion in a fresh private mount (and UTS) namespace."""
    return sh(namespace_argv(argv, uts=uts), input=input, check=check, timeout=timeout)


def python_argv(code: str, *args: str) -> list[str]:
    """`python -c code args…` with the repository importable (for `run_in_namespace` or `Namespace.run`)."""
    return [PYTHON, "-c", f"import sys; sys.path.insert(0, {REPO!r})\n{code}", *args]


@contextlib.contextmanager
def guest_namespace(tmp: str, *, uts: bool = False, argv: Sequence[str] | None = None,
                    timeout: float = 20.0) -> Iterator[Namespace]:
    """A Guest API server (`boxpark guest serve`) in a private mount namespace, listening in `tmp`.

    With `argv` it runs that command instead (the address is then just the one it was told to use,
    `unix:{tmp}/api.sock`, and readiness is waited for only if that socket appears). The server's own
    log goes to `{tmp}/server.log`; it is printed if the server does not come up.
    """
    path = f"{tmp}/api.sock"
    if len(path.encode()) > 107:
        raise ValueError(f"{path} is too long for a unix socket: use short_tmpdir()")
    log = f"{tmp}/server.log"
    command = list(argv) if argv is not None else python_argv(
        "from boxpark.cli import main; sys.exit(main(['guest', 'serve', '--listen', 'unix:' + sys.argv[1]]))", path)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "ab") as out:
        process = subprocess.Popen(namespace_argv(command, uts=uts), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    ns = Namespace(process, tmp, f"unix:{path}", log)
    try:
        # unshare and setpriv exec the command, so the child's pid ends up in the new namespace
        _wait_for(lambda: process.poll() is not None or _ns_inode(process.pid) != _ns_inode(os.getpid()),
                  timeout, "the namespace")
        if process.poll() is None:
            ns.ns = _ns_inode(process.pid)
        if argv is None:
            _wait_for(lambda: process.poll() is not None or _connectable(path), timeout, f"the server on {path}")
            if process.poll() is not None:
                raise RuntimeError(f"the namespace server exited {process.returncode}:\n{ns.server_log()}")
        yield ns
    finally:
        ns.close()


def _connectable(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


# ------------------------------------------------------------------------------------------ dockerd


@dataclass
class Dockerd:
    process: subprocess.Popen[bytes]
    socket: str
    root: str

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def dockerd(ns: Namespace, *, notify_socket: str | None = None, name: str = "d") -> Iterator[Dockerd]:
    """A real dockerd with private dirs under the namespace's tmp, run inside the namespace.

    Its own config file (empty) keeps the host's /etc/docker out; no bridge, no iptables. Stopped with
    SIGTERM by PID (it stops its containerd), anything left in its dirs removed after.
    """
    root = f"{ns.tmp}/{name}"
    os.makedirs(root, exist_ok=True)
    with open(f"{root}/daemon.json", "w") as f:
        f.write("{}\n")
    sock = f"{root}/docker.sock"
    argv = ["dockerd", "--config-file", f"{root}/daemon.json", "--data-root", f"{root}/data",
            "--exec-root", f"{root}/exec", "--host", f"unix://{sock}", "--pidfile", f"{root}/docker.pid",
            "--bridge=none", "--iptables=false", "--ip-masq=false"]
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    if notify_socket:
        env["NOTIFY_SOCKET"] = notify_socket
    with open(f"{root}/dockerd.log", "ab") as log:
        process = ns.spawn(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield Dockerd(process, sock, root)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ------------------------------------------------------------------------------------ pytest fixtures


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short temporary directory under /tmp, removed after the test."""
    with short_tmpdir() as path:
        yield path


@pytest.fixture
def guest_ns(short_tmp: str) -> Iterator[Namespace]:
    """A Guest API server in a private mount namespace (root only), cleaned up after the test."""
    if not is_root():
        pytest.skip("needs root (mount namespaces)")
    with guest_namespace(short_tmp) as ns:
        yield ns
