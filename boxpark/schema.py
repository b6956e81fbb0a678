"""Writes the Guest API's JSON Schema into the docs: `python -m boxpark.schema [PATH]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .protocol import json_schema

DEFAULT = Path(__file__).resolve().parent.parent / "docs" / "protocol.schema.json"


def render() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m boxpark.schema",
        description="Write the Guest API's JSON Schema (every message of the contract) to a file.")
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT,
                        help=f"where to write it (default: {DEFAULT.relative_to(DEFAULT.parent.parent)}, "
                             "which a unit test keeps in step with the code)")
    path = parser.parse_args(argv).path
    try:
        path.write_text(render())
    except OSError as exc:
        print(f"boxpark.schema: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
