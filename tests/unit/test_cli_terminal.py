"""The terminal of the interactive front-ends: stdin pumped from a pipe, a file or /dev/null, and stoppable."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

# Pumps this process's stdin until its end and prints the bytes' count and sha256; with "cancel", stops the
# pump once it has seen the first chunk instead.
PUMP = """
import asyncio, hashlib, sys
from boxpark.cli.terminal import pump_stdin

async def go() -> None:
    got = bytearray()
    first = asyncio.Event()
    async def send(data: bytes) -> None:
        got.extend(data)
        first.set()
        await asyncio.sleep(0)
    pumping = asyncio.ensure_future(pump_stdin(send))
    if sys.argv[1:] == ["cancel"]:
        await first.wait()
        pumping.cancel()
    await asyncio.gather(pumping, return_exceptions=True)
    print(len(got), hashlib.sha256(got).hexdigest(), flush=True)

asyncio.run(go())
"""

DATA = os.urandom(300_000) + b"the end\n"  # several reads' worth


def pumped(stdin: int | IO[bytes], *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", PUMP, *args], stdin=stdin, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_regular_file_is_pumped_whole(tmp_path: Path) -> None:
    # epoll refuses regular files: a pump that only waits for readability fails on `boxpark exec -i < FILE`
    (tmp_path / "in").write_bytes(DATA)
    with open(tmp_path / "in", "rb") as f:
        assert pumped(f) == f"{len(DATA)} {hashlib.sha256(DATA).hexdigest()}\n"


def test_dev_null_is_an_empty_stdin() -> None:
    assert pumped(subprocess.DEVNULL) == f"0 {hashlib.sha256(b'').hexdigest()}\n"


def test_a_pipe_is_pumped_whole() -> None:
    result = subprocess.run([sys.executable, "-c", PUMP], input=DATA, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"{len(DATA)} {hashlib.sha256(DATA).hexdigest()}\n"


def test_cancelling_stops_the_pump_while_stdin_stays_open() -> None:
    # a read(0) on a thread cannot be cancelled: the process would stay until stdin ended, which here is never
    reader, writer = os.pipe()
    try:
        process = subprocess.Popen([sys.executable, "-c", PUMP, "cancel"], stdin=reader, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        os.close(reader)
        os.write(writer, b"hello")
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert out == f"5 {hashlib.sha256(b'hello').hexdigest()}\n"
    finally:
        os.close(writer)


@pytest.mark.parametrize("columns, lines", [(None, None), ("132", None), (None, "50"), ("132", "50"), ("0", "x"),
                                            ("-1", "-1")])
def test_the_size_is_shutils_without_shutil(monkeypatch: pytest.MonkeyPatch, columns: str | None,
                                            lines: str | None) -> None:
    import shutil

    from boxpark.cli.terminal import size

    for name, value in (("COLUMNS", columns), ("LINES", lines)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    expected = shutil.get_terminal_size((80, 24))
    assert size() == (expected.lines, expected.columns)
