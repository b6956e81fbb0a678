"""virtiofsd, one per directory share: started on a listening socket we made, as the share's owner if any.

A context manager (mkosi's shape): it yields the socket's path for QEMU's vhost-user-fs device and stops
virtiofsd on exit. virtiofsd serves one QEMU and ends with it, so a rebooted guest gets new ones.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Iterator

from ...transport import listen_socket, parse_address
from .base import BackendError
from .userns import owner_namespace

VIRTIOFSD = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")


def installed() -> bool:
    """Whether virtiofsd is on this host (directory shares need it)."""
    return any(os.access(p, os.X_OK) for p in VIRTIOFSD) or shutil.which("virtiofsd") is not None


@contextlib.contextmanager
def virtiofsd(tag: str, source: str, state: Path,
              owner: tuple[int, int] | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """virtiofsd for one share, on a listening socket we made; yields (socket path, process).

    With `owner` (uid, gid), virtiofsd runs in a user namespace where its root is that user: what the guest's
    root creates belongs to the owner on the host (see `owner_namespace`).
    """
    binary = next((p for p in VIRTIOFSD if os.access(p, os.X_OK)), None) or shutil.which("virtiofsd")
    if binary is None:
        raise BackendError("directory shares need virtiofsd (apt-get install qemu-system-common, or virtiofsd)")
    path = str(state / f"fs-{tag}.sock")
    sock = listen_socket(parse_address(f"unix:{path}"))
    sock.setblocking(True)
    logfile = os.open(state / f"virtiofsd-{tag}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    argv = [binary, f"--fd={sock.fileno()}", "-o", f"source={source}", "-o", "cache=auto"]
    fds = [sock.fileno()]
    try:
        with contextlib.ExitStack() as namespace:
            if owner is not None:
                userns = namespace.enter_context(owner_namespace(*owner))
                argv = [_nsenter(), f"--user=/proc/self/fd/{userns}", "--", *argv]
                fds.append(userns)
            process = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile)
    finally:
        os.close(logfile)
        sock.close()
    try:
        yield path, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _nsenter() -> str:
    binary = shutil.which("nsenter")
    if binary is None:
        raise BackendError("mapping the home share to its owner needs nsenter (util-linux)")
    return binary


