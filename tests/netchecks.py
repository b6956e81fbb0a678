"""The end-to-end checks of the guest's network and DNS, shared by the sandbox and vm tiers (each takes an
UpMachine that is up). Only the host's loopback and addresses inside the machine are ever reached: no
check resolves a real name or sends anything past the host."""

from __future__ import annotations

import contextlib
import http.server
import secrets
import threading
from pathlib import Path
from typing import Iterator

from tests.upmachine import IMAGE, UpMachine, load_busybox

HOST_NAME = "host.boxpark.internal"
HOST_ONLY = ("only-the-host-knows.test", "192.0.2.77")  # a name in the agent's hosts file (never contacted)


def host_only_hosts_file(tmp: Path) -> Path:
    """The extra hosts file the agent's resolver reads (`[dns] hosts_file`): the machine's /etc/hosts is
    never touched."""
    path = tmp / "hosts"
    path.write_text(f"{HOST_ONLY[1]} {HOST_ONLY[0]}\n")
    return path


@contextlib.contextmanager
def host_http_server(body: bytes) -> Iterator[int]:
    """An HTTP server on the host's 127.0.0.1 (slirp and QEMU map the guest's 10.0.2.2 to it) serving
    `body` at /x; yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path != "/x":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def user_network(m: UpMachine, name: str) -> Iterator[str]:
    """A user-defined bridge network (containers there resolve through Docker's embedded DNS)."""
    created = m.docker("network", "create", name)
    assert created.returncode == 0, created.stderr
    try:
        yield name
    finally:
        m.docker("network", "rm", name)


def container_reaches_host_by_name(m: UpMachine, tmp: Path, network: str | None = None) -> None:
    """A container resolves host.boxpark.internal (through the guest's forwarder: the container has no
    /etc/hosts line for it) and fetches a file from a server the test runs on the host's loopback."""
    load_busybox(m, tmp)
    body = f"from the host {secrets.token_hex(4)}\n".encode()
    with host_http_server(body) as port:
        # nc, not wget: busybox-static's wget crashes (SIGSEGV) in a root without glibc's NSS modules
        script = (f"busybox nslookup {HOST_NAME} >&2 && "
                  f"printf 'GET /x HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 20 {HOST_NAME} {port}")
        run = m.docker("run", "--rm", *(["--network", network] if network else []), IMAGE, "sh", "-c", script,
                       timeout=120)
        assert run.returncode == 0, f"{run.stderr}\n{run.stdout}"
        assert run.stdout.startswith("HTTP/1.0 200") and run.stdout.endswith("\n\n" + body.decode()), run.stdout
        assert "10.0.2.2" in run.stderr, run.stderr  # nslookup's answer


def container_resolves_host_only_name(m: UpMachine, tmp: Path, network: str | None = None) -> None:
    """A name only the host's resolution has (the agent's hosts file) resolves in a container, through the
    guest's forwarder and the agent; host.boxpark.internal still does, and so does the name in the guest."""
    load_busybox(m, tmp)
    name, address = HOST_ONLY
    script = f"busybox nslookup {name} && busybox nslookup {HOST_NAME}"
    run = m.docker("run", "--rm", *(["--network", network] if network else []), IMAGE, "sh", "-c", script,
                   timeout=120)
    assert run.returncode == 0, f"{run.stderr}\n{run.stdout}"
    assert address in run.stdout and "10.0.2.2" in run.stdout, run.stdout
    looked_up = m.cli("exec", "--", "python3", "-c", f"import socket; print(socket.gethostbyname({name!r}))")
    assert looked_up.returncode == 0 and looked_up.stdout.strip() == address, looked_up.stderr


def guest_resolves_host_name(m: UpMachine) -> None:
    """In the guest itself: resolv.conf names the forwarder on eth0's address (not loopback, which Docker
    would drop from containers' resolv.conf), and host.boxpark.internal is the gateway."""
    resolv = m.cli("exec", "--", "cat", "/etc/resolv.conf")
    assert resolv.returncode == 0, resolv.stderr
    servers = [line.split()[1] for line in resolv.stdout.splitlines() if line.startswith("nameserver ")]
    assert len(servers) == 1 and servers[0].startswith("10.0.2.") and servers[0] != "10.0.2.3", resolv.stdout
    looked_up = m.cli("exec", "--", "python3", "-c",
                      f"import socket; print(socket.gethostbyname({HOST_NAME!r}))")
    assert looked_up.returncode == 0 and looked_up.stdout.strip() == "10.0.2.2", looked_up.stderr
