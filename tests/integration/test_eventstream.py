"""The host's event-stream listener against what a broken or hostile peer sends: garbage, a Hello without a
boot id or with another boot's, a replayed Ready. The listener is the real one on a unix socket; the "guest"
is this test speaking the real transport."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from boxpark import protocol
from boxpark.host.eventstream import EventStream
from boxpark.transport import Channel, dial

pytestmark = pytest.mark.integration


def ready(boot_id: str) -> protocol.Ready:
    return protocol.Ready(boot_id=boot_id, boxpark="test", kernel="k", arch="amd64", timeline=[], monotonic_ns=1)


def frame(seq: int, event: object) -> protocol.EventFrame:
    return protocol.EventFrame(seq=seq, time_ns=time.time_ns(), event=event)


async def guest(address: str, boot_id: str) -> tuple[Channel, int]:
    """A guest's side of the stream: dial with its boot id; the `since` the host resumes it from."""
    channel, _ = await dial(address, hello=protocol.Hello(client="test", boot_id=boot_id))
    resume = await channel.recv_expect(protocol.Resume)
    assert isinstance(resume, protocol.Resume)
    return channel, resume.since


async def settle(events: EventStream, seq: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while events.last_seq < seq:
        assert time.monotonic() < deadline, f"the stream never reached #{seq} (at #{events.last_seq})"
        await asyncio.sleep(0.01)


def run(tmp_path: Path, scenario) -> None:
    async def main() -> None:
        address = f"unix:{tmp_path}/events.sock"
        async with EventStream(address) as events:
            await scenario(address, events)

    asyncio.run(main())


def test_garbage_costs_the_sender_its_connection_and_nothing_else(tmp_path: Path) -> None:
    async def scenario(address: str, events: EventStream) -> None:
        channel, since = await guest(address, "boot-a")
        channel.send(frame(1, ready("boot-a")))
        await settle(events, 1)
        loop = asyncio.get_running_loop()
        for junk in (b"\xff" * 64, b"\x00\x00\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n", b"\x7f\xff\xff\xff"):
            with socket.socket(socket.AF_UNIX) as sock:  # before the handshake
                sock.setblocking(False)
                await loop.sock_connect(sock, f"{tmp_path}/events.sock")
                await loop.sock_sendall(sock, junk)
                sock.shutdown(socket.SHUT_WR)
                while await asyncio.wait_for(loop.sock_recv(sock, 65536), 30):
                    pass  # an error reply at most, then the close
        bad, _ = await guest(address, "boot-a")  # after the handshake: a frame that is not one
        bad.send_bytes(b"\x00\x00\x00\x08" + b"\xc1" * 8)
        assert await asyncio.wait_for(bad.recv(), 30) is None
        channel.send(frame(2, protocol.Log(level="warning", message="still here")))
        await settle(events, 2)
        assert events.boot_id == "boot-a" and events.ready is not None and events.ready.boot_id == "boot-a"
        again, since = await guest(address, "boot-a")
        assert since == 2  # the listener serves, and remembers
        channel.close()
        again.close()

    run(tmp_path, scenario)


def test_a_replayed_ready_is_taken_once(tmp_path: Path) -> None:
    async def scenario(address: str, events: EventStream) -> None:
        channel, _ = await guest(address, "boot-a")
        channel.send(frame(1, ready("boot-a")))
        await settle(events, 1)
        first, at = events.ready, events.ready_at
        channel.send(frame(1, ready("boot-a")))  # the same frame again (a redial that resumed too early)
        channel.send(frame(2, ready("boot-a")))  # a second Ready in one boot
        channel.send(frame(3, ready("boot-b")))  # a Ready that names another boot than its connection's
        channel.send(frame(4, protocol.Log(level="warning", message="after")))
        await settle(events, 4)
        assert events.ready is first and events.ready_at == at
        assert [f.seq for f in events.frames] == [1, 2, 3, 4]
        rebooted = asyncio.ensure_future(events.wait_rebooted("boot-a"))
        await asyncio.sleep(0.2)
        assert not rebooted.done()  # no reboot for the agent to act on
        rebooted.cancel()
        channel.close()

    run(tmp_path, scenario)


def test_a_hello_without_a_boot_id_does_not_reset_the_boot(tmp_path: Path) -> None:
    async def scenario(address: str, events: EventStream) -> None:
        channel, _ = await guest(address, "boot-a")
        channel.send(frame(1, ready("boot-a")))
        await settle(events, 1)
        stranger, _ = await dial(address, hello=protocol.Hello(client="not a guest"))
        assert await asyncio.wait_for(stranger.recv(), 30) is None  # dropped before any Resume
        assert events.boot_id == "boot-a" and events.ready is not None and events.last_seq == 1
        channel.close()

    run(tmp_path, scenario)


def test_another_boot_starts_the_count_again_and_forgets_the_old_frames(tmp_path: Path) -> None:
    async def scenario(address: str, events: EventStream) -> None:
        old, _ = await guest(address, "boot-a")
        for seq in range(1, 6):
            old.send(frame(seq, ready("boot-a") if seq == 1 else protocol.Log(level="warning", message=f"a{seq}")))
        await settle(events, 5)
        rebooted = asyncio.ensure_future(events.wait_rebooted("boot-a"))
        new, since = await guest(address, "boot-b")
        assert since == 0
        old.send(frame(6, protocol.Log(level="warning", message="late, from the old boot")))  # ignored
        new.send(frame(1, protocol.Log(level="warning", message="b1")))
        await settle(events, 1)
        assert not rebooted.done()  # no Ready of the new boot yet
        assert [f.event.message for f in events.since(0)] == ["b1"]  # none of boot-a's frames
        new.send(frame(2, ready("boot-b")))
        assert (await asyncio.wait_for(rebooted, 30)).boot_id == "boot-b"
        assert events.boot_id == "boot-b" and [f.seq for f in events.frames] == [1, 2]
        old.close()
        new.close()

    run(tmp_path, scenario)


def test_a_connection_handed_in_is_served_as_one_accepted_and_bounded(tmp_path: Path) -> None:
    """`take` (VZ's listener hands the guest's dials over as sockets): the same handshake and resume as a
    listener's; at most MAX_TAKEN at once, the rest closed; closing the stream ends them all."""
    from boxpark.host.eventstream import MAX_TAKEN
    from boxpark.transport import client_handshake, parse_address

    async def main() -> None:
        events = EventStream(parse_address("vsock:2:1025"))  # a name only: nothing listens

        async def dial_in(boot_id: str) -> tuple[Channel, int]:
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            events.take(ours)
            channel = await Channel.from_socket(theirs, "guest")
            await client_handshake(channel, parse_address("unix:/events"), None,
                                   hello=protocol.Hello(client="test", boot_id=boot_id))
            resume = await channel.recv_expect(protocol.Resume)
            assert isinstance(resume, protocol.Resume)
            return channel, resume.since

        channel, since = await dial_in("b1")
        assert since == 0
        channel.send(frame(1, ready("b1")))
        assert (await events.wait_ready(30)).boot_id == "b1"
        channel.close()
        deadline = time.monotonic() + 30
        while events._taken:  # that connection's end reaches the stream
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        channel, since = await dial_in("b1")  # a redial resumes after what was seen
        assert since == 1
        idle = []
        for _ in range(MAX_TAKEN + 4):  # peers that never say Hello: each holds a slot until its timeout
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            events.take(ours)
            idle.append(theirs)

        def closed(sock: socket.socket) -> bool:
            try:
                return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
            except BlockingIOError:
                return False

        assert [closed(sock) for sock in idle] == [False] * (MAX_TAKEN - 1) + [True] * 5  # one slot is the stream's
        await events.close()
        assert await channel.recv() is None  # the stream's end ends the connections it took
        for sock in idle:
            sock.close()

    asyncio.run(main())
