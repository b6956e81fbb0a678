"""The sandbox's direct streams (`sandboxdial.GuestDialer`) against a real network namespace and a real tree.

A server runs in a network namespace of its own (`unshare --net`, loopback up) and answers on TCP; a
directory stands for the guest's root. What must hold: TCP reaches the namespace's listener, not the
host's on the same port; the calling thread is back in its own namespace after; a path resolves inside
the root, so a guest's absolute symlink never reaches a host socket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from boxpark import protocol
from boxpark.host.backends.sandboxdial import GuestDialer

from ..nsfixture import requires_root

pytestmark = [pytest.mark.integration, requires_root]

DEADLINE = 60.0
SERVER = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
print("up", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"guest"); c.close()
"""


def answer(sock: socket.socket) -> bytes:
    with sock:
        sock.settimeout(DEADLINE)
        data = b""
        while chunk := sock.recv(64):
            data += chunk
        return data


@pytest.fixture
def netns_server() -> Iterator[tuple[int, int]]:
    """(pid of a process in a fresh network namespace, the port its server answers "guest" on)."""
    with socket.socket() as probe:  # a port free on the host too: the host's listener takes it below
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(["unshare", "--net", "sh", "-c", f'ip link set lo up && exec "$0" -c "$1" {port}',
                                sys.executable, SERVER], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"up\n"
        yield process.pid, port
    finally:
        process.kill()
        process.wait()


def test_tcp_reaches_the_guests_listener_and_the_thread_comes_back(netns_server: tuple[int, int],
                                                                   tmp_path: Path) -> None:
    pid, port = netns_server
    own = os.readlink("/proc/thread-self/ns/net")
    dialer = GuestDialer(str(tmp_path), f"/proc/{pid}/ns/net")
    with socket.create_server(("127.0.0.1", port)) as host_listener:  # the host's own listener, same port
        def host_serve() -> None:
            with host_listener.accept()[0] as c:
                c.sendall(b"host")
        threading.Thread(target=host_serve, daemon=True).start()
        try:
            assert answer(dialer.connect(protocol.Connect(port=port))) == b"guest"
            assert os.readlink("/proc/thread-self/ns/net") == own
            assert answer(socket.create_connection(("127.0.0.1", port))) == b"host"
        finally:
            dialer.close()


def test_paths_resolve_inside_the_root(tmp_path: Path) -> None:
    root, host = tmp_path / "root", tmp_path / "host"
    (root / "run").mkdir(parents=True)
    host.mkdir()
    listeners = []
    for where, name in ((root / "run", "guest"), (host, "host")):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(where / "s.sock"))
        listener.listen(8)
        listeners.append((listener, name))

    def serve(listener: socket.socket, name: str) -> None:
        while True:
            try:
                c, _ = listener.accept()
            except OSError:
                return
            with c:
                c.sendall(name.encode())
    for listener, name in listeners:
        threading.Thread(target=serve, args=(listener, name), daemon=True).start()
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # the guest's /var/run → its own /run
    (root / "escape").symlink_to(str(host))  # absolute: on the host this would be the host's directory
    (root / "up").symlink_to("../../host")  # and `..` past the root
    dialer = GuestDialer(str(root), f"/proc/{os.getpid()}/ns/net")
    try:
        assert answer(dialer.connect(protocol.Connect(path="/var/run/s.sock"))) == b"guest"
        for path in ("/escape/s.sock", "/up/s.sock"):
            with pytest.raises(FileNotFoundError):
                dialer.connect(protocol.Connect(path=path))
    finally:
        dialer.close()
        for listener, _ in listeners:
            listener.close()


def test_only_streams_to_paths_and_literal_addresses() -> None:
    assert GuestDialer.handles(protocol.Connect(path="/var/run/docker.sock"))
    assert GuestDialer.handles(protocol.Connect(port=80))
    assert GuestDialer.handles(protocol.Connect(port=80, host="::1"))
    assert not GuestDialer.handles(protocol.Connect(port=53, udp=True))
    assert not GuestDialer.handles(protocol.Connect(port=80, host="localhost"))
