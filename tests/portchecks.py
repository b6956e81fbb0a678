"""End-to-end checks of published ports (`docker run -p`), shared by the sandbox and vm tiers.

Each takes a machine that is up (tests/upmachine.py) with the busybox image loaded (`load_busybox`); `net` is
the `docker run` network arguments of the tier (the sandbox's dockerd has no default bridge: a user network);
`base` is the first of the host ports the check publishes (base … base+6): each tier has its own, since host
ports are the whole machine's and tiers may run side by side.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
import urllib.request
from typing import Callable

from tests.upmachine import IMAGE, UpMachine

# A UDP echo server from the guest's own python3 (busybox has none): the guest's /usr mounted read-only.
UDP_ECHO = ("import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.bind(('0.0.0.0', 5353))\n"
            "while True:\n"
            "    data, peer = s.recvfrom(65535)\n"
            "    s.sendto(b'echo:' + data, peer)\n")
GUEST_PYTHON = ["-v", "/usr:/usr:ro", "-v", "/usr/lib:/lib:ro", "-v", "/usr/lib64:/lib64:ro"]


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Poll `check` until true; the seconds it took. Fails naming `what`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def closed(port: int, proto: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, proto) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def run(m: UpMachine, *args: str) -> str:
    result = m.docker("run", "-d", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def httpd(m: UpMachine, net: list[str], name: str, publish: str, *extra: str) -> str:
    return run(m, "--name", name, *net, "-p", publish, *extra, IMAGE, "sh", "-c",
               "busybox mkdir -p /www && echo published > /www/f && exec httpd -f -p 80 -h /www")


def published_tcp_port(m: UpMachine, net: list[str], base: int) -> None:
    """`-p BASE:80` answers on the host; 200 connections at once; closed after `docker stop` (how soon is
    bench's to measure)."""
    httpd(m, net, "web", f"{base}:80")
    wait_for("the published port serving", lambda: fetch(f"http://127.0.0.1:{base}/f") == "published\n", 60)
    forwarded = m.status()["ports"]["forwarded"]
    assert {"proto": "tcp", "host": f"127.0.0.1:{base}", "guest": f"127.0.0.1:{base}", "container": "web"} \
        .items() <= forwarded[0].items(), forwarded

    sockets = [socket.create_connection(("127.0.0.1", base), timeout=60) for _ in range(200)]  # all open at once
    try:
        for s in sockets:
            s.sendall(b"GET /f HTTP/1.0\r\n\r\n")

        def answer(s: socket.socket) -> bytes:
            parts = []
            while data := s.recv(65536):
                parts.append(data)
            return b"".join(parts)

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(answer, sockets))
    finally:
        for s in sockets:
            s.close()
    assert all(a.startswith(b"HTTP/1.") and a.endswith(b"published\n") for a in answers), \
        [a[:80] for a in answers if not a.endswith(b"published\n")][:3]

    stop = m.docker("stop", "-t", "1", "web")
    assert stop.returncode == 0, stop.stderr
    took = wait_for("the host port closed after docker stop", lambda: closed(base), 60)
    print(f"host port closed {took:.3f} s after docker stop returned")
    m.docker("rm", "web")


def published_udp_port(m: UpMachine, net: list[str], base: int) -> None:
    """`-p BASE+6:5353/udp`: datagrams from two host peers each come back to their sender."""
    port = base + 6
    run(m, "--name", "udpecho", *net, "-p", f"{port}:5353/udp", *GUEST_PYTHON, IMAGE, "python3", "-c", UDP_ECHO)
    peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        def answered() -> bool:
            peers[0].settimeout(0.5)
            peers[0].sendto(b"ping", ("127.0.0.1", port))
            try:
                return peers[0].recv(100) == b"echo:ping"
            except TimeoutError:
                return False

        wait_for("the UDP echo through the published port", answered, 60)
        peers[1].settimeout(10)
        peers[1].sendto(b"second", ("127.0.0.1", port))
        assert peers[1].recv(100) == b"echo:second"
    finally:
        for peer in peers:
            peer.close()
    m.docker("rm", "-f", "udpecho")
    wait_for("the UDP port closed after the container went", lambda: not any(
        f["host"] == f"127.0.0.1:{port}" for f in m.status()["ports"]["forwarded"]), 60)


def host_port_in_use_is_reported(m: UpMachine, net: list[str], base: int) -> None:
    """A host port someone else holds: the container runs, `status` says which port and why, no crash."""
    port = base + 2
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()

        def reported() -> bool:
            return any(f"127.0.0.1:{port} for busy: Address already in use" in p
                       for p in m.status()["ports"]["problems"])

        httpd(m, net, "busy", f"{port}:80")
        wait_for("the port-in-use problem in status", reported, 60)
        status = m.cli("status")
        assert f"port NOT forwarded: tcp 127.0.0.1:{port} for busy: Address already in use" in status.stdout
        assert m.status()["state"] == "ready"
        assert f"127.0.0.1:{port}" in (m.dir / "agent.log").read_text()
    m.docker("rm", "-f", "busy")
    wait_for("the problem gone with its container", lambda: not m.status()["ports"]["problems"], 60)


def ports_come_back_after_dockerd_restarts(m: UpMachine, net: list[str], base: int,
                                           kill_dockerd: Callable[[], None]) -> None:
    """After dockerd was killed and restarted, a container published then gets its port: the watcher
    reopened the event stream. (A SIGKILLed dockerd sends no die event, so the port of a container from
    before may never have closed: only a new one proves the watcher follows the new dockerd.) The
    `--restart always` container from before serves again too."""
    port, later = base + 4, base + 5
    httpd(m, net, "always", f"{port}:80", "--restart", "always")
    wait_for("the port serving", lambda: fetch(f"http://127.0.0.1:{port}/f") == "published\n", 60)
    assert closed(later)
    kill_dockerd()
    httpd(m, net, "later", f"{later}:80")
    wait_for("the port of a container published after the restart serving",
             lambda: fetch(f"http://127.0.0.1:{later}/f") == "published\n", 180)
    assert any(f["host"] == f"127.0.0.1:{later}" and f["container"] == "later"
               for f in m.status()["ports"]["forwarded"])
    wait_for("the port serving again", lambda: fetch(f"http://127.0.0.1:{port}/f") == "published\n", 180)
    m.docker("rm", "-f", "always", "later")
    wait_for("the later port closed with its container", lambda: closed(later), 60)
