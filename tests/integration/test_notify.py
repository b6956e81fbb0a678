"""sd_notify over real sockets: the real `systemd-notify`, raw datagrams with credentials and fds, a real
dockerd's READY=1 and STOPPING=1, the ring a reconnecting host resumes from."""

from __future__ import annotations

import array
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from boxpark import protocol
from boxpark.host.client import GuestClient, RemoteError, Stream
from boxpark.protocol import ErrorCode, NotifyMessage
from tests.guestserver import running_server
from tests.nsfixture import Namespace, dockerd, requires_root

pytestmark = pytest.mark.integration

SYSTEMD_NOTIFY = "/usr/bin/systemd-notify"
needs_systemd_notify = pytest.mark.skipif(not os.path.exists(SYSTEMD_NOTIFY), reason="needs systemd-notify")
needs_dockerd = pytest.mark.skipif(shutil.which("dockerd") is None, reason="needs dockerd (docker.io)")


def with_client(directory: str, body: Callable[[GuestClient], Awaitable[Any]]) -> Any:
    with running_server(Path(directory)) as srv:
        async def run() -> Any:
            async with await GuestClient.open(srv.address) as client:
                return await body(client)

        return asyncio.run(run())


async def take(stream: Stream[NotifyMessage], count: int, timeout: float = 10.0) -> list[NotifyMessage]:
    messages: list[NotifyMessage] = []

    async def collect() -> None:
        async for message in stream:
            messages.append(message)
            if len(messages) == count:
                return

    await asyncio.wait_for(collect(), timeout)
    return messages


async def notify(socket_path: str, *args: str) -> None:
    """Run the real systemd-notify with NOTIFY_SOCKET set; it waits for our barrier, so it returns 0."""
    env = dict(os.environ, NOTIFY_SOCKET=socket_path)
    process = await asyncio.create_subprocess_exec(SYSTEMD_NOTIFY, *args, env=env)
    assert await asyncio.wait_for(process.wait(), 60) == 0


def send_datagram(path: str, data: bytes, fds: list[int] | None = None) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sock.sendmsg([data], ancillary, 0, path)


@needs_systemd_notify
def test_systemd_notify_messages_with_the_senders_pid(short_tmp: str) -> None:
    path = f"{short_tmp}/run/notify.sock"  # the parent directory is created

    async def body(client: GuestClient) -> list[NotifyMessage]:
        stream = await client.notify_listen(path)
        assert (os.stat(path).st_mode & 0o777) == 0o666  # services running as other users can send
        await notify(path, "--ready")
        await notify(path, "--status=Serving 3 clients")
        sleeper = subprocess.Popen(["sleep", "30"])
        try:
            await notify(path, f"--pid={sleeper.pid}", "--ready")
            await notify(path, "WATCHDOG=1", "EXTEND_TIMEOUT_USEC=2000000", "CUSTOM=x")
            messages = await take(stream, 4)
        finally:
            sleeper.kill()
            sleeper.wait()
        stream.close()
        assert messages[2].pid == sleeper.pid and messages[2].mainpid == sleeper.pid
        return messages

    ready, status, mainpid, watchdog = with_client(short_tmp, body)
    assert [m.seq for m in (ready, status, mainpid, watchdog)] == [1, 2, 3, 4]
    # systemd-notify speaks for its parent (a shell script's service): the credentials carry our pid
    assert ready.ready and ready.pid == os.getpid() and ready.uid == os.getuid() and ready.gid == os.getgid()
    assert status.status == "Serving 3 clients" and not status.ready
    assert mainpid.ready and mainpid.fields["MAINPID"] == str(mainpid.mainpid)
    assert watchdog.watchdog and watchdog.extend_timeout_usec == 2_000_000 and watchdog.fields["CUSTOM"] == "x"
    assert all(time.time_ns() - 60 * 10**9 < m.time_ns <= time.time_ns() for m in (ready, watchdog))


def test_the_socket_outlives_its_connection_and_a_host_resumes(short_tmp: str) -> None:
    path = f"{short_tmp}/n.sock"

    async def body(client: GuestClient) -> None:
        first = await client.notify_listen(path)
        send_datagram(path, b"STATUS=one")
        assert [m.status for m in await take(first, 1)] == ["one"]
        first.close()  # the host goes away; the service keeps talking
        await asyncio.sleep(0.05)
        send_datagram(path, b"STATUS=two")
        send_datagram(path, b"READY=1")
        resumed = await client.notify_listen(path, since=1)
        got = await take(resumed, 2)
        assert [(m.seq, m.status, m.ready) for m in got] == [(2, "two", False), (3, None, True)]
        everything = await client.notify_listen(path)  # two listeners at once, each from its own point
        assert [m.seq for m in await take(everything, 3)] == [1, 2, 3]
        send_datagram(path, b"STOPPING=1")
        assert (await take(resumed, 1))[0].stopping and (await take(everything, 1))[0].stopping
        resumed.close()
        everything.close()
        # a host that counted on an earlier server (the guest rebooted) passes a number from the future
        from_before = await client.notify_listen(f"{short_tmp}/new.sock", since=1000)
        send_datagram(f"{short_tmp}/new.sock", b"READY=1")
        assert [(m.seq, m.ready) for m in await take(from_before, 1)] == [(1, True)]
        from_before.close()

    with_client(short_tmp, body)
    assert not os.path.exists(path)  # the server removed it when it closed


