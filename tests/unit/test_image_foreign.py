"""qemu-user for a foreign-arch root: the builder mounts binfmt_misc and registers qemu-user-static's handler
when it can, and otherwise says which package to install (against a stand-in binfmt_misc directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from boxpark.image import foreign, subp
from boxpark.image.progress import Progress
from boxpark.image.subp import BuildError

CONF = ":qemu-aarch64:M::\\x7f\\x45\\x4c\\x46:\\xff\\xff\\xff\\xff:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF\n"


def test_parse_handler() -> None:
    text = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\nmagic 7f454c46\n"
    assert foreign.parse_handler(text) == foreign.Handler(True, "/usr/libexec/qemu-binfmt/aarch64-binfmt-P", "POF")
    assert foreign.parse_handler("disabled\ninterpreter /x\nflags: \n").enabled is False


def test_registration_line_skips_comments() -> None:
    assert foreign.registration_line("# from qemu\n\n" + CONF) == CONF.strip()
    with pytest.raises(ValueError):
        foreign.registration_line("# nothing\n")


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """qemu-user-static installed (a binfmt.d file and a binary) and binfmt_misc mounted, nothing registered."""
    binfmt_d = tmp_path / "binfmt.d"
    binfmt_d.mkdir()
    (binfmt_d / "qemu-aarch64.conf").write_text(CONF)
    monkeypatch.setattr(foreign, "BINFMT_D", (binfmt_d,))
    monkeypatch.setattr(subp, "find_tool", lambda name: f"/usr/bin/{name}")
    binfmt = tmp_path / "binfmt_misc"
    binfmt.mkdir()
    (binfmt / "register").write_text("")
    return binfmt


def test_the_host_arch_needs_nothing(tmp_path: Path) -> None:
    foreign.ensure_can_run("amd64", "amd64", Progress(None), binfmt=tmp_path / "absent")


def test_registers_the_handler_from_qemu_user_static(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = []

    def write_once(path: Path, text: str) -> None:  # the stand-in kernel: the entry appears
        written.append((path, text))
        (host / "qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n"
                                           "flags: POF\n")

    monkeypatch.setattr(foreign, "write_once", write_once)
    lines: list[str] = []
    foreign.ensure_can_run("arm64", "amd64", Progress(lines.append), binfmt=host)
    assert written == [(host / "register", CONF.strip())]
    assert any("registered qemu-aarch64 with binfmt_misc" in line for line in lines), lines


def test_an_existing_handler_without_the_f_flag_is_explained(host: Path) -> None:
    (host / "qemu-aarch64").write_text("enabled\ninterpreter /usr/bin/qemu-aarch64\nflags: P\n")
    with pytest.raises(BuildError, match="lacks the F flag") as info:
        foreign.ensure_can_run("arm64", "amd64", Progress(None), binfmt=host)
    assert "apt-get install qemu-user-static" in str(info.value.hint)
    assert (host / "register").read_text() == ""


def test_a_disabled_handler_is_explained(host: Path) -> None:
    (host / "qemu-aarch64").write_text("disabled\ninterpreter /x\nflags: F\n")
    with pytest.raises(BuildError, match="disabled") as info:
        foreign.ensure_can_run("arm64", "amd64", Progress(None), binfmt=host)
    assert info.value.hint == f"echo 1 > {host / 'qemu-aarch64'}"


def test_no_qemu_user_static_names_the_package(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subp, "find_tool", lambda name: None)
    with pytest.raises(BuildError, match="through qemu-aarch64-static, which is not installed") as info:
        foreign.ensure_can_run("arm64", "amd64", Progress(None), binfmt=host)
    assert info.value.hint == "apt-get install qemu-user-static"
