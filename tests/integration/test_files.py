"""The file calls over a real server and socket: read_file, write_file, mkdir, stat, and their errors."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from boxpark import protocol
from boxpark.host.client import GuestClient
from boxpark.protocol import MAX_FILE_CHUNK, ErrorCode
from boxpark.transport import RemoteError
from tests.guestserver import refused, running_server

pytestmark = pytest.mark.integration


def with_client(tmp_path: Path, body: Callable[[GuestClient], Awaitable[Any]]) -> Any:
    with running_server(tmp_path) as srv:
        async def run() -> Any:
            async with await GuestClient.open(srv.address) as client:
                return await body(client)

        return asyncio.run(run())


def test_write_read_and_stat_round_trip(tmp_path: Path) -> None:
    path = f"{tmp_path}/dir/a.txt"

    async def body(client: GuestClient) -> None:
        await client.write_file(path, b"hello\n", mode=0o640, parents=True)
        assert (await client.read_file(path)) == protocol.FileData(data=b"hello\n", eof=True)
        info = await client.stat(path)
        real = os.stat(path)
        assert (info.kind, info.mode, info.size) == ("file", 0o640, 6)
        assert (info.uid, info.gid, info.mtime_ns) == (real.st_uid, real.st_gid, real.st_mtime_ns)
        assert (await client.stat(f"{tmp_path}/dir")).kind == "dir"

    with_client(tmp_path, body)
    assert Path(path).read_bytes() == b"hello\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_write_is_atomic_by_rename(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b"old contents")
    old_inode = path.stat().st_ino
    reader = open(path, "rb")  # someone reading the old file keeps seeing it whole

    async def body(client: GuestClient) -> None:
        await client.write_file(str(path), b"new", mode=0o600)

    try:
        with_client(tmp_path, body)
        assert reader.read() == b"old contents"
    finally:
        reader.close()
    assert path.read_bytes() == b"new"
    assert path.stat().st_ino != old_inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_append_keeps_the_file_and_creates_it_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "log"

    async def body(client: GuestClient) -> None:
        await client.write_file(str(path), b"one\n", append=True, mode=0o600)
        inode = path.stat().st_ino
        await client.write_file(str(path), b"two\n", append=True, mode=0o644)
        assert path.stat().st_ino == inode

    with_client(tmp_path, body)
    assert path.read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # an existing file keeps its mode


def test_write_through_a_symlink_and_not_over_a_directory(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "d").mkdir()

    async def body(client: GuestClient) -> None:
        await client.write_file(f"{tmp_path}/link", b"through")
        await refused(client.write_file(f"{tmp_path}/d", b"x"), ErrorCode.INVALID_ARGUMENT, f"{tmp_path}/d")

    with_client(tmp_path, body)
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "real").read_bytes() == b"through"


def test_write_errors_name_the_path(tmp_path: Path) -> None:
    async def body(client: GuestClient) -> None:
        missing = f"{tmp_path}/no/such/dir/f"
        await refused(client.write_file(missing, b"x"), ErrorCode.NOT_FOUND, missing)
        await refused(client.write_file("relative/path", b"x"), ErrorCode.INVALID_ARGUMENT, "absolute")
        await refused(client.write_file(f"{tmp_path}/f", b"x", mode=0o17777), ErrorCode.INVALID_ARGUMENT, "mode")
        await client.call(protocol.WriteFile(path=f"{tmp_path}/big", data=b"\0" * MAX_FILE_CHUNK), protocol.Ok)

    with_client(tmp_path, body)


def test_read_offsets_lengths_and_eof(tmp_path: Path) -> None:
    path = tmp_path / "ten"
    path.write_bytes(b"0123456789")

    async def body(client: GuestClient) -> None:
        read = client.read_file
        assert await read(str(path), 0, 4) == protocol.FileData(data=b"0123", eof=False)
        assert await read(str(path), 4, 6) == protocol.FileData(data=b"456789", eof=True)
        assert await read(str(path), 8, 100) == protocol.FileData(data=b"89", eof=True)
        assert await read(str(path), 20, 5) == protocol.FileData(data=b"", eof=True)
        assert await read(str(path), 0, 0) == protocol.FileData(data=b"", eof=False)
        await refused(read(str(path), 0, MAX_FILE_CHUNK + 1), ErrorCode.INVALID_ARGUMENT, str(path))
        await refused(read(str(path), -1, 1), ErrorCode.INVALID_ARGUMENT)

    with_client(tmp_path, body)


def test_read_a_large_file_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "large"
    data = os.urandom(MAX_FILE_CHUNK * 2 + 12345)
    path.write_bytes(data)

    async def body(client: GuestClient) -> bytes:
        parts, offset = [], 0
        while True:
            chunk = await client.read_file(str(path), offset)
            assert len(chunk.data) <= MAX_FILE_CHUNK
            parts.append(chunk.data)
            offset += len(chunk.data)
            if chunk.eof:
                return b"".join(parts)

    assert with_client(tmp_path, body) == data


def test_read_proc_files_and_refuse_what_is_not_a_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))

    async def body(client: GuestClient) -> None:
        mounts = await client.read_file("/proc/self/mountinfo")  # size 0 in stat, yet it has contents
        assert mounts.eof and b" / " in mounts.data
        await refused(asyncio.wait_for(client.read_file(str(fifo)), 5), ErrorCode.INVALID_ARGUMENT, "fifo")
        await refused(client.read_file(str(tmp_path)), ErrorCode.INVALID_ARGUMENT, "directory")
        await refused(client.read_file(f"{tmp_path}/missing"), ErrorCode.NOT_FOUND, f"{tmp_path}/missing")
        assert (await client.stat(str(fifo))).kind == "fifo"
        assert (await client.stat(str(tmp_path / "sock"))).kind == "socket"
        assert (await client.stat("/dev/null")).kind == "char"

    try:
        with_client(tmp_path, body)
    finally:
        listener.close()


async def answered_meanwhile(address: str, call: Awaitable[Any]) -> Any:
    """Run `call` on one connection while another connection asks `info`: both must be answered (within a
    generous deadline); a call that blocked the server's loop would starve the other connection too."""
    async with await GuestClient.open(address) as other:
        async def info() -> protocol.InfoReply:
            await asyncio.sleep(0.05)  # let the file call reach the server first
            return await other.info()

        outcome, reply = await asyncio.wait_for(
            asyncio.gather(call, info(), return_exceptions=True), 60)
    assert isinstance(reply, protocol.InfoReply), reply
    return outcome


