"""`boxpark config`: print the documented default boxpark.toml."""

from __future__ import annotations

import argparse


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.description = "Print the documented default configuration."
    parser.add_argument("--default", action="store_true", help="print the documented defaults")
    parser.set_defaults(func=_config)


def _config(args: argparse.Namespace) -> int:
    from ..host.config import DEFAULT_TOML

    print(DEFAULT_TOML, end="")
    return 0
