"""The vz backend's host side around VZ, for real, with only VZ itself replaced by a fake.

`FakeVzMachine` stands in for `VzMachine` (the PyObjC layer): its "vsock" dials reach a real Guest API
server on a unix socket, and the "guest" dials the event stream with socketpairs delivered from a foreign
thread, as VZ's listener delegate does. Everything else is the backend's own code: the guest's dials taken
straight into the EventStream, each `dial` a connectToPort whose socket goes straight to the caller (no
relay, no socket file), KeptSocket's release of VZ's connection objects once our copy closes, and the
agent's blocking `Connect` path (its Docker proxy's) through the backend's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from boxpark import protocol
from boxpark.host.backends.vz import VmEnd, VzBackend
from boxpark.host.backends.vzplan import VzLimits, VzPlan, make_plan
from boxpark.host.gcdbridge import Inbox, KeptSocket
from boxpark.host.guestlink import GuestLink, guest_client
from boxpark.host.spec import MachineSpec
from boxpark.transport import Channel, client_handshake, parse_address
from tests.guestserver import running_server
from tests.unit.test_vzplan import arm64_image

pytestmark = pytest.mark.integration

FAKE_LIMITS = VzLimits(min_memory=128 << 20, max_memory=8 << 30, min_cpus=1, max_cpus=8, rosetta="not-installed")


class FakeConnection:
    """Stands in for VZVirtioSocketConnection: owns the original fd until VZ is told to close it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False

    def close(self) -> None:
        self.sock.close()
        self.closed = True


class FakeVzMachine:
    """Stands in for `VzMachine`: no VZ. connect() dials a real Guest API server; guest_dials() is the guest."""

    api_path = ""  # set by the test: the Guest API server's unix socket

    def __init__(self, plan: VzPlan, loop: asyncio.AbstractEventLoop, accept: Callable[[KeptSocket], None]) -> None:
        self.plan = plan
        self.end = VmEnd(loop)
        self.inbox: Inbox[KeptSocket] = Inbox(loop, handler=accept, discard=KeptSocket.close)
        self.connections: list[FakeConnection] = []
        self.released: list[FakeConnection] = []

    def release(self, connection: object) -> None:
        assert isinstance(connection, FakeConnection)
        threading.Thread(target=connection.close).start()  # VZ closes it on its own queue
        self.released.append(connection)

    async def start(self) -> None:
        pass

    async def connect(self, port: int, timeout: float = 10.0) -> KeptSocket:
        assert port == 1024
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(self.api_path)
        connection = FakeConnection(sock)
        self.connections.append(connection)
        return KeptSocket.dup(sock.fileno(), connection, self.release)

    def guest_dials(self) -> socket.socket:
        """The guest's end of a new event-stream connection, accepted on a foreign thread."""
        guest, host = socket.socketpair()
        connection = FakeConnection(host)
        self.connections.append(connection)
        t = threading.Thread(target=lambda: self.inbox.deliver(KeptSocket.dup(host.fileno(), connection, self.release)))
        t.start()
        t.join()
        return guest

    async def stop(self) -> None:
        self.end.finish(2, "the host stopped the machine")

    async def close(self) -> None:
        self.inbox.close()
        await self.stop()


class FakeVzBackend(VzBackend):
    """The vz backend with `FakeVzMachine` for VZ and fixed limits for the Mac it is not on."""

    machine_class = FakeVzMachine  # type: ignore[assignment]

    def check(self, spec: MachineSpec) -> None:
        self.plan = make_plan(spec, FAKE_LIMITS, rosetta=self.rosetta)


def fake_spec(directory: Path) -> MachineSpec:
    image = directory / "image"
    image.mkdir()
    (image / "vmlinuz").write_bytes(arm64_image())
    (image / "initrd.img").write_bytes(gzip.compress(b"initramfs"))
    (image / "root.squashfs").write_bytes(b"\0" * 4096)
    return MachineSpec(root=str(image / "root.squashfs"), kernel=str(image / "vmlinuz"),
                       initrd=str(image / "initrd.img"), state_dir=str(directory / "s"), arch="arm64", name="fake")


