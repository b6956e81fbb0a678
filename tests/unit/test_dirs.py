"""The user's directories: Boxpark's own variable, then XDG's, then the XDG defaults — the same rule for all."""

from __future__ import annotations

from pathlib import Path

import pytest

from boxpark import dirs
from boxpark.host import boot, machinespec, state
from boxpark.image import build

VARIABLES = ("BOXPARK_HOME", "BOXPARK_CACHE", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME")


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_without_variables_the_xdg_defaults_under_home(home: Path) -> None:
    assert dirs.config_home() == state.config_home() == home / ".config" / "boxpark"
    assert dirs.data_home() == state.data_home() == home / ".local" / "share" / "boxpark"
    assert dirs.cache_home() == build.cache_dir() == home / ".cache" / "boxpark"


def test_the_xdg_variables_move_each_directory(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for variable, where in (("XDG_CONFIG_HOME", "c"), ("XDG_DATA_HOME", "d"), ("XDG_CACHE_HOME", "k")):
        monkeypatch.setenv(variable, str(tmp_path / where))
    assert state.config_home() == tmp_path / "c" / "boxpark"
    assert state.data_home() == tmp_path / "d" / "boxpark"
    assert build.cache_dir() == tmp_path / "k" / "boxpark"
    assert build.default_image_dir("amd64", True) == tmp_path / "k" / "boxpark" / "images" / "amd64"
    # the fallbacks for a host without the image builder follow the same rule
    assert boot._image_dir("amd64") == str(tmp_path / "k" / "boxpark" / "images" / "amd64")
    assert machinespec._default_image_dir("amd64") == str(tmp_path / "k" / "boxpark" / "images" / "amd64")


def test_boxparks_own_variables_win(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "d"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "k"))
    monkeypatch.setenv("BOXPARK_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("BOXPARK_CACHE", str(tmp_path / "cache"))
    assert state.data_home() == tmp_path / "state"
    assert build.cache_dir() == tmp_path / "cache"


@pytest.mark.parametrize("value", ["", "relative/dir"])
def test_an_empty_or_relative_xdg_variable_is_ignored(home: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    for variable in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(variable, value)
    assert state.config_home() == home / ".config" / "boxpark"
    assert state.data_home() == home / ".local" / "share" / "boxpark"
    assert build.cache_dir() == home / ".cache" / "boxpark"
