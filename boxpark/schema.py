"""Writes the Guest API's JSON Schema into the docs: `python -m boxpark.schema [PATH]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .protocol import json_schema

DEFAULT = Path(__file__).resolve().parent.parent / "docs" / "protocol.schema.json"


def render() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT
    path.write_text(render())
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
