"""Streams into a sandbox's guest opened straight from the host, without the Guest API.

The sandbox's guest is a process tree on this kernel, so what a `Connect` names (a unix socket in the
guest, a TCP port on the guest's loopback) can be reached from the host itself: a unix socket under the
guest's root and a TCP socket made in the guest's network namespace. That saves, on every docker.sock and
published-port connection, the API handshake, the call, and the guest's own relay (its event loop and two
splice threads: a second copy of every byte). Measured in `bench/sandbox_connect.py`.

What it must never do: follow a guest's symlink to a host path (paths resolve with openat2's
RESOLVE_IN_ROOT, inside the guest's root), or leave the calling thread — a shared relay thread — in the
guest's network namespace (it switches back at once, and a thread that cannot is worse than a dead agent).
UDP (the guest frames datagrams) and host names (the guest's resolver decides) keep going through the API.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading

from ... import protocol

log = logging.getLogger("boxpark.host.sandbox")

CLONE_NEWNET = 0x40000000
_SYS_OPENAT2 = 437  # the same on x86_64 and arm64 (the generic table)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_IN_ROOT = 0x02, 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def _openat2_in_root(root: int, path: str) -> int:
    """An O_PATH fd of `path` resolved as if `root` were `/` (absolute symlinks and `..` stay inside)."""
    how = _OpenHow(flags=os.O_PATH | os.O_CLOEXEC, mode=0, resolve=_RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root), os.fsencode(path),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"connect {path}: {os.strerror(err)}")
    return int(fd)


def _setns(fd: int) -> None:
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(CLONE_NEWNET)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class GuestDialer:
    """Direct streams into a guest whose root is the directory `root` and whose network namespace is the
    file `net` (both held open from here on): for a sandbox, `GuestDialer.of(init_pid)`."""

    def __init__(self, root: str, net: str) -> None:
        self._root = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._guest_net = os.open(net, os.O_RDONLY | os.O_CLOEXEC)
            self._own_net = os.open(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net",
                                    os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self._root)
            raise

    @classmethod
    def of(cls, init_pid: int) -> GuestDialer:
        """The dialer of the sandbox whose PID 1 has the host pid `init_pid`."""
        return cls(f"/proc/{init_pid}/root", f"/proc/{init_pid}/ns/net")

    @staticmethod
    def handles(request: protocol.Connect) -> bool:
        """Whether `connect` can serve `request` (a stream to a path, or to a literal address's TCP port)."""
        if request.udp:
            return False
        if request.path is not None:
            return True
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in request.host else socket.AF_INET, request.host)
            return request.port is not None
        except OSError:
            return False

    def connect(self, request: protocol.Connect) -> socket.socket:
        """A blocking stream to what `request` names in the guest; OSError if it cannot be had."""
        if request.path is not None:
            return self._unix(request.path, request.timeout)
        assert request.port is not None
        family = socket.AF_INET6 if ":" in request.host else socket.AF_INET
        sock = self._guest_socket(family)
        try:
            sock.settimeout(request.timeout)
            sock.connect((request.host, request.port))
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return sock

    def _unix(self, path: str, timeout: float) -> socket.socket:
        target = _openat2_in_root(self._root, path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(f"/proc/self/fd/{target}")  # the socket's inode, found inside the guest's root
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(target)
        return sock

    def _guest_socket(self, family: int) -> socket.socket:
        """A socket of the guest's network namespace: made while this thread is there, which it leaves at once."""
        _setns(self._guest_net)
        try:
            return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        finally:
            try:
                _setns(self._own_net)
            except OSError as exc:  # this thread would make the host's sockets in the guest from now on
                log.critical("cannot leave the sandbox's network namespace (%s); stopping the agent", exc)
                os._exit(70)

    def close(self) -> None:
        for fd in (self._root, self._guest_net, self._own_net):
            os.close(fd)
