"""Run benchmarks: `python -m bench` runs them all but the long ones, `python -m bench NAME…` some (file
names in bench/). The long ones (`soak`: 10 minutes of load) run only when named.

Every figure is one JSON line on stdout — name, value, unit, reference, ratio, goal — measured against a
reference taken in the same run; people-readable progress goes to stderr. Never a CI gate.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


LONG = {"soak"}


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = argv or [n for n in available() if n not in LONG]
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"bench: no benchmark named {', '.join(unknown)}; available: {', '.join(available())}",
              file=sys.stderr)
        return 2
    failed = 0
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"== {name}", file=sys.stderr)
        start = time.monotonic()
        try:
            module.main()
        except Exception as exc:  # one broken benchmark does not hide the others
            failed += 1
            print(f"bench {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"   ({time.monotonic() - start:.1f} s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
