"""What the benchmarks share: the one way to report a figure, and waiting for a server's socket.

Imported by the others; not a benchmark itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def wait_for(path: str, server: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    """Until `path` exists (a server's socket); fail at once if the server process has exited."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if (server is not None and server.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start listening on {path}")
        time.sleep(0.01)


def figure(name: str, value: float, unit: str, reference: float | None, goal: str,
           ratio: float | None = None) -> None:
    """Print one figure as a JSON line; `ratio` defaults to value / reference."""
    if ratio is None and reference:
        ratio = value / reference
    line = {"name": name, "value": round(value, 3), "unit": unit,
            "reference": None if reference is None else round(reference, 3),
            "ratio": None if ratio is None else round(ratio, 3), "goal": goal}
    print(json.dumps(line), flush=True)
    print(f"   {name}: {value:.3f} {unit} (reference {reference}, ratio {line['ratio']}, goal {goal})",
          file=sys.stderr)


def main() -> None:  # not a benchmark
    pass