def test_passed_fds_are_closed_and_malformed_lines_ignored(short_tmp: str) -> None:
    path = f"{short_tmp}/n.sock"
    read_end, write_end = os.pipe()

    async def body(client: GuestClient) -> NotifyMessage:
        stream = await client.notify_listen(path)
        send_datagram(path, b"FDSTORE=1\nFDNAME=web\ngarbage line\n=x\nREADY=1", fds=[write_end])
        os.close(write_end)
        (message,) = await take(stream, 1)
        send_datagram(path, b"no key-value pairs at all")  # dropped: nothing understood
        send_datagram(path, b"BARRIER=1")  # a barrier only: dropped
        send_datagram(path, b"STATUS=after")
        (after,) = await take(stream, 1)
        assert after.seq == 2 and after.status == "after"
        stream.close()
        return message

    try:
        message = with_client(short_tmp, body)
        os.set_blocking(read_end, False)
        assert os.read(read_end, 1) == b""  # EOF: the guest closed the fd it was passed
    finally:
        os.close(read_end)
    assert message.ready and message.fields == {"FDSTORE": "1", "FDNAME": "web", "READY": "1"}


@requires_root
def test_credentials_of_another_user(short_tmp: str) -> None:
    path = f"{short_tmp}/n.sock"
    code = f"import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b'READY=1', {path!r})"

    async def body(client: GuestClient) -> NotifyMessage:
        stream = await client.notify_listen(path)
        os.chmod(short_tmp, 0o755)
        sender = await asyncio.create_subprocess_exec(
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", code)
        assert await sender.wait() == 0
        (message,) = await take(stream, 1)
        stream.close()
        assert message.pid == sender.pid
        return message

    message = with_client(short_tmp, body)
    assert (message.uid, message.gid, message.ready) == (65534, 65534, True)


def test_bad_paths_are_refused(short_tmp: str) -> None:
    open(f"{short_tmp}/file", "w").close()

    async def body(client: GuestClient) -> None:
        for path, code in (("relative.sock", ErrorCode.INVALID_ARGUMENT),
                           ("/tmp/" + "x" * 120, ErrorCode.INVALID_ARGUMENT),
                           (f"{short_tmp}/file", ErrorCode.ALREADY_EXISTS)):
            with pytest.raises(RemoteError) as info:
                await client.notify_listen(path)
            assert info.value.code == code

    with_client(short_tmp, body)


@requires_root
@needs_dockerd
def test_dockerd_ready_then_stopping(guest_ns: Namespace) -> None:
    """A real dockerd with NOTIFY_SOCKET: READY=1 when it serves, STOPPING=1 on SIGTERM, both from its pid."""
    path = f"{guest_ns.tmp}/notify/docker.sock"

    async def body() -> list[NotifyMessage]:
        async with await GuestClient.open(guest_ns.address) as client:
            stream = await client.notify_listen(path)
            with dockerd(guest_ns, notify_socket=path) as daemon:
                (ready,) = await take(stream, 1, timeout=60)
                assert ready.ready and ready.pid == daemon.pid, (ready, daemon.pid)
                assert os.path.exists(daemon.socket)  # READY=1 means its API socket is there
                daemon.process.send_signal(signal.SIGTERM)
                rest = await take(stream, 1, timeout=30)
                while not rest[-1].stopping:
                    rest += await take(stream, 1, timeout=30)
                assert await asyncio.to_thread(daemon.process.wait, 30) == 0
            stream.close()
            return [ready] + rest

    messages = asyncio.run(body())
    stopping = messages[-1]
    assert stopping.stopping and stopping.pid == messages[0].pid
    assert [m.seq for m in messages] == list(range(1, len(messages) + 1))


def test_protocol_message_is_what_the_client_gets(short_tmp: str) -> None:
    """The stream carries `NotifyMessage` frames and nothing else, after an `Ok`."""
    path = f"{short_tmp}/n.sock"

    async def body(client: GuestClient) -> None:
        stream = await client.notify_listen(path)
        assert isinstance(stream.first, protocol.Ok)
        send_datagram(path, b"RELOADING=1")
        (message,) = await take(stream, 1)
        assert type(message) is NotifyMessage and message.reloading
        stream.close()

    with_client(short_tmp, body)
