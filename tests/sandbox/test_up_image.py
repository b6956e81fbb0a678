"""`boxpark up` when the guest image must be built: it shows the build's steps and says why it builds.

Each `up` here starts from a fresh cache hard-linked from the tests' own (its Debian base, kernels, wheels),
without its images: only boxpark's layer is built (seconds), never the Debian base (minutes).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from boxpark.image import build
from tests.machines import image_dir
from tests.upmachine import UpMachine

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("docker") is None,
                                 reason="needs root, unshare and the docker CLI")]

IMAGE_LINE = re.compile(r"  image      \[ *\d+\.\ds\] (.*)")


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError as exc:  # another file system: copy (the base is ~130 MiB)
        if exc.errno not in (errno.EXDEV, errno.EPERM):
            raise
        shutil.copy2(source, target)


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache with everything of the tests' cache but its images, as BOXPARK_CACHE of every command run."""
    image_dir()  # the tests' cache holds a base for today's inputs (built if not: the one slow case)
    source = build.cache_dir()
    cache = Path(tempfile.mkdtemp(prefix=".up-image-test-", dir=source.parent))  # same fs: hard links
    try:
        for entry in source.iterdir():
            if entry.name in ("images", "tmp") or entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.copytree(entry, cache / entry.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(entry), str(cache / entry.name))
        monkeypatch.setenv("BOXPARK_CACHE", str(cache))
        yield cache
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def up_and_down(m: UpMachine) -> list[str]:
    """`up` (it must succeed), then `down`; the image's lines `up` printed, without their times."""
    result = m.up()
    try:
        assert result.returncode == 0, f"{result.stderr}\n{m.logs()}"
    finally:
        down = m.down()
    assert down.returncode == 0, down.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr  # stderr is a pipe: no live line
    stderr = result.stderr.splitlines()
    checking = stderr.index(f"boxpark: checking the guest image ({build.cache_dir()}/images/{build.default_arch()})")
    lines = [match[1] for line in stderr if (match := IMAGE_LINE.fullmatch(line))]
    if lines:  # the build's lines come right after the check, before the agent's
        assert stderr[checking + 1 : checking + 1 + len(lines)] == [l for l in stderr if IMAGE_LINE.fullmatch(l)]
    return lines


def test_up_shows_the_builds_steps_and_why_it_builds(fresh_cache: Path, tmp_path: Path) -> None:
    image = fresh_cache / "images" / build.default_arch()
    m = UpMachine("sandbox", "cpus = 1\n")
    try:
        lines = up_and_down(m)
        assert lines[0] == f"inputs: {build.default_arch()}, with docker ..."
        assert re.fullmatch(r"inputs done in \d+\.\d s", lines[1]), lines
        assert lines[2] == f"building: first run: no image in {image} yet"
        for step in ("kernel", "initramfs", "boxpark layer", "finish"):
            assert any(re.fullmatch(rf"{step}: .* \.\.\.|{step} \.\.\.", line) for line in lines), lines
            assert any(re.fullmatch(rf"{step} done in \d+\.\d s", line) for line in lines), lines
        assert any(line.startswith("base: cached ") for line in lines), lines  # the Debian base was reused
        assert lines[-1].startswith(f"built {image}: ")

        # The image as another checkout with other guest code built it (through the builder's `source`).
        other = tmp_path / "boxpark"
        shutil.copytree(Path(build.__file__).parents[1], other, ignore=shutil.ignore_patterns("__pycache__"))
        with open(other / "guest" / "__init__.py", "a") as f:
            f.write("# another checkout's guest code\n")
        said: list[str] = []
        build.build_image(image, arch=build.default_arch(), source=other, progress=said.append)
        assert any(line.endswith("] building: inputs changed: boxpark's guest code") for line in said), said
        lines = up_and_down(m)
        assert "building: inputs changed: boxpark's guest code" in lines, lines
        assert lines[-1].startswith(f"built {image}: ")

        assert up_and_down(m) == []  # up to date: the check's one line, no build

        said.clear()
        build.build_image(image, arch=build.default_arch(), force=True, progress=said.append)  # image build --force
        assert any(line.endswith("] building: forced (--force)") for line in said), said
    finally:
        m.destroy()
