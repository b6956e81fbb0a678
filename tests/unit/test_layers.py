"""The package's layering, as `.importlinter` states it: the contract imports nothing of the package, the
guest only protocol, transport and relay (what its image ships), backends none of the agent's modules, and
no two sibling modules import each other. import-linter reads every import, lazy ones inside functions too."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lint(cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with the repository's contracts over the package importable from `cwd`."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.fail("lint-imports is missing: scripts/setup installs the test extras (import-linter)")
    return subprocess.run([command, "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layers_hold() -> None:
    result = lint()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_guest_module_importing_host_code_breaks_them(tmp_path: Path) -> None:
    """The check is real: the same contracts over a copy of the package where the guest imports the host."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "boxpark", copy / "boxpark", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "boxpark" / "guest" / "leak.py").write_text("from ..host import config  # noqa: F401\n")
    result = lint(cwd=copy, env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0, result.stdout[-2000:]
    assert "the guest imports only protocol, transport and relay BROKEN" in result.stdout
    assert "boxpark.guest.leak -> boxpark.host.config" in result.stdout