async def guest_sends_ready(guest: socket.socket, boot_id: str) -> Channel:
    channel = await Channel.from_socket(guest, "guest")
    await client_handshake(channel, parse_address("unix:/events"), None, hello=protocol.Hello(boot_id=boot_id))
    resume = await channel.recv_expect(protocol.Resume)
    assert resume.since == 0  # type: ignore[attr-defined]
    ready = protocol.Ready(boot_id=boot_id, boxpark="test", kernel="6.1", arch="aarch64", timeline=[],
                           monotonic_ns=time.monotonic_ns())
    channel.send(protocol.EventFrame(seq=1, time_ns=time.time_ns(), event=ready))
    await channel.drain()
    return channel


def test_events_and_api_straight_from_the_backend(short_tmp: str) -> None:
    directory = Path(short_tmp)
    spec = fake_spec(directory)
    (directory / "api").mkdir()
    with running_server(directory / "api") as server, echo_server(directory / "echo.sock") as echo:
        FakeVzMachine.api_path = server.address.removeprefix("unix:")

        async def main() -> None:
            backend = FakeVzBackend()
            async with backend:
                await backend.start(spec)
                machine: Any = backend.machine
                assert backend.address(1024) == parse_address("vsock:3:1024")
                assert not os.path.exists(f"{directory}/s/api.sock")  # nothing to forward: dial is straight
                assert not os.path.exists(f"{directory}/s/events.sock")
                channel = await guest_sends_ready(machine.guest_dials(), "boot-1")
                ready = await backend.wait_ready(10)
                assert ready.boot_id == "boot-1" and backend.events is not None
                assert backend.events.connections == 1

                for _ in range(3):  # each client is a new connectToPort, its socket ours
                    client = await guest_client(backend)
                    info = await client.info()
                    result = await client.exec(["echo", "straight from the backend"])
                    assert result.stdout == b"straight from the backend\n" and info.boot_id is not None
                    await client.close()
                api_connections = [c for c in machine.connections if c not in (machine.connections[0],)]
                assert len(api_connections) == 3

                # the Docker proxy's path: a relay thread opens a Connect through the backend's loop
                link = GuestLink(backend)
                sock = await asyncio.to_thread(link.connect_blocking, protocol.Connect(path=echo))
                try:
                    await asyncio.to_thread(sock.sendall, b"GET /_ping HTTP/1.1\r\n\r\n")
                    assert await asyncio.to_thread(sock.recv, 100) == b"GET /_ping HTTP/1.1\r\n\r\n"
                finally:
                    sock.close()
                assert len(machine.connections) == 5
                for _ in range(50):  # our copy closed: VZ's object is released, once each
                    if len(machine.released) == 4:
                        break
                    await asyncio.sleep(0.02)
                assert sorted(map(id, machine.released)) == sorted(map(id, machine.connections[1:]))

                channel.close()  # the guest drops the stream and dials again: resumes after #1
                channel2 = await Channel.from_socket(machine.guest_dials(), "guest")
                await client_handshake(channel2, parse_address("unix:/events"), None,
                                       hello=protocol.Hello(boot_id="boot-1"))
                resume = await channel2.recv_expect(protocol.Resume)
                assert resume.since == 1  # type: ignore[attr-defined]
                channel2.close()

                await machine.stop()  # the VM ended (as VZ's delegate would say)
                assert await backend.stop(5) == 2
            for _ in range(50):
                if all(c.closed for c in machine.connections):
                    break
                await asyncio.sleep(0.02)
            assert all(c.closed for c in machine.connections)

        asyncio.run(main())


@contextlib.contextmanager
def echo_server(path: Path) -> Iterator[str]:
    """A unix socket in the "guest" that echoes one connection's bytes (a stand-in for docker.sock)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield str(path)
    finally:
        listener.close()
        thread.join(5)


def test_vz_end_before_ready_names_the_reason(short_tmp: str) -> None:
    spec = fake_spec(Path(short_tmp))

    async def main() -> None:
        backend = FakeVzBackend()
        async with backend:
            await backend.start(spec)
            Path(spec.console_log).write_text("Kernel panic - not syncing: VFS\n")
            assert backend.machine is not None
            backend.machine.end.finish(1, "VZ stopped the machine: Internal Virtualization error.")
            from boxpark.host.backends import BackendError

            with pytest.raises(BackendError) as caught:
                await backend.wait_ready(5)
            text = str(caught.value)
            assert "the vz machine stopped before the guest was ready: VZ stopped the machine: Internal" in text
            assert "Kernel panic" in text

    asyncio.run(main())
