"""The process calls over a real server and real processes: exec (unary and interactive, pipes and ttys),
launch with logs, attach, wait, signal, list, the events they emit, and stopping everything.

Each test's processes are ended through the server's supervisor (pidfds, whole process groups) when the test
finishes; the few that escape their group on purpose are killed by the pid they reported.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest

from boxpark import protocol
from boxpark.guest import capture, reaper
from boxpark.host.client import GuestClient, RemoteError
from boxpark.protocol import ErrorCode, Exit, LogBatch, LogRecord
from boxpark.transport import dial
from tests.guestserver import RunningServer, refused, running_server, serve_process

pytestmark = pytest.mark.integration


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path) as srv:
        try:
            yield srv
        finally:
            srv.run(srv.server.processes.stop_all(grace=0.5))
            assert not srv.server.processes.supervisor.children


def talk(srv: RunningServer, body: Callable[[GuestClient], Awaitable[Any]], timeout: float = 120) -> Any:
    """Run `body(client)` against the server on this thread's own loop."""
    async def main() -> Any:
        async with await GuestClient.open(srv.address) as client:
            return await asyncio.wait_for(body(client), timeout)

    return asyncio.run(main())


def records_of(frames: list[Any]) -> list[LogRecord]:
    return [record for frame in frames if isinstance(frame, LogBatch) for record in frame.records]


async def frames_of(stream: Any) -> list[Any]:
    return [frame async for frame in stream]


def gone(pid: int, timeout: float = 60.0) -> bool:
    """True once `pid` has exited (no longer exists, or is a zombie awaiting whoever reaps it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except (FileNotFoundError, ProcessLookupError):  # the latter: reaped between our open and read
            return True
        time.sleep(0.02)
    return False


def wait_for_file(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def kill_stray(pid: int, marker: str) -> None:
    """Kill a process a test let escape its group, only if it still is the one the test started."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if marker.encode() in f.read():
                os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


# ------------------------------------------------------------------------------------ unary exec


def test_exec_returns_code_and_bytes_safe_output_with_env_cwd_and_stdin(guest: RunningServer,
                                                                      tmp_path: Path) -> None:
    async def body(client: GuestClient) -> list[protocol.ExecResult]:
        return [
            await client.exec(["sh", "-c", r"printf 'a\000\377b\n'; printf oops >&2; exit 3"]),
            await client.exec(["sh", "-c", "echo $GREETING; pwd"], env={"GREETING": "hi", "PATH": os.defpath},
                              cwd=str(tmp_path)),
            await client.exec(["cat"], stdin=b"\x00fed through stdin\xff"),
            await client.exec(["echo", "$HOME; ls *"]),  # argv is never a shell
            await client.exec(["sh", "-c", "kill -TERM $$"]),
        ]

    binary, env, stdin, literal, killed = talk(guest, body)
    assert (binary.code, binary.signal, binary.stdout, binary.stderr) == (3, None, b"a\x00\xffb\n", b"oops")
    assert env.stdout == f"hi\n{tmp_path}\n".encode() and env.code == 0
    assert stdin.stdout == b"\x00fed through stdin\xff"
    assert literal.stdout == b"$HOME; ls *\n"
    assert (killed.code, killed.signal, killed.timed_out) == (None, signal.SIGTERM, False)


