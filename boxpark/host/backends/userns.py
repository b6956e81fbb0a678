"""User namespaces that map one host user: how a share acts as its owner (qemu's virtiofsd, the sandbox's
idmapped binds). Made with util-linux's `unshare`, kept by an fd, never entered by this process."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from typing import Iterator

from .base import BackendError


@contextlib.contextmanager
def owner_namespace(uid: int, gid: int, *, idmap: bool = False) -> Iterator[int]:
    """A fresh user namespace whose root is host uid:gid (and nobody else); yields an fd of it (O_RDONLY).

    With `idmap` it is the other way round, as an idmapped mount wants it (the kernel maps the filesystem's
    ids into the namespace): its uid:gid is the host's root, so the mount shows uid:gid's files as root's.

    A helper (`unshare --user cat`) makes it; we write its uid/gid maps from here (root in the parent
    namespace may map any id), keep the namespace by the fd, and end the helper. What enters it (qemu:
    virtiofsd under nsenter) or a mount idmapped with it (the sandbox) acts as uid:gid: files are created as
    uid:gid, files of uid:gid can be changed, others only as their permissions allow anyone, and no other
    guest id can be written as.
    """
    helper = subprocess.Popen([shutil.which("unshare") or "unshare", "--user", "--", "cat"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fd = -1
    try:
        ours = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{helper.pid}/ns/user") == ours:  # until it has unshared
            if helper.poll() is not None or time.monotonic() > deadline:
                raise BackendError("cannot make a user namespace for an owner-mapped share (unshare --user failed)")
            time.sleep(0.001)
        fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        for name, value in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{helper.pid}/{name}", "w") as f:
                f.write(f"{value} 0 1\n" if idmap else f"0 {value} 1\n")
    except OSError as exc:
        raise BackendError(f"cannot make a user namespace for an owner-mapped share: {exc}") from None
    finally:
        assert helper.stdin is not None
        helper.stdin.close()  # cat ends; the namespace lives on while fd (and then virtiofsd) holds it
        try:
            helper.wait(5)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
    try:
        yield fd
    finally:
        os.close(fd)
