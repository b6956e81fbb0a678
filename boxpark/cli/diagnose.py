"""`boxpark diagnose`: one archive for a bug report (the collecting is `boxpark.host.diagnose`'s)."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import BoxparkError, UsageError
from ..host.diagnose import DEFAULT_LOG_MIB  # cheap: stdlib and the state module only

DESCRIPTION = ("Write one archive (tar.gz) to attach to a bug report: versions (boxpark, host, backend tools, "
               "image manifest, guest kernel, dockerd), the configuration with secrets and proxy credentials "
               "masked, `status --json`, the boot timeline, the last N MiB of every log, the agent's view "
               "(machine record, processes) and the guest's (processes, mounts, network, docker info). A "
               "stopped machine gives a partial archive; its README.txt lists what is missing and why. The "
               "machine secret never goes in. Prints the archive's path and size; progress goes to stderr.")


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("--name", default="default", help="the machine's name (default: default)")
    parser.add_argument("--output", "-o", metavar="FILE",
                        help="the archive to write (default: ./boxpark-diagnose-NAME-DATE-TIME.tar.gz; "
                             "a directory: the default name in it)")
    parser.add_argument("--log-mib", type=float, default=DEFAULT_LOG_MIB, metavar="N",
                        help=f"the last N MiB of each log (default: {DEFAULT_LOG_MIB:g})")
    parser.add_argument("--config", metavar="FILE",
                        help="the boxpark.toml to include (default: the running agent's, else the default one)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the archive's path and size on stdout."""
    from ..host.diagnose import write_bundle

    if not args.log_mib > 0:
        raise UsageError("--log-mib must be more than 0")
    if args.config and not os.path.isfile(args.config):
        raise UsageError(f"no configuration file {args.config}")
    try:
        path = write_bundle(args.name, args.output, config_path=args.config, log_bytes=int(args.log_mib * (1 << 20)),
                            say=lambda message: print(f"boxpark: {message}", file=sys.stderr, flush=True))
    except OSError as exc:
        raise BoxparkError(f"cannot write the archive: {exc.strerror or exc}",
                           "choose another place with --output FILE") from None
    size = path.stat().st_size
    print(f"{path} ({size / (1 << 20):.1f} MiB)" if size >= 1 << 20 else f"{path} ({size / 1024:.0f} KiB)")
    return 0
