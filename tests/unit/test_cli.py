"""The `boxpark` command: each command loads only its own group, and errors reach the person as a sentence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boxpark.cli import COMMANDS, build_parser, main
from boxpark.errors import BoxparkError
from boxpark.host.state import StateError

# Runs `main(argv)` and writes the package's modules that were imported, as main returned or exited.
IMPORTS = """
import atexit, json, sys
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(sorted(m for m in sys.modules if m.startswith("boxpark")))))
from boxpark.cli import main
sys.exit(main(sys.argv[2:]))
"""


def imported_by(tmp_path: Path, *argv: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    out = tmp_path / "modules.json"
    env = {**os.environ, "BOXPARK_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", IMPORTS, str(out), *argv], capture_output=True, text=True,
                            env=env, timeout=120)
    return set(json.loads(out.read_text())), result


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[:2] in (["boxpark", "image"], ["boxpark", "guest"])
            or m.startswith("boxpark.host.backends")}


def test_help_loads_no_command_group(tmp_path: Path) -> None:
    modules, result = imported_by(tmp_path, "--help")
    assert result.returncode == 0 and "status" in result.stdout
    assert not heavy(modules)
    assert not [m for m in modules if m.startswith(("boxpark.cli.", "boxpark.host"))]


def test_status_loads_no_image_backend_or_guest_code(tmp_path: Path) -> None:
    modules, result = imported_by(tmp_path, "status")
    assert result.returncode == 3 and result.stdout == "default: stopped\n", result.stderr
    assert "boxpark.cli.machine" in modules  # it ran
    assert not heavy(modules)
    assert "boxpark.host.agent" not in modules


def test_guest_serve_loads_no_host_code(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    out = tmp_path / "modules.json"
    server = subprocess.Popen([sys.executable, "-c", IMPORTS, str(out), "guest", "serve", "--listen", f"unix:{sock}"],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():  # listening: every import of the server is done
            assert time.monotonic() < deadline and server.poll() is None, server.stderr and server.stderr.read()
            time.sleep(0.02)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    modules = set(json.loads(out.read_text()))
    assert "boxpark.guest.server" in modules  # it served
    assert not [m for m in modules if m.startswith(("boxpark.host", "boxpark.image"))]


def test_every_command_parses_and_has_a_function() -> None:
    parser = build_parser()
    lines = {"guest": ["guest", "serve", "--listen", "unix:/x"], "image": ["image", "build"], "vz": ["vz", "sign"],
             "agent": ["agent", "run"], "exec": ["exec", "--", "true"]}
    for name in COMMANDS:
        args = parser.parse_args(lines.get(name, [name]))
        assert args.command == name and callable(args.func)


def test_an_error_is_a_sentence_a_hint_and_an_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["status", "--name", "Not A Name"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("boxpark: bad machine name 'Not A Name'") and "Traceback" not in err
    with pytest.raises(StateError):  # --debug: the traceback instead
        main(["--debug", "status", "--name", "Not A Name"])


def test_the_error_base_carries_hint_and_code() -> None:
    from boxpark.cli.machine import CommandFailed
    from boxpark.host.vzsign import SignError
    from boxpark.image import BuildError

    assert BoxparkError("x").code == 1 and BoxparkError("x").hint == ""
    assert CommandFailed("not running", "start it", 3).code == 3
    assert StateError("bad").code == 2
    assert SignError("no codesign", "install it").hint == "install it"
    assert str(BuildError("broken", hint="rebuild")) == "broken\n  hint: rebuild"  # its own str, the base's fields
    assert BuildError("broken", hint="rebuild").message == "broken"


def test_a_transport_failure_is_a_sentence(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "boxpark", "guest", "call", f"unix:{tmp_path}/none.sock", "info"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.startswith("boxpark: ") and "Traceback" not in result.stderr


def test_the_modules_that_raise_errors_import_no_cli() -> None:
    """The cycles `cli` ↔ `host.boot` and `host.vzsign` ↔ the machine commands were only for error classes."""
    import ast

    import boxpark

    root = Path(boxpark.__file__).parent
    for path in (root / "errors.py", root / "host" / "boot.py", root / "host" / "vzsign.py"):
        imported = {node.module or "" for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)}
        assert not {m for m in imported if m.lstrip(".").startswith(("cli", "commands"))}, path
    errors = ast.parse((root / "errors.py").read_text())
    assert not [n for n in ast.walk(errors) if isinstance(n, ast.ImportFrom) and (n.level or "boxpark" in (n.module or ""))]


def test_status_says_when_the_data_disk_cannot_give_space_back() -> None:
    """One line, only for a data disk known to offer no discard (VZ's may not): not for one that does, nor
    for a machine with no data disk or one not yet mounted (the agent has `disk_discard` None then)."""
    from boxpark.cli.machine import disk_line

    line = disk_line({"disk_discard": False})
    assert line is not None and "cannot give space back" in line and "no discard" in line
    assert disk_line({"disk_discard": True}) is None
    assert disk_line({"disk_discard": None}) is None
    assert disk_line({}) is None
