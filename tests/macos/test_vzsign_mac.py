"""`boxpark vz sign` on a Mac: codesign really records the entitlement, and the launcher starts Boxpark."""

from __future__ import annotations

import os
import site
import subprocess
from pathlib import Path

import pytest

from boxpark.host import vzsign


def test_sign_makes_a_working_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOXPARK_HOME", str(tmp_path))
    monkeypatch.setattr(vzsign, "launcher_path", lambda *a: tmp_path / "bin" / vzsign.LAUNCHER_NAME)
    # outside the venv's bin/ the copy does not find pyvenv.cfg: give it the packages explicitly
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(site.getsitepackages()))
    launcher = vzsign.sign(force=True)
    assert launcher.path == str(tmp_path / "bin" / vzsign.LAUNCHER_NAME)
    shown = subprocess.run(vzsign.sign_commands(Path(launcher.path), Path(launcher.entitlements))[2],
                           capture_output=True, check=True).stdout
    assert vzsign.has_entitlement(shown)
    assert vzsign.find_launcher() == launcher  # recorded: the next `up` uses it without signing again
    out = subprocess.run(vzsign.check_command(Path(launcher.path)), capture_output=True,
                         env=vzsign.agent_environment(), check=True).stdout
    assert out == b"ok\n"
