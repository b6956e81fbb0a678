"""`boxpark boot`: boot a guest in the foreground (development); the command itself is `boxpark.host.boot`.

Importing `host.boot` is cheap: the backends load when the command runs.
"""

from __future__ import annotations

import argparse


def add_arguments(name: str, boot: argparse.ArgumentParser) -> None:
    from ..host.boot import add_arguments as add_boot_arguments

    boot.description = ("Boot the guest image on a backend, print its boot timeline and API address, and stop "
                        "it cleanly on Ctrl-C or SIGTERM.")
    add_boot_arguments(boot)
    boot.set_defaults(func=_boot)


def _boot(args: argparse.Namespace) -> int:
    from ..host import boot

    return boot.run(args)
