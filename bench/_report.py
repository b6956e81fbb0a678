"""The one way a benchmark reports a figure (imported by the others; not a benchmark itself)."""

from __future__ import annotations

import json
import sys


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
