"""`boxpark vz sign`: the ad-hoc-signed Python launcher the machine agent needs for VZ (macOS).

The work is in `boxpark.host.vzsign` (standard library only); its SignError is a BoxparkError, shown by
`boxpark.cli.main` like every other.
"""

from __future__ import annotations

import argparse


def add_arguments(name: str, vz: argparse.ArgumentParser) -> None:
    from ..host.vzsign import add_arguments as add_sign_arguments

    vz.description = "Set up the vz backend (macOS, Virtualization.framework)."
    vz_commands = vz.add_subparsers(dest="vz_command", metavar="SUBCOMMAND", required=True)
    sign = vz_commands.add_parser(
        "sign", help="make the ad-hoc-signed Python launcher the agent needs for VZ (macOS)",
        description="Copy this Python's interpreter, sign the copy ad hoc with the "
                    "com.apple.security.virtualization entitlement, and record it: `up` with backend vz starts "
                    "the machine agent with it. Prints the launcher's path.")
    add_sign_arguments(sign)
    sign.set_defaults(func=_vz_sign)


def _vz_sign(args: argparse.Namespace) -> int:
    from ..host import vzsign

    return vzsign.run(args)
