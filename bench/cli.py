"""The `boxpark` command's own cost: wall time of `boxpark --help`, `boxpark status` (a running machine) and
`boxpark exec -- true`, as a user types them (the installed script), against references taken in the
same run, interleaved, after warm-up runs.

References: a bare `python -c pass` (the same interpreter and site: what any Python command pays) for
`--help` and `status`, goal ≤ 2×; `docker exec CONTAINER true` on a running container of the host's own
dockerd (private directories, no network) for `exec -- true`, goal ≤ 1.5×.
Run: `python -m bench cli`. (`cli_startup` measures `python -m boxpark` with no machine, and what each command
imports.)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys

from bench._report import (boxpark_command, figure, host_dockerd, load_test_image, sandbox_machine, say,
                           wall)

RUNS = 15
WARM_UP = 3


def main() -> None:
    if os.geteuid() != 0 or not shutil.which("docker") or not shutil.which("dockerd"):
        say("cli: needs root (a sandbox machine), docker and dockerd: skipped")
        return
    bp = boxpark_command()
    with sandbox_machine() as machine, host_dockerd() as host:
        env = {**os.environ, "BOXPARK_HOME": str(machine.parent)}
        image = load_test_image(host.docker, host.directory)
        container = subprocess.run([*host.docker, "run", "-d", "--network", "none", image, "sleep", "3600"],
                                   check=True, capture_output=True, text=True).stdout.strip()
        commands = {
            "python": [sys.executable, "-c", "pass"],
            "help": [*bp, "--help"],
            "status": [*bp, "status", "--name", machine.name],
            "exec": [*bp, "exec", "--name", machine.name, "--", "true"],
            "docker_exec": [*host.docker, "exec", container, "true"],
        }
        times: dict[str, list[float]] = {key: [] for key in commands}
        for round_ in range(WARM_UP + RUNS):
            for key, argv in commands.items():
                seconds = wall(argv, env=env)
                if round_ >= WARM_UP:
                    times[key].append(seconds)
    for key, values in times.items():
        say(f"{key}: {', '.join(f'{t * 1000:.0f}' for t in values)} ms")
    ms = {key: statistics.median(values) * 1000 for key, values in times.items()}
    figure("cli_help_installed_script", ms["help"], "ms", ms["python"], "ratio <= 2 (vs python -c pass)")
    figure("cli_status_running_machine", ms["status"], "ms", ms["python"], "ratio <= 2 (vs python -c pass)")
    figure("cli_exec_true", ms["exec"], "ms", ms["docker_exec"], "ratio <= 1.5 (vs docker exec on a running container)")


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.exit("run it as: python -m bench cli")
    main()