def with_server(tmp_path: Path, body: Callable[[GuestClient, str], Awaitable[Any]]) -> Any:
    with running_server(tmp_path) as srv:
        async def run() -> Any:
            async with await GuestClient.open(srv.address) as client:
                return await body(client, srv.address)

        return asyncio.run(run())


def test_append_to_a_fifo_is_refused_and_never_blocks_the_server(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    async def body(client: GuestClient, address: str) -> None:
        # nobody reads it: a blocking open would wait for a reader forever
        failure = await answered_meanwhile(address, client.write_file(str(fifo), b"hi", append=True))
        assert isinstance(failure, RemoteError), failure
        assert failure.code == ErrorCode.INVALID_ARGUMENT and "fifo" in failure.message, failure.message
        # with a reader it opens, but a full pipe would block the write: refused all the same
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            await refused(asyncio.wait_for(client.write_file(str(fifo), b"x" * 200_000, append=True), 30),
                          ErrorCode.INVALID_ARGUMENT, "fifo", str(fifo))
        finally:
            os.close(reader)
        await client.write_file("/dev/null", b"a device that takes it at once is fine", append=True)

    with_server(tmp_path, body)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_whole_file_write_to_a_device_writes_to_it_and_leaves_the_node(tmp_path: Path) -> None:
    null = tmp_path / "null"
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the null device, made here, not the host's
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD, which this user lacks")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    leader, follower = os.openpty()

    async def body(client: GuestClient, address: str) -> None:
        await client.write_file(str(null), b"taken and dropped")
        # a terminal is a device too: the bytes reach it (and whoever reads its other end)
        await client.write_file(os.ttyname(follower), b"hello, terminal")
        assert os.read(leader, 100) == b"hello, terminal"
        failure = await answered_meanwhile(address, client.write_file(str(fifo), b"hi"))
        assert isinstance(failure, RemoteError) and failure.code == ErrorCode.INVALID_ARGUMENT, failure
        assert "fifo" in failure.message, failure.message

    try:
        with_server(tmp_path, body)
    finally:
        os.close(leader)
        os.close(follower)
    assert stat.S_ISCHR(os.stat(null).st_mode), "the device node was replaced by a file"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_reading_a_device_that_would_block_is_refused_and_never_blocks_the_server(tmp_path: Path) -> None:
    leader, follower = os.openpty()  # a terminal nobody types into: a blocking read waits forever

    async def body(client: GuestClient, address: str) -> None:
        terminal = os.ttyname(follower)
        failure = await answered_meanwhile(address, client.read_file(terminal))
        assert isinstance(failure, RemoteError), failure
        assert failure.code == ErrorCode.UNAVAILABLE and "would block" in failure.message, failure.message
        assert terminal in failure.message
        os.write(leader, b"typed\n")  # once it has something, it is read without waiting
        assert (await asyncio.wait_for(client.read_file(terminal), 30)).data == b"typed\n"
        random = await client.read_file("/dev/urandom", length=1000)
        assert len(random.data) == 1000

    try:
        with_server(tmp_path, body)
    finally:
        os.close(leader)
        os.close(follower)


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK), reason="/dev/kmsg is not readable here")
def test_reading_the_kernel_log_returns_what_it_has_and_never_blocks_the_server(tmp_path: Path) -> None:
    async def body(client: GuestClient, address: str) -> None:
        outcome = await answered_meanwhile(address, client.read_file("/dev/kmsg"))
        if isinstance(outcome, RemoteError):  # an empty log: nothing to read without waiting
            assert outcome.code == ErrorCode.UNAVAILABLE and "would block" in outcome.message, outcome.message
        else:
            assert isinstance(outcome, protocol.FileData) and outcome.eof and outcome.data, outcome

    with_server(tmp_path, body)


