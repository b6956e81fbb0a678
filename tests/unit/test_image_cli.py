"""`boxpark image build`'s options, and errors shown as a sentence and a hint, not a traceback."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from boxpark.image import build
from boxpark.image.subp import MissingToolError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_and_flags() -> None:
    args = parse()
    assert args.with_docker is True and args.out is None and not args.force and not args.refresh_base
    assert args.arch in build.ARCHES
    args = parse("--no-docker", "--arch", "arm64", "--out", "/tmp/x", "--force", "-q")
    assert args.with_docker is False and args.arch == "arm64" and args.out == Path("/tmp/x")
    assert args.force and args.quiet
    with pytest.raises(SystemExit):
        parse("--with-docker", "--no-docker")
    with pytest.raises(SystemExit):
        parse("--arch", "riscv64")


def test_errors_are_a_sentence_and_a_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(*args: object, **kwargs: object) -> Path:
        raise MissingToolError("missing tool: mksquashfs", hint="apt-get install squashfs-tools")

    monkeypatch.setattr(build, "build_image", missing)
    assert build.run(parse("--out", "/nonexistent/out")) == 1
    err = capsys.readouterr().err
    assert err == "boxpark image build: missing tool: mksquashfs\nhint: apt-get install squashfs-tools\n"


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: object, **kwargs: object) -> Path:
        raise MissingToolError("missing tool: mksquashfs")

    monkeypatch.setattr(build, "build_image", missing)
    args = parse()
    args.debug = True
    with pytest.raises(MissingToolError):
        build.run(args)


def test_prints_the_image_directory(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = {}

    def fake(out: Path, **kwargs: object) -> Path:
        seen.update(kwargs, out=out)
        return Path(out)

    monkeypatch.setenv("BOXPARK_CACHE", "/c")
    monkeypatch.setattr(build, "build_image", fake)
    assert build.run(parse("--arch", "amd64", "--no-docker", "-q")) == 0
    assert capsys.readouterr().out == "/c/images/amd64-nodocker\n"
    assert seen["with_docker"] is False and seen["progress"] is None
