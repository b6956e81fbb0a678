"""Start-up of the `boxpark` command: `--help`, `status` and `exec -- true` with no machine, `guest serve --help`,
against a bare `python -c pass`, how many of the package's modules each loads, and which of the costly
standard modules (asyncio, msgspec, logging, subprocess, dataclasses, socket, shutil, typing).

Each command and the bare interpreter run alternately (interleaved), so all see the same machine, after a
warm-up round; figures are medians. Bytecode is cached, as for an installed package (a private
PYTHONPYCACHEPREFIX, without PYTHONDONTWRITEBYTECODE: see bench/cli.py). The module count is read from the command's own sys.modules (a lazily loaded group is counted
too). Goal: what a command costs beyond the interpreter is small next to the interpreter itself.
Run: `python -m bench cli_startup` (or `python bench/cli_startup.py [--runs N]`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._report import figure, say  # noqa: E402

COMMANDS = {"help": ["--help"], "status": ["status"], "exec": ["exec", "--", "true"],
            "guest_serve_help": ["guest", "serve", "--help"]}
COSTLY = ("asyncio", "msgspec", "logging", "subprocess", "dataclasses", "socket", "shutil", "typing")
MODULES = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))
from boxpark.cli import main
sys.argv[0] = "boxpark"
sys.exit(main(sys.argv[1:]))
"""


def main(runs: int = 10) -> None:
    with tempfile.TemporaryDirectory(prefix="bpcli") as home:
        _measure(home, runs)


def _measure(home: str, runs: int) -> None:
    env = {**os.environ, "BOXPARK_HOME": home, "PYTHONPYCACHEPREFIX": os.path.join(home, "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    argvs = {"python": [sys.executable, "-c", "pass"]}
    argvs.update({name: [sys.executable, "-m", "boxpark", *args] for name, args in COMMANDS.items()})
    times: dict[str, list[float]] = {name: [] for name in argvs}
    for round_ in range(runs + 1):
        for name, argv in argvs.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)  # exec: 3
            if round_:  # the first round fills the bytecode cache
                times[name].append(time.perf_counter() - start)
    bare = statistics.median(times["python"]) * 1000
    for name, args in COMMANDS.items():
        figure(f"cli_{name}_ms", statistics.median(times[name]) * 1000, "ms", bare,
               "ratio <= 2 (vs python -c pass)")
        loaded = json.loads(subprocess.run([sys.executable, "-c", MODULES, *args], env=env, capture_output=True,
                                           text=True, timeout=120).stderr.strip().splitlines()[-1])
        ours = [m for m in loaded if m.startswith("boxpark")]
        figure(f"cli_{name}_modules", len(ours), "modules", None, "no image, backend or guest module")
        costly = [m for m in COSTLY if m in loaded]
        say(f"{name} loads {', '.join(costly) or 'none'} of {', '.join(COSTLY)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    main(parser.parse_args().runs)