def test_offsets_beyond_what_the_kernel_takes_are_invalid(tmp_path: Path) -> None:
    path = tmp_path / "ten"
    path.write_bytes(b"0123456789")

    async def body(client: GuestClient) -> None:
        for offset, length in ((2**63, 1), (2**64 - 1, 1), (2**63 - 1, 10)):
            await refused(client.read_file(str(path), offset, length), ErrorCode.INVALID_ARGUMENT, "offset")
        assert await client.read_file(str(path), 2**63 - 11, 10) == protocol.FileData(data=b"", eof=True)
        await refused(client.write_file(str(path), b"x", mode=2**64 - 1), ErrorCode.INVALID_ARGUMENT, "mode")
        await refused(client.mkdir(f"{tmp_path}/d", mode=-(2**63)), ErrorCode.INVALID_ARGUMENT, "mode")

    with_client(tmp_path, body)


def test_mkdir_modes_parents_and_errors(tmp_path: Path) -> None:
    async def body(client: GuestClient) -> None:
        await client.mkdir(f"{tmp_path}/a", mode=0o777)  # exactly, whatever the server's umask
        assert stat.S_IMODE(os.stat(f"{tmp_path}/a").st_mode) == 0o777
        await refused(client.mkdir(f"{tmp_path}/a"), ErrorCode.ALREADY_EXISTS, f"{tmp_path}/a")
        await refused(client.mkdir(f"{tmp_path}/x/y"), ErrorCode.NOT_FOUND, f"{tmp_path}/x/y")
        await client.mkdir(f"{tmp_path}/x/y/z", mode=0o700, parents=True)
        assert stat.S_IMODE(os.stat(f"{tmp_path}/x/y/z").st_mode) == 0o700
        await client.mkdir(f"{tmp_path}/x/y/z", parents=True)  # existing is fine with parents
        (tmp_path / "file").write_bytes(b"")
        await refused(client.mkdir(f"{tmp_path}/file", parents=True), ErrorCode.ALREADY_EXISTS)
        await refused(client.mkdir("x"), ErrorCode.INVALID_ARGUMENT, "absolute")

    with_client(tmp_path, body)


def test_stat_follows_symlinks_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"12345")
    (tmp_path / "link").symlink_to("target")
    (tmp_path / "dangling").symlink_to("nowhere")

    async def body(client: GuestClient) -> None:
        followed = await client.stat(f"{tmp_path}/link")
        assert (followed.kind, followed.size) == ("file", 5)
        itself = await client.stat(f"{tmp_path}/link", follow=False)
        assert (itself.kind, itself.size) == ("symlink", len("target"))
        assert (await client.stat(f"{tmp_path}/dangling", follow=False)).kind == "symlink"
        await refused(client.stat(f"{tmp_path}/dangling"), ErrorCode.NOT_FOUND, f"{tmp_path}/dangling")
        await refused(client.stat(f"{tmp_path}/x\0y"), ErrorCode.INVALID_ARGUMENT)

    with_client(tmp_path, body)
