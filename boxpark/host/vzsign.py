"""`boxpark vz sign`: a Python allowed to use Virtualization.framework, for the machine agent on a Mac.

VZ runs only in a process whose executable carries the `com.apple.security.virtualization` entitlement.
Python itself does not, and re-signing the installed interpreter would touch a file the user's package
manager owns; so Boxpark signs a copy (ad hoc: `codesign --sign -`, no developer account needed) and starts
the agent with it. The copy is of the binary that really runs Python — in a framework build (python.org,
Homebrew) `bin/python3.X` is a stub that re-executes `Python.app/Contents/MacOS/Python`, and an entitlement
on the stub would not reach it. In a venv the copy goes into the venv's bin/, where it finds pyvenv.cfg and
so the venv's packages; otherwise into Boxpark's data directory. `launcher.json` beside it records what was
copied and its sha256: when Python is upgraded the copy is made again (on the next `up`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import plistlib
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import BoxparkError
from .state import data_home

ENTITLEMENT = "com.apple.security.virtualization"
LAUNCHER_NAME = "boxpark-vz-python"
RECORD = "launcher.json"


class SignError(BoxparkError):
    """The launcher could not be made; the message says why, `hint` what to do."""


@dataclass
class Launcher:
    """A signed copy of the interpreter, and what it was made from."""

    path: str
    source: str
    source_sha256: str
    entitlements: str
    python: str


def entitlements_plist() -> bytes:
    """The entitlements file codesign takes: VZ's one entitlement, nothing else."""
    return plistlib.dumps({ENTITLEMENT: True}, fmt=plistlib.FMT_XML)


def sign_dir() -> Path:
    """Where the entitlements and launcher.json live (and the launcher, outside a venv)."""
    return data_home() / "vz"


def interpreter_binary(executable: str | None = None, base_prefix: str | None = None) -> Path:
    """The Mach-O file that runs Python: a framework build's Python.app binary, else the real executable."""
    base = Path(base_prefix if base_prefix is not None else sys.base_prefix)
    app = base / "Resources" / "Python.app" / "Contents" / "MacOS" / "Python"
    if app.is_file():
        return app
    return Path(os.path.realpath(executable or sys._base_executable))  # type: ignore[attr-defined]


def launcher_path(prefix: str | None = None, base_prefix: str | None = None) -> Path:
    """In a venv its bin/ (the copy then finds pyvenv.cfg one level up); else Boxpark's data directory."""
    prefix = prefix if prefix is not None else sys.prefix
    base_prefix = base_prefix if base_prefix is not None else sys.base_prefix
    if prefix != base_prefix:
        return Path(prefix) / "bin" / LAUNCHER_NAME
    return sign_dir() / LAUNCHER_NAME


def sign_commands(launcher: Path, entitlements: Path) -> list[list[str]]:
    """codesign's command lines: sign ad hoc with the entitlements, verify, then show what it carries."""
    return [
        ["codesign", "--force", "--sign", "-", "--entitlements", str(entitlements), str(launcher)],
        ["codesign", "--verify", "--strict", str(launcher)],
        ["codesign", "--display", "--entitlements", ":-", str(launcher)],
    ]


def check_command(launcher: Path) -> list[str]:
    """The launcher must start, find Boxpark and PyObjC's Virtualization (it runs with agent_environment)."""
    return [str(launcher), "-c", "import boxpark.host.agent, Virtualization, dispatch; print('ok')"]


def has_entitlement(display_output: bytes) -> bool:
    """Whether `codesign --display --entitlements :-` printed a plist granting VZ's entitlement."""
    start = display_output.find(b"<?xml")
    if start < 0:
        start = display_output.find(b"<plist")
    if start < 0:
        return False
    try:
        data = plistlib.loads(display_output[start:])
    except Exception:
        return False
    return isinstance(data, dict) and data.get(ENTITLEMENT) is True


def agent_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment: Boxpark's own directory on PYTHONPATH (for a checkout or a user install)."""
    env = dict(os.environ if base is None else base)
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if package_root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([package_root, *paths])
    return env


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require_macos() -> None:
    if sys.platform != "darwin":
        raise SignError(f"`boxpark vz sign` is for macOS: it signs a Python for Virtualization.framework, "
                        f"and this host is {sys.platform}", "here, use backend = \"qemu\" (no signing needed)")
    if shutil.which("codesign") is None:
        raise SignError("codesign was not found", "install the Xcode command line tools: xcode-select --install")


def find_launcher() -> Launcher | None:
    """The recorded launcher, when it is still there and made from the interpreter that runs now."""
    try:
        record = Launcher(**json.loads((sign_dir() / RECORD).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    source = interpreter_binary()
    if not os.access(record.path, os.X_OK) or record.source != str(source):
        return None
    try:
        if _sha256(source) != record.source_sha256:
            return None
    except OSError:
        return None
    return record


def sign(force: bool = False, say: Callable[[str], None] | None = None) -> Launcher:
    """Make (or keep) the signed launcher; returns it. macOS only."""
    _require_macos()
    if not force:
        found = find_launcher()
        if found is not None:
            return found
    directory = sign_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    entitlements = directory / "entitlements.plist"
    entitlements.write_bytes(entitlements_plist())
    source = interpreter_binary()
    launcher = launcher_path()
    launcher.parent.mkdir(parents=True, exist_ok=True)
    tmp = launcher.with_name(launcher.name + ".tmp")
    shutil.copy2(source, tmp)
    os.chmod(tmp, 0o755)
    commands = sign_commands(tmp, entitlements)
    for argv in commands[:2]:
        _run(argv)
    shown = _run(commands[2])
    if not has_entitlement(shown):
        raise SignError(f"codesign did not record {ENTITLEMENT} on {tmp}", "run `boxpark vz sign --force` again")
    os.replace(tmp, launcher)
    check = subprocess.run(check_command(launcher), capture_output=True, env=agent_environment())
    if check.returncode != 0:
        detail = check.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise SignError(f"the signed launcher {launcher} does not start Boxpark"
                        + (f": {detail[0]}" if detail else ""), "pip install '.[macos]' in this environment")
    record = Launcher(str(launcher), str(source), _sha256(source), str(entitlements), sys.version.split()[0])
    (directory / RECORD).write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")
    if say is not None:
        say(f"signed {launcher} (a copy of {source}) with {ENTITLEMENT}")
    return record


def ensure_launcher() -> Launcher:
    """For `up` with backend vz: the launcher, made on the first `up` (or after a Python upgrade)."""
    return find_launcher() or sign(say=lambda m: print(f"boxpark: {m}", file=sys.stderr))


def _run(argv: list[str]) -> bytes:
    result = subprocess.run(argv, capture_output=True)
    if result.returncode != 0:
        raise SignError(f"{' '.join(argv)} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="sign again even if the launcher is current")


def run(args: argparse.Namespace) -> int:
    """`boxpark vz sign`: print the launcher's path on stdout. A SignError reaches the person as it is."""
    launcher = sign(force=args.force, say=lambda m: print(f"boxpark: {m}", file=sys.stderr))
    print(launcher.path)
    return 0
