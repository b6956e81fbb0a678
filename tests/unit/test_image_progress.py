"""A build's progress as a person sees it: plain lines in logs, plus one live line on a real terminal."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import termios
import threading
import time
from collections.abc import Iterator
from typing import TextIO

import pytest

from boxpark.image.progress import ERASE_LINE, Console, Progress

DEADLINE = 60.0  # seconds; only ever waited for a condition, never asserted on


def render(output: str) -> list[str]:
    """What a terminal shows for `output`: \\r returns to column 0, ESC[K clears to the end of the line."""
    screen: list[str] = []
    row, col = "", 0
    for token in re.split(r"(\r|\n|\x1b\[K)", output):
        if token == "\r":
            col = 0
        elif token == "\n":
            screen.append(row)
            row, col = "", 0
        elif token == "\x1b[K":
            row = row[:col]
        elif token:
            row = row[:col] + token + row[col + len(token):]
            col += len(token)
    return screen + ([row] if row else [])


def run_build(progress: Progress, during_step: threading.Event | None = None,
              release: threading.Event | None = None) -> None:
    """Two steps like the builder's, the second waiting for the test where it is told to."""
    with progress.step("inputs", "amd64, with docker"):
        pass
    progress.building("first run: no image in /x yet")
    with progress.step("boxpark layer", "boxpark abc"):
        if during_step is not None and release is not None:
            during_step.set()
            assert release.wait(DEADLINE)
    progress.say("built /x")


PLAIN = re.compile(
    r"\[ *\d+\.\ds\] inputs: amd64, with docker \.\.\.\n"
    r"\[ *\d+\.\ds\] inputs done in \d+\.\d s\n"
    r"\[ *\d+\.\ds\] building: first run: no image in /x yet\n"
    r"\[ *\d+\.\ds\] boxpark layer: boxpark abc \.\.\.\n"
    r"\[ *\d+\.\ds\] boxpark layer done in \d+\.\d s\n"
    r"\[ *\d+\.\ds\] built /x\n"
)


def test_a_stream_that_is_no_terminal_gets_the_plain_lines_only() -> None:
    stream = io.StringIO()
    with Console(stream) as console:
        assert not console.live
        run_build(Progress(console))
    assert PLAIN.fullmatch(stream.getvalue()), stream.getvalue()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_the_prefix_goes_before_every_line() -> None:
    stream = io.StringIO()
    with Console(stream, prefix="  image      ") as console:
        run_build(Progress(console))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6 and all(line.startswith("  image      [") for line in lines)


def test_held_lines_wait_for_a_build_and_are_dropped_without_one() -> None:
    stream = io.StringIO()
    with Console(stream, hold=True) as console:
        progress = Progress(console)
        with progress.step("inputs"):
            pass
        progress.say("up to date: /x")
        assert console.holding and stream.getvalue() == ""
    assert stream.getvalue() == ""  # an up-to-date image: `up` shows none of the check

    stream = io.StringIO()
    with Console(stream, hold=True) as console:
        run_build(Progress(console))
    assert PLAIN.fullmatch(stream.getvalue()), stream.getvalue()  # all of it, the check included, in order


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TextIO, bytearray]]:
    """A real pseudo-terminal, 60 columns wide: the stream to write to, and what arrives at its other end."""
    monkeypatch.setenv("TERM", "xterm")  # not "dumb", whatever runs the tests
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    received = bytearray()

    def read() -> None:  # drain the master, or a full pty buffer would block the writer
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the slave side is closed
                return
            if not data:
                return
            received.extend(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stream = open(slave, "w", encoding="utf-8", closefd=True)
    try:
        yield stream, received
    finally:
        stream.close()
        reader.join(DEADLINE)
        os.close(master)


def wait_for(received: bytearray, text: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while text.encode() not in received:
        assert time.monotonic() < deadline, f"{text!r} never came: {bytes(received)!r}"
        time.sleep(0.01)


def test_a_terminal_gets_a_live_line_that_counts_the_running_steps_seconds(
    terminal: tuple[TextIO, bytearray],
) -> None:
    stream, received = terminal
    during, release = threading.Event(), threading.Event()
    with Console(stream, interval=0.05) as console:
        assert console.live  # found out by itself: the stream is a tty
        build = threading.Thread(target=run_build, args=(Progress(console), during, release))
        build.start()
        try:
            assert during.wait(DEADLINE)
            wait_for(received, ERASE_LINE + "boxpark layer ... 0 s")
            redrawn = ERASE_LINE + "boxpark layer ... 1 s"
            wait_for(received, redrawn)  # redrawn in place as the step runs
            so_far = bytes(received)
            so_far = so_far[: so_far.index(redrawn.encode()) + len(redrawn)]
            on_screen = render(so_far.decode().replace("\r\n", "\n"))
            assert on_screen[-1] == "boxpark layer ... 1 s" and len(on_screen) == 5, on_screen
        finally:
            release.set()
            build.join(DEADLINE)
    wait_for(received, "built /x")
    shown = received.decode().replace("\r\n", "\n")
    deadline = time.monotonic() + DEADLINE
    while not shown.endswith("\n") and time.monotonic() < deadline:  # close()'s erase may still be in flight
        time.sleep(0.01)
        shown = received.decode().replace("\r\n", "\n")
    # Once done, the screen holds exactly the plain lines: the live line left nothing behind.
    assert PLAIN.fullmatch("\n".join(render(shown)) + "\n"), shown


def test_the_live_line_is_cut_to_the_terminals_width(terminal: tuple[TextIO, bytearray]) -> None:
    stream, received = terminal
    name = "a step with a long name " * 5
    with Console(stream) as console:
        progress = Progress(console)
        with progress.step(name):
            wait_for(received, ERASE_LINE + name[:20])
    live = [row for row in received.decode().split(ERASE_LINE) if row.startswith(name[:20])]
    assert live and all(len(row) <= 59 for row in live), live


def test_a_failing_step_takes_its_live_line_with_it(terminal: tuple[TextIO, bytearray]) -> None:
    stream, received = terminal
    with Console(stream) as console:
        progress = Progress(console)
        with pytest.raises(RuntimeError), progress.step("kernel"):
            raise RuntimeError("no network")
        progress.say("after")
    wait_for(received, "after")
    screen = render(received.decode().replace("\r\n", "\n"))
    assert [re.sub(r"^\[ *\d+\.\ds\] ", "", row) for row in screen] == ["kernel ...", "after"], screen


def test_an_announcement_is_shown_even_while_lines_are_held() -> None:
    stream = io.StringIO()
    with Console(stream, hold=True) as console:
        progress = Progress(console)
        progress.say("a detail")
        progress.announce("waiting for another build using /c ...")  # `up` must not wait in silence
        assert re.fullmatch(r"\[ *\d+\.\ds\] a detail\n\[ *\d+\.\ds\] waiting for another build using /c \.\.\.\n",
                            stream.getvalue()), stream.getvalue()
