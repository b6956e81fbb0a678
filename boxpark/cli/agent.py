"""`boxpark agent run`: the machine agent in the foreground (`up` starts it detached; this is for debugging).

The agent and everything it owns load only when the command runs.
"""

from __future__ import annotations

import argparse


def add_arguments(name: str, agent: argparse.ArgumentParser) -> None:
    agent_commands = agent.add_subparsers(dest="agent_command", required=True)
    run = agent_commands.add_parser("run", help="run the machine agent in the foreground")
    run.add_argument("--name", default="default")
    run.add_argument("--config", metavar="FILE")
    run.set_defaults(func=_agent_run)


def _agent_run(args: argparse.Namespace) -> int:
    from ..host.agent import main

    return main(args.name, args.config)
