"""End-to-end checks of the home share, the proxies and the extra CA certificates (issue 6, items 2 and 4).

Each check takes an UpMachine that is up and the few facts it needs (the shared home, the proxy, the CA), so
the lead can run them on any machine of a tier. The helpers that make those facts (a throwaway CA, a
recording proxy, a TLS server) live here too; each is a context manager that leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tests.servers import serving
from tests.upmachine import IMAGE, UpMachine, load_busybox

GUEST_SEES_HOST = "10.0.2.2"  # the host's loopback as the guest reaches it (QEMU user networking, slirp4netns)


# ------------------------------------------------------------------------------------ the home share


def home_share_write(m: UpMachine, home: Path, owner: tuple[int, int], tmp: Path) -> None:
    """`docker run -v "$PWD":/w` from a directory under the shared home writes through to the host.

    `owner` is the (uid, gid) the backend documents for files a container's root creates on the share.
    """
    load_busybox(m, tmp)
    project = home / "src" / "project"
    project.mkdir(parents=True, exist_ok=True)
    (project / "from-host").write_text("host\n")
    user = home.stat()
    for path in (home / "src", project, project / "from-host"):  # made by the home's owner, as a user would
        os.chown(path, user.st_uid, user.st_gid)
    command = (f"docker -H {shlex.quote(m.docker_host)} run --rm -v \"$PWD\":/w {IMAGE} "
               f"sh -c 'cat /w/from-host; echo x > /w/f'")
    ran = subprocess.run(command, shell=True, cwd=project, capture_output=True, text=True, timeout=180)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "host\n"  # the container sees the host's file ...
    made = project / "f"
    assert made.read_text() == "x\n"  # ... and the host sees the container's
    info = made.stat()
    assert (info.st_uid, info.st_gid) == owner, f"f belongs to {info.st_uid}:{info.st_gid}, expected {owner}"


def home_share_others_files(m: UpMachine, home: Path, tmp: Path) -> None:
    """On a share where the guest's root acts as the owner, the owner's files look like root's, and a file
    of someone else (here the host's root) is only as open as its permissions are to anyone."""
    load_busybox(m, tmp)
    theirs = home / "roots-file"
    theirs.write_text("root's\n")
    theirs.chmod(0o644)
    os.chown(theirs, 0, 0)
    mine = home / "users-file"
    mine.write_text("mine\n")
    user = home.stat()
    os.chown(mine, user.st_uid, user.st_gid)
    ran = m.docker("run", "--rm", "-v", f"{home}:/w", IMAGE, "sh", "-c",
                   "stat -c %u /w/users-file /w/roots-file; cat /w/roots-file; "
                   "echo more >> /w/users-file && echo appended; echo x > /w/roots-file || echo refused")
    lines = ran.stdout.splitlines()
    assert ran.returncode == 0 and lines[:2] == ["0", "65534"], (ran.stdout, ran.stderr)
    assert lines[2:] == ["root's", "appended", "refused"], (ran.stdout, ran.stderr)
    assert theirs.read_text() == "root's\n" and mine.read_text() == "mine\nmore\n"


def home_share_read_only(m: UpMachine, home: Path, tmp: Path) -> None:
    """`[home] read_only = true`: a container reads the home and cannot write it; the host's files stay."""
    load_busybox(m, tmp)
    (home / "notes").write_text("kept\n")
    ran = m.docker("run", "--rm", "-v", f"{home}:/w", IMAGE, "sh", "-c",
                   "cat /w/notes; echo x > /w/notes || echo refused; echo y > /w/new || echo refused")
    assert ran.stdout.splitlines() == ["kept", "refused", "refused"], (ran.stdout, ran.stderr)
    assert "Read-only file system" in ran.stderr, ran.stderr
    assert (home / "notes").read_text() == "kept\n" and not (home / "new").exists()


def home_not_shared(m: UpMachine, home: Path) -> None:
    """`[home] share = false`: nothing of the home reaches the guest (its path there is no mount)."""
    (home / "secret-of-the-host").write_text("no\n")
    mounts = m.cli("exec", "--", "cat", "/proc/self/mountinfo")
    assert mounts.returncode == 0, mounts.stderr
    assert f" {home} " not in mounts.stdout, mounts.stdout
    looked = m.cli("exec", "--", "ls", str(home / "secret-of-the-host"))
    assert looked.returncode != 0, looked.stdout


# ------------------------------------------------------------------------------------ proxies


def dockerd_environment(m: UpMachine) -> dict[str, str]:
    """dockerd's environment in the guest (its /proc/PID/environ)."""
    script = ('for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = dockerd ] && '
              'tr "\\0" "\\n" < $p/environ; done; true')
    ran = m.cli("exec", "--", "sh", "-c", script)
    assert ran.returncode == 0 and ran.stdout, ran.stderr
    return dict(line.split("=", 1) for line in ran.stdout.splitlines() if "=" in line)


def dockerd_has_proxies(m: UpMachine, expected: dict[str, str]) -> None:
    env = dockerd_environment(m)
    for key, value in expected.items():
        assert env.get(key) == value and env.get(key.lower()) == value, (key, env)
    assert "PATH" in env or "HOME" in env, env  # the init's own environment is kept underneath


@dataclass
class RecordingProxy:
    """An HTTP proxy on 127.0.0.1 that records each request line and refuses it (403): nothing goes out."""

    port: int = 0
    requests: list[str] = field(default_factory=list)
    seen: threading.Event = field(default_factory=threading.Event)


@contextlib.contextmanager
def recording_proxy() -> Iterator[RecordingProxy]:
    proxy = RecordingProxy()

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            if data:
                proxy.requests.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
                proxy.seen.set()
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    with serving(handle) as proxy.port:
        yield proxy


def pull_goes_through_the_proxy(m: UpMachine, proxy: RecordingProxy) -> None:
    """A pull from a made-up registry (an IP literal in the guest's own network: no DNS lookup) is sent
    to HTTPS_PROXY: the proxy sees the CONNECT, refuses it, and the pull fails."""
    registry = f"{GUEST_SEES_HOST}:5999"
    pulled = m.docker("pull", f"{registry}/boxpark-test/nothing:1", timeout=120)
    assert pulled.returncode != 0
    assert proxy.seen.wait(60), f"the proxy saw nothing; docker said: {pulled.stderr}"
    assert any(line.startswith(f"CONNECT {registry} ") for line in proxy.requests), proxy.requests


# ------------------------------------------------------------------------------------ CA certificates


@dataclass
class TestCA:
    """A throwaway CA and a server certificate it signed (for localhost, 127.0.0.1 and 10.0.2.2)."""

    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path  # an unrelated CA, never configured: its server certificate must be refused


def make_ca(directory: Path) -> TestCA:
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        ran = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr

    for name in ("ca", "other"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                "-subj", f"/CN=Boxpark test {name} CA", "-keyout", f"{name}.key", "-out", f"{name}.pem")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server.key", "-out", "server.csr")
    (directory / "ext.cnf").write_text(f"subjectAltName=DNS:localhost,IP:127.0.0.1,IP:{GUEST_SEES_HOST}\n"
                                       "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    return TestCA(directory / "ca.pem", directory / "server.pem", directory / "server.key", directory / "other.pem")


def ca_in_the_guest_bundle(m: UpMachine, ca: TestCA) -> None:
    bundle = m.cli("exec", "--", "cat", "/etc/ssl/certs/ca-certificates.crt")
    assert bundle.returncode == 0, bundle.stderr
    assert ca.ca.read_text().strip() in bundle.stdout
    assert ca.other_ca.read_text().strip() not in bundle.stdout
    assert bundle.stdout.count("BEGIN CERTIFICATE") > 50  # Debian's roots are still there


@contextlib.contextmanager
def tls_server(ca: TestCA) -> Iterator[int]:
    """A TLS server on the host's 127.0.0.1 with the CA's server certificate; yields its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca.server_cert, ca.server_key)

    def handle(conn: socket.socket) -> None:
        with conn, contextlib.suppress(ssl.SSLError):
            conn.settimeout(10)
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello over tls\n")

    with serving(handle) as port:
        yield port


# The guest's python3 with the default context (the system's trust store), against a server it is told of;
# with SERVE set, it first runs that server itself (on its loopback) from the certificate and key on stdin.
_HANDSHAKE = """
import os, socket, ssl, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
if os.environ.get("SERVE"):
    with open("/tmp/boxpark-test-server.pem", "w") as f:
        f.write(sys.stdin.read())
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain("/tmp/boxpark-test-server.pem")
    listener = socket.create_server((host, 0))
    port = listener.getsockname()[1]
    def serve():
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello over tls\\n")
        except (OSError, ssl.SSLError):
            pass
    threading.Thread(target=serve, daemon=True).start()
context = ssl.create_default_context()
try:
    with context.wrap_socket(socket.create_connection((host, port), timeout=20), server_hostname=host) as tls:
        print(tls.version(), tls.recv(100).decode().strip())
except ssl.SSLCertVerificationError as exc:
    print("refused:", exc.verify_message)
"""


def guest_handshake(m: UpMachine, host: str, port: int, serve_pem: str = "") -> str:
    """What the guest's python3 says after a TLS handshake with the default context: "TLSv1.3 hello ..."
    or "refused: ..."; with `serve_pem` (a certificate and its key) it serves that on its own loopback."""
    argv = ["exec", "-i", "--", "env", *(["SERVE=1"] if serve_pem else []), "python3", "-c", _HANDSHAKE,
            host, str(port)]
    ran = m.cli(*argv, input=serve_pem)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout.strip()


def tls_from_the_guest_trusts_the_ca(m: UpMachine, ca: TestCA, host_port: int | None) -> None:
    """The guest's default TLS context accepts a server certificate signed by the configured CA and refuses
    one signed by an unconfigured CA. With `host_port`, the trusted server is the test's, on the host's
    loopback (reached at 10.0.2.2); without (no network to the host), the guest serves it on its own."""
    pem = ca.server_cert.read_text() + ca.server_key.read_text()
    if host_port is not None:
        said = guest_handshake(m, GUEST_SEES_HOST, host_port)
    else:
        said = guest_handshake(m, "127.0.0.1", 0, serve_pem=pem)
    assert said.startswith("TLS") and said.endswith("hello over tls"), said
    untrusted = make_untrusted_server(ca)
    refused = guest_handshake(m, "127.0.0.1", 0, serve_pem=untrusted)
    assert refused.startswith("refused:"), refused


def make_untrusted_server(ca: TestCA) -> str:
    """A server certificate (and key) for 127.0.0.1 signed by the unconfigured CA, as one PEM text."""
    directory = ca.other_ca.parent
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/CN=localhost", "-keyout", "untrusted.key", "-out", "untrusted.csr"],
                   cwd=directory, check=True, capture_output=True, timeout=60)
    subprocess.run(["openssl", "x509", "-req", "-in", "untrusted.csr", "-CA", "other.pem", "-CAkey", "other.key",
                    "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "untrusted.pem"],
                   cwd=directory, check=True, capture_output=True, timeout=60)
    return (directory / "untrusted.pem").read_text() + (directory / "untrusted.key").read_text()
