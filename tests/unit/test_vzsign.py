"""`boxpark vz sign`: the entitlements plist, the command lines, where the launcher goes, and off-macOS refusals.

codesign itself runs only on macOS (tests/macos/test_vzsign_mac.py).
"""

from __future__ import annotations

import argparse
import plistlib
import sys
from pathlib import Path

import pytest

from boxpark.cli import main
from boxpark.host import vzsign
from boxpark.cli.machine import CommandFailed, _ensure_imported_image
from boxpark.host.config import Config


def test_entitlements_plist_round_trip() -> None:
    data = vzsign.entitlements_plist()
    assert plistlib.loads(data) == {"com.apple.security.virtualization": True}
    assert data.startswith(b"<?xml") and b"<true/>" in data


def test_sign_command_lines(tmp_path: Path) -> None:
    launcher, entitlements = tmp_path / "bin" / "boxpark-vz-python", tmp_path / "entitlements.plist"
    assert vzsign.sign_commands(launcher, entitlements) == [
        ["codesign", "--force", "--sign", "-", "--entitlements", str(entitlements), str(launcher)],
        ["codesign", "--verify", "--strict", str(launcher)],
        ["codesign", "--display", "--entitlements", ":-", str(launcher)],
    ]
    check = vzsign.check_command(launcher)
    assert check[:2] == [str(launcher), "-c"] and "import boxpark.host.agent, Virtualization, dispatch" in check[2]


def test_has_entitlement_reads_codesign_output() -> None:
    shown = b"Executable=/x/boxpark-vz-python\n" + vzsign.entitlements_plist()
    assert vzsign.has_entitlement(shown)
    assert vzsign.has_entitlement(b"\xfa\xde\x71\x71\0\0\0\x99" + vzsign.entitlements_plist())  # the blob header
    assert not vzsign.has_entitlement(plistlib.dumps({"com.apple.security.cs.allow-jit": True}))
    assert not vzsign.has_entitlement(b"")
    assert not vzsign.has_entitlement(b"<plist>broken")


def test_interpreter_binary_prefers_the_framework_app(tmp_path: Path) -> None:
    """In a framework build bin/python3.X is a stub; the entitlement must be on Python.app's binary."""
    app = tmp_path / "Resources" / "Python.app" / "Contents" / "MacOS" / "Python"
    assert vzsign.interpreter_binary(sys.executable, str(tmp_path)) == Path(sys.executable).resolve()
    app.parent.mkdir(parents=True)
    app.write_bytes(b"\xcf\xfa\xed\xfe")
    assert vzsign.interpreter_binary(sys.executable, str(tmp_path)) == app


def test_launcher_goes_into_the_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert vzsign.launcher_path("/v", "/usr") == Path("/v/bin/boxpark-vz-python")
    monkeypatch.setenv("BOXPARK_HOME", str(tmp_path))
    assert vzsign.launcher_path("/usr", "/usr") == tmp_path / "vz" / "boxpark-vz-python"


def test_agent_environment_puts_boxpark_on_the_path() -> None:
    env = vzsign.agent_environment({"PYTHONPATH": "/a", "HOME": "/h"})
    root = str(Path(vzsign.__file__).resolve().parents[2])
    assert env["PYTHONPATH"].split(":") == [root, "/a"] and env["HOME"] == "/h"
    assert vzsign.agent_environment({"PYTHONPATH": root})["PYTHONPATH"] == root


def test_no_launcher_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOXPARK_HOME", str(tmp_path))
    assert vzsign.find_launcher() is None
    (tmp_path / "vz").mkdir()
    (tmp_path / "vz" / "launcher.json").write_text('{"path": "/nope", "source": "/x", "source_sha256": "0", '
                                                   '"entitlements": "/e", "python": "3.11"}')
    assert vzsign.find_launcher() is None


@pytest.mark.skipif(sys.platform == "darwin", reason="the refusal off macOS")
def test_sign_off_macos_says_it_is_for_macos(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(vzsign.SignError, match="`boxpark vz sign` is for macOS.*this host is linux"):
        vzsign.sign()
    with pytest.raises(SystemExit) as exited:
        main(["vz", "sign"])
    assert exited.value.code == 1
    assert "is for macOS" in capsys.readouterr().err


def test_up_on_a_mac_without_an_image_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOXPARK_CACHE", str(tmp_path))
    config = Config(backend="vz", arch="arm64")  # not validated: that refuses vz off macOS
    with pytest.raises(CommandFailed) as caught:
        _ensure_imported_image(config)
    assert f"no arm64 guest image in {tmp_path}/images/arm64" in str(caught.value)
    assert caught.value.hint.startswith("on a Linux machine run `boxpark image build --arch arm64` and "
                                        "`boxpark image export --arch arm64`")
    assert "`boxpark image import FILE`" in caught.value.hint
    (tmp_path / "images" / "arm64").mkdir(parents=True)
    (tmp_path / "images" / "arm64" / "manifest.json").write_text("{}")
    _ensure_imported_image(config)  # an imported image: nothing to say
    _ensure_imported_image(Config(backend="vz", image="/somewhere"))  # a configured image: not checked here


def test_cli_parses_vz_sign() -> None:
    from boxpark.cli import build_parser

    args = build_parser().parse_args(["vz", "sign", "--force"])
    assert isinstance(args, argparse.Namespace) and args.force and args.func.__name__ == "_vz_sign"
