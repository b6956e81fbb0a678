"""The server's edges over real sockets: the handshake (unix and tcp with token), bad input from clients,
the machine-wide gate, events, and the CLI. Calls of one concern are tested in their own files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Iterator

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boxpark import protocol
from boxpark.host.client import GuestClient, RemoteError
from boxpark.transport import TransportError, parse_address, proof, write_secret
from tests.guestserver import running_server

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(60)  # a deadline, never a measure: under load replies may take long
    sock.connect(parse_address(address).path)
    return sock


def send_frame(sock: socket.socket, message: protocol.Message) -> None:
    sock.sendall(protocol.encode(message))


def recv_frame(sock: socket.socket) -> protocol.Message | None:
    decoder = protocol.FrameDecoder()
    while True:
        message = decoder.next_message()
        if message is not None:
            return message
        data = sock.recv(65536)
        if not data:
            return None
        decoder.feed(data)


def hello(sock: socket.socket) -> None:
    send_frame(sock, protocol.Hello())
    assert isinstance(recv_frame(sock), protocol.Welcome)


def still_serving(address: str) -> None:
    async def check() -> None:
        async with await GuestClient.open(address) as client:
            assert (await client.info()).protocol == protocol.PROTOCOL_VERSION

    asyncio.run(check())


def test_unix_socket_is_private_and_info_answers(tmp_path) -> None:
    with running_server(tmp_path) as srv:
        assert os.stat(tmp_path / "api.sock").st_mode & 0o777 == 0o600

        async def check() -> protocol.InfoReply:
            async with await GuestClient.open(srv.address) as client:
                assert client.welcome.boot_id == srv.server.boot_id
                return await client.info()

        info = asyncio.run(check())
        assert info.pid == os.getpid() and not info.pid1
        assert info.kernel == os.uname().release


def test_tcp_needs_the_token_proof(tmp_path) -> None:
    secret = write_secret(str(tmp_path / "secret"))
    port = free_port()
    with running_server(tmp_path, secret=secret, tcp_port=port):
        address = f"tcp:127.0.0.1:{port}"

        async def good() -> str:
            async with await GuestClient.open(address, secret=secret) as client:
                return (await client.info()).boxpark

        assert asyncio.run(good())

        async def wrong() -> None:
            await GuestClient.open(address, secret=b"x" * 32)

        with pytest.raises(TransportError, match="wrong or missing token proof") as info:
            asyncio.run(wrong())
        assert info.value.code == protocol.ErrorCode.UNAUTHENTICATED

        async def missing() -> None:
            await GuestClient.open(address)

        with pytest.raises(TransportError, match="needs the machine's secret"):
            asyncio.run(missing())

        # A client that skips the proof and calls straight away is refused, never served.
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            send_frame(sock, protocol.Hello())
            challenge = recv_frame(sock)
            assert isinstance(challenge, protocol.Challenge) and len(challenge.nonce) == 32
            send_frame(sock, protocol.Info())
            reply = recv_frame(sock)
            assert isinstance(reply, protocol.Error) and reply.code == protocol.ErrorCode.UNAUTHENTICATED
            assert recv_frame(sock) is None
        # Proofs are bound to the nonce: replaying one from an earlier connection fails.
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            send_frame(sock, protocol.Hello())
            old = recv_frame(sock)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            send_frame(sock, protocol.Hello())
            assert isinstance(recv_frame(sock), protocol.Challenge)
            send_frame(sock, protocol.Proof(hmac=proof(secret, old.nonce)))
            assert isinstance(recv_frame(sock), protocol.Error)


def test_version_mismatch_and_missing_hello(tmp_path) -> None:
    with running_server(tmp_path) as srv:
        with raw_connect(srv.address) as sock:
            send_frame(sock, protocol.Hello(version=99))
            reply = recv_frame(sock)
            assert isinstance(reply, protocol.Error) and reply.code == protocol.ErrorCode.VERSION_MISMATCH
        with raw_connect(srv.address) as sock:
            send_frame(sock, protocol.Info())
            reply = recv_frame(sock)
            assert isinstance(reply, protocol.Error) and "expected Hello" in reply.message


@pytest.mark.parametrize("garbage", [
    b"\x00\x00\x00\x03\xc1\xc1\xc1",                         # undecodable body
    struct.pack(">I", protocol.MAX_FRAME + 1) + b"x" * 100,  # oversized length
    b"\xff" * 64,                                             # random-looking bytes
], ids=["undecodable", "oversized", "random"])
def test_bad_frames_get_an_error_and_the_server_goes_on(tmp_path, garbage: bytes) -> None:
    with running_server(tmp_path) as srv:
        with raw_connect(srv.address) as sock:
            hello(sock)
            sock.sendall(garbage)
            reply = recv_frame(sock)
            assert isinstance(reply, protocol.Error) and reply.code == protocol.ErrorCode.BAD_FRAME
            assert recv_frame(sock) is None  # out of step: closed
        still_serving(srv.address)


def test_unknown_message_wrong_types_and_non_requests(tmp_path) -> None:
    with running_server(tmp_path) as srv:
        with raw_connect(srv.address) as sock:
            hello(sock)
            body = msgspec.msgpack.encode({"t": "exec", "argv": 5})
            sock.sendall(struct.pack(">I", len(body)) + body)
            reply = recv_frame(sock)
            assert isinstance(reply, protocol.Error) and "argv" in reply.message
        with raw_connect(srv.address) as sock:
            hello(sock)
            send_frame(sock, protocol.ExecResult(code=0, signal=None, stdout=b"", stderr=b""))
            reply = recv_frame(sock)
            assert isinstance(reply, protocol.Error) and reply.code == protocol.ErrorCode.UNSUPPORTED
            send_frame(sock, protocol.Info())  # a reply-type message does not end the connection
            assert isinstance(recv_frame(sock), protocol.InfoReply)
        still_serving(srv.address)


def test_clients_that_vanish_mid_frame_or_mid_handshake(tmp_path) -> None:
    with running_server(tmp_path) as srv:
        for cut in (1, 3, 7):
            with raw_connect(srv.address) as sock:
                hello(sock)
                sock.sendall(protocol.encode(protocol.Exec(argv=["sleep", "0"]))[:cut])
        with raw_connect(srv.address) as sock:
            sock.sendall(b"\x00\x00")
        with raw_connect(srv.address) as sock:
            pass
        still_serving(srv.address)


def test_many_clients_at_once_while_one_misbehaves(tmp_path) -> None:
    with running_server(tmp_path) as srv:
        async def one(i: int) -> int:
            async with await GuestClient.open(srv.address) as client:
                for _ in range(20):
                    await client.info()
                return i

        async def all_of_them() -> list[int]:
            bad = raw_connect(srv.address)
            bad.sendall(b"\x00\x00\x00\x10garbage")  # no Hello, truncated: must not stall the others
            try:
                return await asyncio.gather(*(one(i) for i in range(50)))
            finally:
                bad.close()

        assert asyncio.run(all_of_them()) == list(range(50))


def test_machine_wide_calls_are_refused_off_pid1(tmp_path) -> None:
    with running_server(tmp_path) as srv:
        async def attempts() -> list[str]:
            messages = []
            async with await GuestClient.open(srv.address) as client:
                for call in (client.poweroff(), client.reboot(), client.set_time(time.time_ns()),
                             client.hostname("renamed"), client.swapon("/nonexistent"),
                             client.swapoff("/nonexistent")):
                    with pytest.raises(RemoteError) as info:
                        await call
                    assert info.value.code == protocol.ErrorCode.PERMISSION_DENIED
                    messages.append(info.value.message)
                assert await client.hostname() == socket.gethostname()  # reading is fine
            return messages

        messages = asyncio.run(attempts())
        assert all("refused" in m for m in messages)
    assert socket.gethostname() != "renamed"


def test_events_stream_resumes_from_a_sequence_number(tmp_path) -> None:
    with running_server(tmp_path) as srv:
        async def emit(n: int) -> None:
            for i in range(n):
                srv.server.events.emit(protocol.Log(level="info", message=f"e{i}"))

        srv.run(emit(3))

        async def read(since: int, count: int) -> list[protocol.EventFrame]:
            async with await GuestClient.open(srv.address) as client:
                stream = await client.events(since)
                frames = []
                async with stream:
                    async for frame in stream:
                        frames.append(frame)
                        if len(frames) == count:
                            break
                        if len(frames) == 2:
                            srv.run(emit(2))  # arrives while following
                return frames

        frames = asyncio.run(read(0, 5))
        assert [f.seq for f in frames] == [1, 2, 3, 4, 5]
        assert [f.event.message for f in frames] == ["e0", "e1", "e2", "e0", "e1"]
        assert [f.seq for f in asyncio.run(read(3, 2))] == [4, 5]


def test_guest_dials_the_hosts_event_stream_and_resumes(tmp_path) -> None:
    """The guest side of the event stream: dial, get Resume, send what the host has not seen; redial."""
    from boxpark.guest import events
    from boxpark.transport import Channel, serve

    async def scenario() -> list[int]:
        log_ = events.EventLog("boot-1")
        for i in range(3):
            log_.emit(protocol.Log(level="info", message=str(i)))
        seen: list[int] = []
        got = asyncio.Queue()

        async def host(channel: Channel) -> None:
            assert channel.hello is not None and channel.hello.boot_id == "boot-1"
            channel.send(protocol.Resume(since=seen[-1] if seen else 1))
            while (frame := await channel.recv()) is not None:
                seen.append(frame.seq)
                await got.put(frame.seq)
                if frame.seq == 3 and len(seen) == 2:
                    return  # the host drops the connection once, mid-stream

        address = parse_address(f"unix:{tmp_path}/events.sock")
        dialer = asyncio.ensure_future(events.stream_to_host(log_, address, None))
        await asyncio.sleep(0.2)  # the host is not listening yet: the guest retries
        server = await serve(address, host)
        while len(seen) < 2:
            await asyncio.wait_for(got.get(), 60)
        log_.emit(protocol.Log(level="info", message="after reconnect"))
        while 4 not in seen:
            await asyncio.wait_for(got.get(), 60)
        dialer.cancel()
        server.close()
        return seen

    assert asyncio.run(scenario()) == [2, 3, 4]


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_fuzz_the_live_server(fuzz_server, data: bytes) -> None:
    """Whatever a client sends after Hello, the server answers or closes, and keeps serving others."""
    srv = fuzz_server
    with raw_connect(srv.address) as sock:
        hello(sock)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        try:
            while recv_frame(sock) is not None:
                pass
        except (ConnectionError, protocol.ProtocolError):
            pass
    still_serving(srv.address)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("fuzz")) as srv:
        yield srv


def test_cli_serve_and_call(tmp_path) -> None:
    address = f"unix:{tmp_path}/cli.sock"
    server = subprocess.Popen([sys.executable, "-m", "boxpark", "guest", "serve", "--listen", address],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(tmp_path / "cli.sock"):
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.02)

        def call(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "boxpark", "guest", "call", address, *args],
                                  capture_output=True, text=True, timeout=30)

        info = call("info")
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["protocol"] == protocol.PROTOCOL_VERSION
        refused = call("poweroff")
        assert refused.returncode == 1 and "refused" in refused.stderr and "Traceback" not in refused.stderr
        bad = call("exec", "--json", '{"argv": "ls -l"}')
        assert bad.returncode == 2 and "argv" in bad.stderr and "Traceback" not in bad.stderr
        unknown = call("frobnicate")
        assert unknown.returncode == 2 and "one of:" in unknown.stderr
        nojson = call("info", "--json", "{nope")
        assert nojson.returncode == 2 and "not valid JSON" in nojson.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    assert not os.path.exists(tmp_path / "cli.sock")  # closed cleanly, socket removed
    missing = subprocess.run([sys.executable, "-m", "boxpark", "guest", "call", address, "info"],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "cannot connect" in missing.stderr


def test_a_silent_client_is_cut_off_at_the_handshake_timeout(tmp_path, monkeypatch) -> None:
    import boxpark.transport.handshake

    monkeypatch.setattr(boxpark.transport.handshake, "HANDSHAKE_TIMEOUT", 0.3)
    with running_server(tmp_path) as srv:
        with raw_connect(srv.address) as sock:
            reply = recv_frame(sock)  # we never say Hello
            assert isinstance(reply, protocol.Error) and reply.code == protocol.ErrorCode.TIMEOUT
            assert recv_frame(sock) is None  # closed by the server, well within the socket's deadline
        still_serving(srv.address)


@contextlib.contextmanager
def served(directory, *wrapper: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A real `boxpark guest serve` on a unix socket in `directory` (run under `wrapper`, e.g. prlimit)."""
    path = os.path.join(directory, "served.sock")
    log = os.path.join(directory, "served.log")  # a file, not a pipe nobody reads: the server never blocks on it
    with open(log, "w") as stderr:
        server = subprocess.Popen([*wrapper, sys.executable, "-m", "boxpark", "guest", "serve", "--listen",
                                   f"unix:{path}"], stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if server.poll() is not None:
                raise AssertionError(f"guest serve exited: {open(log).read()}")
            assert time.monotonic() < deadline, "guest serve did not start listening"
            time.sleep(0.02)
        yield server, f"unix:{path}"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def proc_status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def serving_again(address: str) -> None:
    """`info` answers, trying again until a generous deadline."""
    deadline = time.monotonic() + 60
    while True:
        try:
            still_serving(address)
            return
        except (TransportError, OSError, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_unauthenticated_clients_cannot_make_the_server_hold_their_frames(tmp_path) -> None:
    per_client, clients = 4 << 20, 40
    with served(tmp_path) as (server, address):
        still_serving(address)
        before = proc_status_kib(server.pid, "VmRSS")
        socks = []
        try:
            for _ in range(clients):  # each claims a 16 MiB frame before Hello, then sends 4 MiB of it
                sock = raw_connect(address)
                sock.settimeout(30)
                socks.append(sock)
                try:
                    sock.sendall(struct.pack(">I", protocol.MAX_FRAME))
                    for _ in range(per_client // 65536):
                        sock.sendall(b"\0" * 65536)
                except OSError:  # refused and closed: what should happen
                    pass
            grown = proc_status_kib(server.pid, "VmHWM") - before  # the peak, not just now
        finally:
            for sock in socks:
                sock.close()
        # held, the bytes would be 160 MiB; a refusal at the header costs at most a read buffer at a time
        assert grown < 48 << 10, f"the server's peak RSS grew by {grown} KiB"
        still_serving(address)


def test_out_of_fds_the_server_backs_off_instead_of_spinning_and_serves_again(tmp_path) -> None:
    with served(tmp_path, "prlimit", "--nofile=64:64") as (server, address):
        still_serving(address)
        held = []
        try:
            for _ in range(120):  # more than it has fds for: the rest wait in its backlog
                sock = raw_connect(address)
                sock.sendall(protocol.encode(protocol.Hello()))  # the accepted ones stay, welcomed
                held.append(sock)
            deadline = time.monotonic() + 60
            while len(os.listdir(f"/proc/{server.pid}/fd")) < 60:
                assert time.monotonic() < deadline, "the server never ran out of fds"
                time.sleep(0.1)
            start = cpu_seconds(server.pid)
            time.sleep(5)  # a window to measure CPU over, not a condition
            used = cpu_seconds(server.pid) - start
            # backing off it uses ~0.01 s; spinning, whatever share of a core a loaded machine gives it
            assert used < 0.5, f"{used:.2f} s of CPU in 5 s with no fd to accept into"
        finally:
            for sock in held:
                sock.close()
        serving_again(address)


def first_calls(tmp_path) -> list[protocol.Message]:
    """One request of every call in the contract, harmless on a server that is not PID 1."""
    return [
        protocol.Info(), protocol.Exec(argv=["true"]), protocol.Exec(argv=["true"], interactive=True),
        protocol.Launch(name="c1", argv=["true"]), protocol.Launch(name="c2", argv=["true"], connect=True),
        protocol.Attach(name="c1"), protocol.Wait(name="nope"), protocol.Signal(name="nope", signal=0),
        protocol.ListProcesses(), protocol.ReadFile(path="/nonexistent"),
        protocol.WriteFile(path=f"{tmp_path}/w", data=b"x"), protocol.Mkdir(path=f"{tmp_path}/d"),
        protocol.Stat(path="/"), protocol.Mount(source="none", target=f"{tmp_path}/nope/m", fstype="tmpfs"),
        protocol.Umount(target=f"{tmp_path}/nope"), protocol.Swapon(path="/nonexistent"),
        protocol.Swapoff(path="/nonexistent"), protocol.ResizeDisk(device="/nonexistent"),
        protocol.NotifyListen(path=f"{tmp_path}/notify"), protocol.Connect(path=f"{tmp_path}/nobody.sock"),
        protocol.Listen(path=f"{tmp_path}/listen.sock"), protocol.TakeConnection(id=1),
        protocol.Events(), protocol.SetTime(time_ns=time.time_ns()), protocol.Sync(), protocol.Hostname(),
        protocol.MemoryStats(), protocol.Reboot(), protocol.Poweroff(),
        protocol.HostResolver(),
    ]


def test_every_call_reaches_its_handler_and_answers_as_the_table_says(tmp_path) -> None:
    requests = first_calls(tmp_path)
    assert {type(r) for r in requests} == set(protocol.CALLS)
    with running_server(tmp_path) as srv:
        for request in requests:
            with raw_connect(srv.address) as sock:
                hello(sock)
                send_frame(sock, request)
                reply = recv_frame(sock)
            spec = protocol.call_spec(request)
            name = type(request).__name__
            if isinstance(reply, protocol.Error):
                assert reply.code != protocol.ErrorCode.UNSUPPORTED, (name, reply)
                assert reply.code != protocol.ErrorCode.INTERNAL, (name, reply)
            else:
                assert isinstance(reply, spec.replies), (name, reply)
        still_serving(srv.address)


def test_a_reply_the_table_does_not_allow_is_an_internal_error(tmp_path, monkeypatch) -> None:
    from boxpark.guest import files

    monkeypatch.setattr(files, "stat", lambda message: protocol.Ok())  # a buggy handler: Stat answers StatReply
    with running_server(tmp_path) as srv:
        async def scenario() -> None:
            async with await GuestClient.open(srv.address) as client:
                with pytest.raises(RemoteError, match="answered it with Ok") as info:
                    await client.stat("/")
                assert info.value.code == protocol.ErrorCode.INTERNAL
                assert (await client.info()).pid1 is False  # the connection goes on

        asyncio.run(scenario())


def test_the_client_refuses_to_make_a_call_of_another_kind(tmp_path) -> None:
    with running_server(tmp_path) as srv:
        async def scenario() -> None:
            async with await GuestClient.open(srv.address) as client:
                with pytest.raises(ValueError, match="stream call, not unary"):
                    await client.call(protocol.Events())
                with pytest.raises(ValueError, match="unary call, not stream"):
                    await client.stream(protocol.Launch(name="x", argv=["true"]))
                async with await client.stream(protocol.Attach(name="nope-yet")) as stream:
                    raise AssertionError(f"attached to a process that does not exist: {stream.first}")

        with pytest.raises(RemoteError) as info:
            asyncio.run(scenario())
        assert info.value.code == protocol.ErrorCode.NOT_FOUND
