"""The builder's one door to other programs: rich errors, never a traceback for the user."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from boxpark.image import subp


def test_run_returns_output() -> None:
    assert subp.output([sys.executable, "-c", "print('hi')"]) == "hi\n"


def test_failure_carries_argv_code_and_stderr() -> None:
    with pytest.raises(subp.CommandError) as info:
        subp.run(
            [sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"], hint="try again"
        )
    err = info.value
    assert err.returncode == 3 and err.argv[0] == sys.executable
    assert "boom" in err.stderr and "boom" in str(err) and "exit code 3" in str(err)
    assert err.hint == "try again" and "hint: try again" in str(err)


def test_timeout_is_a_command_error_without_exit_code() -> None:
    with pytest.raises(subp.CommandError) as info:
        subp.run([sys.executable, "-c", "import time; time.sleep(10)"], timeout=0.5)
    assert info.value.returncode is None and "timed out" in str(info.value)


def test_missing_tool_names_the_debian_package() -> None:
    with pytest.raises(subp.MissingToolError) as info:
        subp.require_tools("mksquashfs-not-here", "debootstrap-not-here")
    assert "mksquashfs-not-here" in str(info.value)
    with pytest.raises(subp.MissingToolError) as info2:
        subp.run(["surely-no-such-tool-xyz"])
    assert info2.value.hint == "apt-get install surely-no-such-tool-xyz"


def test_missing_known_tool_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subp, "find_tool", lambda name: None)
    with pytest.raises(subp.MissingToolError) as info:
        subp.require_tools("mksquashfs", "unsquashfs", "debootstrap")
    assert info.value.hint == "apt-get install debootstrap squashfs-tools"


def test_remove_tree(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    (tree / "link").symlink_to("/etc")  # removed as a link, never followed
    subp.remove_tree(tree)
    assert not tree.exists()
    assert Path("/etc").is_dir()
    subp.remove_tree(tree)  # absent: nothing to do
