"""`boxpark exec` without -i/-t (`cli.plainexec`) against a real Guest API server: output as it comes, the
exit status, the guest's refusals, a guest that asks for a proof (QEMU's, behind the agent's Guest Proxy),
and the command itself finding the guest's socket through the machine's record."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from boxpark.cli import plainexec
from boxpark.host.guestproxy import GuestProxy
from boxpark.protocol import ErrorCode
from tests.guestserver import RunningServer, running_server

pytestmark = pytest.mark.integration

SECRET = b"s" * 32
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    port = _free_port()
    with running_server(tmp_path, secret=SECRET, tcp_port=port) as srv:
        srv.extra["port"] = port
        yield srv


def run(path: str, argv: list[str], secret: bytes | None = None, **options: Any) -> tuple[int | None, int | None]:
    return plainexec.run(path, secret, argv, env=ENV, cwd="/", rows=24, cols=80, client="test", **options)


def test_output_goes_to_our_stdout_and_stderr_and_the_exit_code_comes_back(
        server: RunningServer, capfd: pytest.CaptureFixture[str]) -> None:
    path = server.address.removeprefix("unix:")
    assert run(path, ["sh", "-c", "echo out; echo err >&2; exit 3"]) == (3, None)
    assert capfd.readouterr() == ("out\n", "err\n")
    assert run(path, ["sh", "-c", "kill -TERM $$"]) == (None, 15)
    assert run(path, ["cat"]) == (0, None)  # its stdin is closed: it ends at once
    big = run(path, ["sh", "-c", "head -c 3000000 /dev/zero"])
    assert big == (0, None) and len(capfd.readouterr().out) == 3_000_000


def test_a_refusal_is_the_guests_sentence(server: RunningServer) -> None:
    with pytest.raises(plainexec.GuestError) as refused:
        run(server.address.removeprefix("unix:"), ["no-such-program-here"])
    assert refused.value.code == ErrorCode.NOT_FOUND and refused.value.code_name == "NOT_FOUND"
    assert "no such program" in refused.value.message


def test_a_guest_that_asks_for_a_proof_behind_the_guest_proxy(server: RunningServer, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    proxy_path = str(tmp_path / "proxy.sock")

    def open_target() -> socket.socket:
        return socket.create_connection(("127.0.0.1", server.extra["port"]))

    proxy = GuestProxy(proxy_path, open_target, refusal=lambda reason: b"")

    async def start() -> None:
        await proxy.start()

    async def stop() -> None:
        proxy.close()

    server.run(start())
    try:
        assert run(proxy_path, ["echo", "proven"], secret=SECRET) == (0, None)
        assert capfd.readouterr().out == "proven\n"
        with pytest.raises(plainexec.GuestError) as refused:
            run(proxy_path, ["true"])
        assert refused.value.code == ErrorCode.UNAUTHENTICATED
        with pytest.raises(plainexec.GuestError) as refused:
            run(proxy_path, ["true"], secret=b"w" * 32)
        assert refused.value.code == ErrorCode.UNAUTHENTICATED
    finally:
        server.run(stop())


def test_boxpark_exec_finds_the_guest_through_the_machine_record(server: RunningServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "m" / "backend").mkdir(parents=True)
    env = {**os.environ, "BOXPARK_HOME": str(home)}
    command = [sys.executable, "-m", "boxpark", "exec", "--name", "m", "--", "sh", "-c", "echo $HOME; exit 4"]
    stopped = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 3 and stopped.stderr.startswith("boxpark: machine 'm' is not running")
    record = {"backend": "sandbox", "api": server.address, "secret_file": None}
    (home / "m" / "backend" / "machine.json").write_text(json.dumps(record))
    ran = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert (ran.returncode, ran.stdout, ran.stderr) == (4, "/root\n", "")
    refused = subprocess.run([*command[:-4], "no-such-program-here"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("boxpark: the guest refused the call (NOT_FOUND): cannot start")


def _machine_home(tmp_path: Path, server: RunningServer) -> dict[str, str]:
    home = tmp_path / "home"
    (home / "m" / "backend").mkdir(parents=True)
    record = {"backend": "sandbox", "api": server.address, "secret_file": None}
    (home / "m" / "backend" / "machine.json").write_text(json.dumps(record))
    return {**os.environ, "BOXPARK_HOME": str(home)}


def test_exec_i_passes_stdin_through_and_closes_it_at_its_end(server: RunningServer, tmp_path: Path) -> None:
    env = _machine_home(tmp_path, server)
    data = os.urandom(3_000_000)
    (tmp_path / "in").write_bytes(data)
    with open(tmp_path / "in", "rb") as stdin:  # a regular file (no poll on it waits), then a pipe
        ran = subprocess.run([sys.executable, "-m", "boxpark", "exec", "-i", "--name", "m", "--", "cat"], env=env,
                             stdin=stdin, capture_output=True, timeout=120)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, data, b"")
    ran = subprocess.run([sys.executable, "-m", "boxpark", "exec", "-i", "--name", "m", "--", "sh", "-c",
                          "read line; echo got $line; exit 5"], env=env, input=b"one\ntwo\n", capture_output=True,
                         timeout=120)
    assert (ran.returncode, ran.stdout) == (5, b"got one\n")


def test_exec_it_runs_on_a_terminal_the_size_of_ours_and_follows_its_changes(server: RunningServer,
                                                                               tmp_path: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios
    import time

    env = _machine_home(tmp_path, server)
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    command = [sys.executable, "-m", "boxpark", "exec", "-it", "--name", "m", "--", "sh", "-c",
               "trap 'stty size; exit 6' WINCH; stty size; while :; do sleep 0.05; done"]
    process = subprocess.Popen(command, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                               preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    seen = b""

    def until(text: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while text not in seen:
            assert time.monotonic() < deadline, seen
            try:
                seen += os.read(master, 4096)
            except OSError:  # EIO: the other side is gone
                assert text in seen, seen
                return

    try:
        until(b"30 100")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))  # SIGWINCH to the command
        until(b"50 160")  # the guest's terminal was resized: its shell's trap says its new size
        assert process.wait(60) == 6
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
