"""The guest's side of the Mac path: the Guest API, `Connect` and the Docker proxy's stream over AF_VSOCK.

Under VZ the init listens on `vsock:4294967295:1024` (VMADDR_CID_ANY) and every host connection arrives over
vsock; QEMU here has no /dev/vhost-vsock and uses tcp. So one QEMU guest listens on both, as the settings
allow, and a script inside the guest dials its own vsock listener at CID 1 (vsock_loopback): the handshake
and `Info`, the `Connect` to docker.sock that the host's Guest Proxy makes for each Docker connection with a
`GET /_ping` through it, and megabytes both ways through a `Connect` with a half-close (the guest's relay
between a vsock socket and a unix socket: splice, or its copy where vsock cannot splice).

AF_VSOCK is opened only inside the guest: CID 2 from this host would be its real hypervisor.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from boxpark.image.rootfs import PYTHON_DIR
from boxpark.transport import DEFAULT_PORT
from tests.machines import Machines

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed"),
              pytest.mark.skipif(os.geteuid() != 0, reason="the image and its tools need root")]

VSOCK_API = f"vsock:4294967295:{DEFAULT_PORT}"  # what vzplan puts on the VZ guest's command line

# Runs in the guest with the image's own python and Boxpark (only protocol and transport: what the guest ships).
GUEST_SCRIPT = r"""
import asyncio, hashlib, json, os, socket, sys, threading
sys.path.insert(0, sys.argv[1])
from boxpark import protocol
from boxpark.transport import dial, open_raw_blocking

API = sys.argv[2]
HELLO = protocol.Hello(client="vsock-test")
out = {}

async def info():
    channel, welcome = await dial(API, hello=HELLO, timeout=60)
    channel.send(protocol.Info())
    reply = await channel.recv_expect(protocol.InfoReply)
    channel.close()
    return reply

reply = asyncio.run(info())
out["info"] = {"pid1": reply.pid1, "hostname": reply.hostname, "arch": reply.arch}

def read_all(sock):
    parts = []
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)

# The Docker proxy's stream: the same call the agent's Guest Proxy makes per connection, over vsock.
sock = open_raw_blocking(API, protocol.Connect(path="/var/run/docker.sock"), hello=HELLO, timeout=60)
assert sock.family == socket.AF_VSOCK, sock
sock.settimeout(120)
sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
ping = read_all(sock)
sock.close()
out["ping_status"] = ping.split(b"\r\n", 1)[0].decode()
out["ping_body"] = ping.rsplit(b"\r\n\r\n", 1)[-1].decode()

# Bulk both ways: an echo server on a unix socket in the guest; we half-close, it echoes to the end.
path = "/run/vsock-echo.sock"
if os.path.exists(path):
    os.unlink(path)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(1)

def echo():
    conn, _ = server.accept()
    while True:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)
    conn.close()

threading.Thread(target=echo, daemon=True).start()
payload = os.urandom(4 << 20)
sock = open_raw_blocking(API, protocol.Connect(path=path), hello=HELLO, timeout=60)
sock.settimeout(300)

def send():
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)

sender = threading.Thread(target=send)
sender.start()
echoed = read_all(sock)
sender.join()
sock.close()
out["sent"] = hashlib.sha256(payload).hexdigest()
out["echoed"] = hashlib.sha256(echoed).hexdigest()
out["echoed_bytes"] = len(echoed)
print(json.dumps(out))
"""


def test_api_connect_and_docker_ping_over_vsock_in_the_guest(machines: Machines) -> None:
    machine = machines.create("qemu", memory=1536,
                              settings={"api": f"tcp:0.0.0.0:{DEFAULT_PORT},{VSOCK_API}"})
    machine.start()
    ready = machine.wait_ready()
    assert VSOCK_API in ready.api.split(","), ready.api  # the init listens on vsock as under VZ
    machine.sh("modprobe vsock_loopback")
    machine.start_dockerd()
    machine.api(lambda c: c.write_file("/run/vsock_check.py", GUEST_SCRIPT.encode()))
    argv = ["python3", "-SI", "/run/vsock_check.py", PYTHON_DIR, f"vsock:1:{DEFAULT_PORT}"]
    result = machine.api(lambda c: c.exec(argv, timeout=300), 330)
    assert result.code == 0, result.stderr.decode()
    out = json.loads(result.stdout)
    assert out["info"] == {"pid1": True, "hostname": machine.spec.name, "arch": "x86_64"}
    assert out["ping_status"].startswith("HTTP/1.1 200"), out
    assert out["ping_body"] == "OK", out
    assert out["echoed_bytes"] == 4 << 20 and out["echoed"] == out["sent"]
    machine.stop_dockerd()