def test_exec_finds_its_program_on_the_path_it_is_given_and_hands_on_only_its_stdio(guest: RunningServer,
                                                                                   tmp_path: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        tool = tmp_path / name / "boxpark-which-tool"
        tool.write_text(f"#!/bin/sh\necho {name}\n")
        tool.chmod(0o755)
    inherited = os.open(os.devnull, os.O_RDONLY)  # inheritable, as an fd a server inherits at its start
    os.set_inheritable(inherited, True)

    async def body(client: GuestClient) -> list[protocol.ExecResult]:
        results = []
        for name in ("one", "two", "one"):  # the same program on another PATH is another program
            path = f"{tmp_path / name}:{os.defpath}"
            results.append(await client.exec(["boxpark-which-tool"], env={"PATH": path}))
        results.append(await client.exec(["sh", "-c", "ls /proc/$$/fd; grep SigIgn /proc/$$/status"]))
        return results

    try:
        one, two, again, fds = talk(guest, body)
    finally:
        os.close(inherited)
    assert [r.stdout for r in (one, two, again)] == [b"one\n", b"two\n", b"one\n"]
    listed, ignored = fds.stdout.decode().rsplit("SigIgn:", 1)
    assert sorted(int(fd) for fd in listed.split()) == [0, 1, 2]
    assert not int(ignored, 16) & (1 << (signal.SIGPIPE - 1))  # SIGPIPE back at its default, as Popen does


def test_exec_feeds_large_stdin_while_reading_large_output(guest: RunningServer) -> None:
    data = os.urandom(3 * 1024 * 1024)
    result = talk(guest, lambda client: client.exec(["cat"], stdin=data))
    assert result.code == 0 and result.stdout == data and not result.truncated


def test_exec_timeout_kills_the_child_and_its_children(guest: RunningServer) -> None:
    # the child sleeps far longer than `talk` waits: the call returns only because the timeout killed it
    result = talk(guest, lambda client: client.exec(["sh", "-c", "sleep 600 & echo $!; sleep 600"], timeout=0.5))
    assert result.timed_out and result.signal == signal.SIGKILL and result.code is None
    grandchild = int(result.stdout)
    try:
        assert gone(grandchild), "the timeout left the child's own child running"
    finally:
        kill_stray(grandchild, "sleep")


def test_exec_refusals_name_what_is_wrong_and_the_server_keeps_serving(guest: RunningServer,
                                                                       tmp_path: Path) -> None:
    async def body(client: GuestClient) -> tuple[list[RemoteError], protocol.ExecResult]:
        errors = []
        for argv, cwd in ((["no-such-program-xyz"], None), (["/nonexistent/bin/tool"], None),
                          (["true"], str(tmp_path / "missing")), ([], None), ([str(tmp_path)], None)):
            with pytest.raises(RemoteError) as caught:
                await client.exec(argv, cwd=cwd)
            errors.append(caught.value)
        return errors, await client.exec(["true"])

    (program, path, cwd, empty, directory), after = talk(guest, body)
    assert program.code == ErrorCode.NOT_FOUND and "no-such-program-xyz" in program.message
    assert path.code == ErrorCode.NOT_FOUND and "/nonexistent/bin/tool" in path.message
    assert cwd.code == ErrorCode.NOT_FOUND and "missing" in cwd.message
    assert empty.code == ErrorCode.INVALID_ARGUMENT
    assert directory.code == ErrorCode.PERMISSION_DENIED and str(tmp_path) in directory.message
    assert after.code == 0


def test_exec_output_past_the_frame_limit_is_cut_and_flagged(guest: RunningServer) -> None:
    size = protocol.MAX_FRAME + 4 * 1024 * 1024
    result = talk(guest, lambda client: client.exec(["head", "-c", str(size), "/dev/zero"]))
    assert result.code == 0 and result.truncated
    assert len(result.stdout) == capture.OUTPUT_CAP and not result.stdout.strip(b"\0")


def test_exec_does_not_wait_forever_for_a_daemon_holding_its_pipe(guest: RunningServer, tmp_path: Path) -> None:
    marker, go = tmp_path / "still-alive", tmp_path / "go"
    # the daemon writes only once told to, after the call returned: a call waiting for its pipe never returns
    script = (f"setsid sh -c 'while [ ! -e {go} ]; do sleep 0.02; done; echo late; echo late >&2; touch {marker}' "
              f"& echo $!")
    result = talk(guest, lambda client: client.exec(["sh", "-c", script]))
    try:
        assert result.code == 0 and not marker.exists()
        go.touch()
        wait_for_file(marker)
        assert marker.exists(), "the daemon died writing to the pipe the call no longer reads"
    finally:
        kill_stray(int(result.stdout), "late")


def test_a_unary_exec_ends_with_its_whole_group_when_its_client_goes_away(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"yes > /dev/null & echo $$ $! > {pids}.tmp && mv {pids}.tmp {pids}; wait"
    with serve_process(tmp_path) as (address, _):
        client = subprocess.Popen([sys.executable, "-m", "boxpark", "guest", "call", address, "exec", "--json",
                                   json.dumps({"argv": ["sh", "-c", script]})],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not pids.exists():
                assert client.poll() is None and time.monotonic() < deadline, "the exec never started"
                time.sleep(0.02)
        finally:
            client.kill()  # the client goes away in the middle of its call, as `timeout 2 boxpark ...` does
            client.wait()
        shell, flood = map(int, pids.read_text().split())
        try:
            assert gone(shell, timeout=60) and gone(flood, timeout=60), "the exec outlived its client"
        finally:
            kill_stray(flood, "yes")


def test_exec_and_wait_refuse_a_timeout_that_is_not_a_finite_number_of_seconds(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> None:
        await client.launch("sleeper", ["sleep", "60"])
        for timeout in (math.nan, math.inf, -math.inf, -1.0):
            await refused(client.exec(["true"], timeout=timeout), ErrorCode.INVALID_ARGUMENT, "timeout",
                          str(timeout))
            await refused(client.wait("sleeper", timeout=timeout), ErrorCode.INVALID_ARGUMENT, "timeout",
                          str(timeout))
        assert (await client.exec(["true"], timeout=30)).code == 0  # and the server goes on

    talk(guest, body)


def test_calls_sent_behind_a_running_unary_exec_are_answered_after_it_in_their_order(guest: RunningServer,
                                                                                    tmp_path: Path) -> None:
    go = tmp_path / "go"
    first = protocol.Exec(argv=["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.01; done; echo first"])

    async def body(client: GuestClient) -> list[protocol.Message | None]:
        channel, _ = await dial(guest.address, then=first)
        try:
            channel.send(protocol.Info())  # a quick call, answered on arrival when nothing is in flight
            channel.send(protocol.Exec(argv=["echo", "second"]))
            await client.info()  # on another connection: the server has read what we sent, or will
            go.touch()
            return [await channel.recv() for _ in range(3)]
        finally:
            channel.close()

    replies = talk(guest, body)
    assert [type(reply) for reply in replies] == [protocol.ExecResult, protocol.InfoReply, protocol.ExecResult]
    assert [replies[0].stdout, replies[2].stdout] == [b"first\n", b"second\n"]  # type: ignore[union-attr]


def test_a_unary_exec_with_calls_queued_behind_it_still_ends_when_its_client_goes_away(guest: RunningServer,
                                                                                      tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"echo $$ > {pids}.tmp && mv {pids}.tmp {pids}; exec sleep 3600"

    async def body(client: GuestClient) -> None:
        channel, _ = await dial(guest.address, then=protocol.Exec(argv=["sh", "-c", script]))
        channel.send(protocol.Info())
        deadline = time.monotonic() + 60
        while not pids.exists():
            assert time.monotonic() < deadline, "the exec never started"
            await asyncio.sleep(0.02)
        channel.close()

    talk(guest, body)
    shell = int(pids.read_text())
    try:
        assert gone(shell), "the exec outlived its client"
    finally:
        kill_stray(shell, "sleep")


def test_a_wait_ends_when_its_client_goes_away(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> None:
        await client.launch("sleeper", ["sleep", "3600"])
        channel, _ = await dial(guest.address, then=protocol.Wait(name="sleeper"))
        channel.close()

    talk(guest, body)
    deadline = time.monotonic() + 60
    # Only the call's own connection could be left: the client of `talk` has closed too.
    while guest.server._connections:
        assert time.monotonic() < deadline, "the server still holds the connection of a client that went away"
        time.sleep(0.02)


def test_exec_of_many_processes_at_once_all_report_their_own_status(guest: RunningServer) -> None:
    stop = threading.Event()

    def orphan_reaper() -> None:  # what PID 1 does on SIGCHLD, as often as it can
        while not stop.is_set():
            reaper.reap_orphans()
            time.sleep(0.001)

    thread = threading.Thread(target=orphan_reaper)
    thread.start()
    try:
        async def body(client: GuestClient) -> list[protocol.ExecResult]:
            clients = [await GuestClient.open(guest.address) for _ in range(8)]
            try:
                return list(await asyncio.gather(*(clients[n % 8].exec(["sh", "-c", f"exit {n % 100}"])
                                                   for n in range(200))))
            finally:
                for c in clients:
                    await c.close()

        results = talk(guest, body)
    finally:
        stop.set()
        thread.join()
    assert [r.code for r in results] == [n % 100 for n in range(200)]


def test_pid1_reaps_an_orphan_it_does_not_own() -> None:
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 5"], os.environ)
    assert gone(pid)
    reaped = reaper.reap_orphans()
    assert (pid, 5 << 8) in reaped


# ---------------------------------------------------------------------------------- interactive


def test_interactive_pipes_carry_stdin_output_and_exit(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> tuple[bytes, bytes, Exit]:
        process = await client.exec_interactive(["sh", "-c", "cat; echo to-stderr >&2; exit 4"])
        process.write(b"line one\n")
        return await process.communicate(b"and the rest")

    out, err, exit = talk(guest, body)
    assert (out, err, exit) == (b"line one\nand the rest", b"to-stderr\n", Exit(code=4))


def test_interactive_send_signal(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> Exit:
        process = await client.exec_interactive(["sleep", "60"])
        process.send_signal(signal.SIGINT)
        return (await process.communicate())[2]

    assert talk(guest, body) == Exit(code=None, signal=signal.SIGINT)


async def read_until(process: Any, needle: bytes, seen: bytearray) -> None:
    async for chunk in process.output():
        seen += chunk.data
        if needle in seen:
            return
    raise AssertionError(f"{needle!r} never came; got {bytes(seen)!r}")


def test_tty_has_its_size_follows_resizes_and_is_the_controlling_terminal(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> tuple[bytes, Exit | None]:
        process = await client.exec_interactive(["sh"], tty=True, rows=30, cols=100)
        seen = bytearray()
        process.write(b"stty size; (: </dev/tty) && echo has-a-controlling-tty\n")
        await read_until(process, b"\nhas-a-controlling-tty", seen)
        process.resize(50, 132)
        process.write(b"stty size\n")
        await read_until(process, b"50 132", seen)
        process.write(b"exit 7\n")
        async for chunk in process.output():
            seen += chunk.data
        return bytes(seen), process.exit

    seen, exit = talk(guest, body)
    assert b"30 100" in seen and b"50 132" in seen
    assert exit == Exit(code=7)


def test_tty_process_gets_sighup_when_the_connection_closes(guest: RunningServer, tmp_path: Path) -> None:
    marker = tmp_path / "hup"

    async def body(client: GuestClient) -> int:
        process = await client.exec_interactive(
            ["sh", "-c", f"trap 'echo got-hup > {marker}; exit 3' HUP; echo ready; while :; do sleep 0.05; done"],
            tty=True)
        await read_until(process, b"ready", bytearray())
        process.close()
        return process.pid

    pid = talk(guest, body)
    assert gone(pid)
    wait_for_file(marker)
    assert marker.read_text() == "got-hup\n"


def test_tty_stdin_eof_is_the_terminal_eof(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> tuple[bytes, Exit | None]:
        process = await client.exec_interactive(["cat"], tty=True)
        process.write(b"typed\n")
        process.close_stdin()
        seen = bytearray()
        async for chunk in process.output():
            assert chunk.fd == 1
            seen += chunk.data
        return bytes(seen), process.exit

    seen, exit = talk(guest, body)
    assert b"typed\r\ntyped\r\n" in seen and exit == Exit(code=0)


def test_named_interactive_process_is_listed_and_signalled_by_name(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> tuple[list[protocol.ProcessInfo], RemoteError, Exit, list[str]]:
        process = await client.exec_interactive(["sleep", "60"], name="napper")
        listed = await client.list_processes()
        with pytest.raises(RemoteError) as taken:
            await client.exec_interactive(["true"], name="napper")
        await client.signal("napper", signal.SIGTERM)
        _, _, exit = await process.communicate()
        after = [p.name for p in await client.list_processes()]
        return listed, taken.value, exit, after

    listed, taken, exit, after = talk(guest, body)
    assert [(p.name, p.kind, p.running, p.argv) for p in listed] == [("napper", "interactive", True, ["sleep", "60"])]
    assert taken.code == ErrorCode.ALREADY_EXISTS
    assert exit == Exit(code=None, signal=signal.SIGTERM)
    assert after == []


# -------------------------------------------------------------------------------------- services


def test_launch_connect_delivers_200000_lines_in_order(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> list[Any]:
        stream = await client.launch_connect("counter", ["seq", "1", "200000"], ring_records=250_000)
        return await frames_of(stream)

    frames = talk(guest, body)
    assert frames[-1] == Exit(code=0)
    assert sum(frame.dropped for frame in frames[:-1]) == 0
    records = records_of(frames)
    assert [r.seq for r in records] == list(range(1, 200_001))
    assert [r.data for r in records] == [str(n).encode() for n in range(1, 200_001)]
    assert all(len(frame.records) <= 1000 for frame in frames[:-1])


def test_launch_records_both_streams_long_lines_and_the_last_unterminated_line(guest: RunningServer) -> None:
    long = "x" * 40_000
    script = f"echo out1; echo err1 >&2; sleep 0.1; printf '{long}\\n'; sleep 0.1; printf 'no newline'"

    async def body(client: GuestClient) -> list[Any]:
        return await frames_of(await client.launch_connect("mixed", ["sh", "-c", script]))

    frames = talk(guest, body)
    records = records_of(frames)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert [(r.stream, r.data) for r in records[:2]] in ([(1, b"out1"), (2, b"err1")], [(2, b"err1"), (1, b"out1")])
    pieces = records[2:-1]
    assert [len(r.data) for r in pieces] == [16384, 16384, 40_000 - 32768]
    assert [r.partial for r in pieces] == [True, True, False]
    assert b"".join(r.data for r in pieces) == long.encode()
    assert (records[-1].data, records[-1].partial) == (b"no newline", False)
    assert frames[-1] == Exit(code=0)


def test_a_ring_that_overflowed_says_how_many_records_were_dropped(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> tuple[list[Any], list[protocol.ProcessInfo]]:
        await client.launch("spill", ["seq", "1", "1000"], ring_records=100)
        await client.wait("spill", timeout=60)
        return await frames_of(await client.attach("spill", since=0, follow=False)), await client.list_processes()

    frames, listed = talk(guest, body)
    assert frames[0].dropped == 900
    assert [r.data for r in records_of(frames)] == [str(n).encode() for n in range(901, 1001)]
    assert frames[-1] == Exit(code=0)
    assert listed[0].last_seq == 1000


def test_launch_refuses_a_ring_over_the_servers_limits_and_names_the_limit(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> list[protocol.ProcessInfo]:
        for field, value, limit in (("ring_records", 10**12, protocol.MAX_RING_RECORDS),
                                    ("ring_bytes", 10**15, protocol.MAX_RING_BYTES),
                                    ("ring_records", 0, protocol.MAX_RING_RECORDS),
                                    ("ring_bytes", -1, protocol.MAX_RING_BYTES)):
            await refused(client.launch("greedy", ["yes"], **{field: value}), ErrorCode.INVALID_ARGUMENT,
                          field, str(limit), str(value))
        await client.launch("greedy", ["true"], ring_records=protocol.MAX_RING_RECORDS,
                            ring_bytes=protocol.MAX_RING_BYTES)
        await client.wait("greedy", timeout=30)
        return await client.list_processes()

    assert [(p.name, p.running, p.code) for p in talk(guest, body)] == [("greedy", False, 0)]


def test_a_replaced_service_lets_go_of_its_ring(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> None:
        await client.launch("chatty", ["seq", "1", "100000"])
        await client.wait("chatty", timeout=30)

    talk(guest, body)
    ring = weakref.ref(guest.server.processes._named["chatty"].ring)
    assert len(ring()) == 100_000
    talk(guest, lambda client: client.launch("chatty", ["true"], replace=True))
    assert ring() is None, "the replaced service's log ring is still held (waiting for a cyclic collection?)"


def test_a_flood_into_the_largest_ring_keeps_the_server_within_bounds(tmp_path: Path) -> None:
    """`yes` into a ring at both maximums: the server's memory levels off instead of growing with the flood,
    and what the ring held is given back once a replace discards it."""
    def rss(pid: int) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    async def last_seq(client: GuestClient) -> int:
        return (await client.list_processes())[0].last_seq

    with serve_process(tmp_path) as (address, server):
        async def body() -> tuple[int, int, int]:
            async with await GuestClient.open(address) as client:
                baseline = rss(server.pid)
                await client.launch("flood", ["yes"], ring_records=protocol.MAX_RING_RECORDS,
                                    ring_bytes=protocol.MAX_RING_BYTES)
                peak = 0
                deadline = time.monotonic() + 300
                # Until the ring has been filled and overwritten several times over.
                while await last_seq(client) < 5 * protocol.MAX_RING_RECORDS:
                    assert time.monotonic() < deadline, "yes did not fill the ring five times in 300 s"
                    peak = max(peak, rss(server.pid))
                    await asyncio.sleep(0.1)
                await client.signal("flood", signal.SIGKILL)
                await client.wait("flood", timeout=60)
                peak = max(peak, rss(server.pid))
                await client.launch("flood", ["true"], replace=True)
                deadline = time.monotonic() + 60
                while (after := rss(server.pid)) > baseline + (peak - baseline) // 2:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                return baseline, peak, after

        baseline, peak, after = asyncio.run(body())
    # A full ring of one-byte lines is ~100 MB of records (~100 bytes each); 1.77 GB was the unbounded case.
    assert peak < 512 * 1024 * 1024, f"the server grew to {peak >> 20} MiB"
    assert after <= baseline + (peak - baseline) // 2, (
        f"the discarded ring was not given back: {baseline >> 20} MiB before, {peak >> 20} MiB at the peak, "
        f"{after >> 20} MiB a minute after the replace")


def test_attach_resumes_with_no_gap_and_no_duplicate(guest: RunningServer, tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = f"seq 1 500; while [ ! -e {go} ]; do sleep 0.02; done; seq 501 700"

    async def body(client: GuestClient) -> tuple[list[LogRecord], list[Any], list[Any], list[Any]]:
        first: list[LogRecord] = []
        stream = await client.launch_connect("talker", ["sh", "-c", script])
        async for frame in stream:
            first += frame.records
            if len(first) >= 300:
                break
        stream.close()  # the host goes away mid-stream (having handled 300 records); the service runs on
        first = first[:300]
        last = first[-1].seq
        caught_up = await frames_of(await client.attach("talker", since=last, follow=False))
        go.touch()
        rest = await frames_of(await client.attach("talker", since=last))
        again = await frames_of(await client.attach("talker", since=650, follow=False))
        return first, caught_up, rest, again

    first, caught_up, rest, again = talk(guest, body)
    assert [r.seq for r in first + records_of(caught_up)] == list(range(1, 501))
    assert isinstance(caught_up[-1], protocol.EndOfStream)
    assert [r.data for r in first + records_of(rest)] == [str(n).encode() for n in range(1, 701)]
    assert rest[-1] == Exit(code=0)
    assert [r.seq for r in records_of(again)] == list(range(651, 701)) and again[-1] == Exit(code=0)


def test_attach_wait_and_signal_of_an_unknown_name_are_not_found(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> list[RemoteError]:
        errors = []
        for call in (client.attach("ghost"), client.wait("ghost"), client.signal("ghost", signal.SIGTERM)):
            with pytest.raises(RemoteError) as caught:
                await call
            errors.append(caught.value)
        return errors

    assert [e.code for e in talk(guest, body)] == [ErrorCode.NOT_FOUND] * 3


def test_launch_names_replace_and_the_host_leaving_does_not_stop_a_service(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        stream = await client.launch_connect("svc", ["sleep", "60"])
        first_pid = stream.first.pid
        stream.close()
        with pytest.raises(RemoteError) as running:
            await client.launch("svc", ["true"], replace=True)
        seen["running"] = running.value.code
        seen["still"] = [(p.name, p.running) for p in await client.list_processes()]
        with pytest.raises(RemoteError) as timeout:
            await client.wait("svc", timeout=0.2)
        seen["timeout"] = timeout.value.code
        await client.signal("svc", signal.SIGTERM)
        seen["exit"] = await client.wait("svc", timeout=60)
        with pytest.raises(RemoteError) as exited:
            await client.launch("svc", ["true"])
        seen["exited"] = exited.value
        again = await client.launch("svc", ["sh", "-c", "echo second"], replace=True)
        seen["pids"] = (first_pid, again.pid)
        await client.wait("svc", timeout=60)
        seen["records"] = records_of(await frames_of(await client.attach("svc", follow=False)))
        return seen

    seen = talk(guest, body)
    assert seen["running"] == ErrorCode.ALREADY_EXISTS
    assert seen["still"] == [("svc", True)]
    assert seen["timeout"] == ErrorCode.TIMEOUT
    assert seen["exit"] == Exit(code=None, signal=signal.SIGTERM)
    assert seen["exited"].code == ErrorCode.ALREADY_EXISTS and "replace" in seen["exited"].message
    assert seen["pids"][0] != seen["pids"][1]
    assert [(r.seq, r.data) for r in seen["records"]] == [(1, b"second")]


def test_signal_a_whole_group_and_every_exit_is_an_event(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> tuple[Exit, list[int]]:
        await client.launch("family", ["sh", "-c", "sleep 60 & echo $!; sleep 60 & echo $!; wait"])
        children: list[int] = []
        async for frame in await client.attach("family"):
            children += [int(r.data) for r in frame.records]
            if len(children) == 2:
                break
        await client.signal("family", signal.SIGTERM, group=True)
        return await client.wait("family", timeout=60), children

    exit, children = talk(guest, body)
    assert exit == Exit(code=None, signal=signal.SIGTERM)
    assert all(gone(pid) for pid in children)
    events = [frame.event for frame in guest.server.events.since(0)]
    exited = [e for e in events if isinstance(e, protocol.ProcessExited)]
    assert [(e.name, e.code, e.signal) for e in exited] == [("family", exit.code, exit.signal)]


def test_notify_socket_is_in_the_service_environment(guest: RunningServer, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")

    async def body(client: GuestClient) -> list[Any]:
        return await frames_of(await client.launch_connect("notified", ["sh", "-c", "echo $NOTIFY_SOCKET"],
                                                           notify_socket=path))

    assert [r.data for r in records_of(talk(guest, body))] == [path.encode()]


def test_stop_all_terms_then_kills_what_ignores_it(guest: RunningServer) -> None:
    async def body(client: GuestClient) -> None:
        await client.launch("polite", ["sleep", "60"])
        await client.launch("stubborn", ["sh", "-c", "trap '' TERM; echo armed; while :; do sleep 0.05; done"])
        async for frame in await client.attach("stubborn"):
            if frame.records:
                break

    talk(guest, body)
    guest.run(guest.server.processes.stop_all(grace=0.5), timeout=60)  # a stop_all that hangs fails here
    infos = {p.name: p for p in guest.run(guest.server.processes.list(None, protocol.ListProcesses())).processes}
    assert (infos["polite"].running, infos["polite"].signal) == (False, signal.SIGTERM)
    assert (infos["stubborn"].running, infos["stubborn"].signal) == (False, signal.SIGKILL)
