"""The `boxpark` command's own cost: wall time of `boxpark --help`, `boxpark status` (a running machine) and
`boxpark exec -- true`, as a user types them (the installed script), against references taken in the
same run, interleaved, after warm-up runs.

References: a bare `python -c pass` (the same interpreter and site: what any Python command pays) for
`--help` and `status`, goal ≤ 2×; `docker exec CONTAINER true` on a running container of the host's own
dockerd (private directories, no network) for `exec -- true`, goal ≤ 1.5×.
`exec -i -- true` is shown too: with -i `exec` passes stdin through (here /dev/null, as for every command) in a
select loop, without it it only reads the guest's answers (cli/plainexec.py).

With cached bytecode, as an installed package runs (pip compiles it; a default Python caches it on the first
run): the commands run with a private PYTHONPYCACHEPREFIX, which the warm-up runs fill, and without
PYTHONDONTWRITEBYTECODE (set where these benchmarks run: then every run compiles each of the package's
modules it imports from source). The same commands with the caller's environment as it is (bytecode not
cached if PYTHONDONTWRITEBYTECODE is set) are shown too, as `*_as_env`.

Where the time goes, per command, from the same runs: its CPU time (user + system, from wait4: much less
disturbed by other load on the machine than wall time), and the import time the command's own modules add
(`-X importtime`, summed over what the bare interpreter does not load; the minimum of a few runs).
With BOXPARK_BENCH_BASELINE=SCRIPT (another checkout's installed `boxpark`, e.g. main's), its `--help`,
`status` and `exec -- true` run interleaved with these, against the same machine, as `*_baseline` figures
(reference: this checkout's).
Run: `python -m bench cli`. (`cli_startup` measures `python -m boxpark` with no machine, and what each command
imports.)
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench._report import boxpark_command, figure, host_dockerd, load_test_image, sandbox_machine, say

RUNS = 15
WARM_UP = 3


def main() -> None:
    if os.geteuid() != 0 or not shutil.which("docker") or not shutil.which("dockerd"):
        say("cli: needs root (a sandbox machine), docker and dockerd: skipped")
        return
    bp = boxpark_command()
    with sandbox_machine() as machine, host_dockerd() as host, tempfile.TemporaryDirectory() as pycache:
        as_env = {**os.environ, "BOXPARK_HOME": str(machine.parent)}
        env = {**as_env, "PYTHONPYCACHEPREFIX": pycache}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        image = load_test_image(host.docker, host.directory)
        container = subprocess.run([*host.docker, "run", "-d", "--network", "none", image, "sleep", "3600"],
                                   check=True, capture_output=True, text=True).stdout.strip()
        commands = {
            "python": [sys.executable, "-c", "pass"],
            "help": [*bp, "--help"],
            "status": [*bp, "status", "--name", machine.name],
            "exec": [*bp, "exec", "--name", machine.name, "--", "true"],
            "exec_i": [*bp, "exec", "-i", "--name", machine.name, "--", "true"],
            "docker_exec": [*host.docker, "exec", container, "true"],
        }
        baseline = os.environ.get("BOXPARK_BENCH_BASELINE")
        if baseline:
            commands["help_baseline"] = [baseline, *commands["help"][len(bp):]]
            commands["status_baseline"] = [baseline, *commands["status"][len(bp):]]
            commands["exec_baseline"] = [baseline, *commands["exec"][len(bp):]]
        envs = {key: env for key in commands}
        for key in ("python", "help", "status", "exec"):
            commands[f"{key}_as_env"] = commands[key]
            envs[f"{key}_as_env"] = as_env
        times: dict[str, list[float]] = {key: [] for key in commands}
        cpu: dict[str, list[float]] = {key: [] for key in commands}
        for round_ in range(WARM_UP + RUNS):
            for key, argv in commands.items():
                before = _children_cpu()
                seconds = _wall(argv, envs[key])
                if round_ >= WARM_UP:
                    times[key].append(seconds)
                    cpu[key].append(_children_cpu() - before)
        imports = {key: _import_ms(argv, env) for key, argv in commands.items() if key in ("help", "status", "exec")}
    say(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for key, values in times.items():
        say(f"{key}: {', '.join(f'{t * 1000:.0f}' for t in values)} ms; median CPU {statistics.median(cpu[key]) * 1000:.1f} ms"
            + (f"; its own imports {imports[key]:.1f} ms" if key in imports else ""))
    ms = {key: statistics.median(values) * 1000 for key, values in times.items()}
    figure("cli_help_installed_script", ms["help"], "ms", ms["python"], "ratio <= 2 (vs python -c pass)")
    figure("cli_status_running_machine", ms["status"], "ms", ms["python"], "ratio <= 2 (vs python -c pass)")
    figure("cli_exec_true", ms["exec"], "ms", ms["docker_exec"], "ratio <= 1.5 (vs docker exec on a running container)")
    figure("cli_exec_i_true", ms["exec_i"], "ms", ms["docker_exec"],
           "ratio <= 1.5 (vs docker exec on a running container; exec -i: stdin passed through)")
    for key, what in (("help", "help"), ("status", "status_running_machine"), ("exec", "exec_true")):
        if f"{key}_baseline" in ms:
            figure(f"cli_{what}_baseline", ms[f"{key}_baseline"], "ms", ms[key],
                   "none: the baseline checkout (BOXPARK_BENCH_BASELINE) vs this one")
        reference = ms["docker_exec"] if key == "exec" else ms["python_as_env"]
        figure(f"cli_{what}_as_env", ms[f"{key}_as_env"], "ms", reference,
               "none: bytecode as the environment leaves it (vs " + ("docker exec)" if key == "exec" else
                                                                      "python -c pass, likewise)"))


def _wall(argv: list[str], env: dict[str, str]) -> float:
    """Seconds one run of `argv` takes, start to exit: `_report.wall`, with stdin from /dev/null (`exec -i`)."""
    start = time.perf_counter()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {result.returncode}: {result.stderr.decode()[-500:]}")
    return elapsed


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _import_ms(argv: list[str], env: dict[str, str], runs: int = 5) -> float:
    """Milliseconds of import the command adds to the bare interpreter's (-X importtime, the least of `runs`)."""
    def modules(command: list[str]) -> dict[str, int]:
        script = command[1:] if command[0] == sys.executable else command  # the console script is a Python file
        err = subprocess.run([sys.executable, "-X", "importtime", *script], env=env, capture_output=True, text=True,
                             timeout=120).stderr
        self_us: dict[str, int] = {}
        for line in err.splitlines():
            if line.startswith("import time:") and "|" in line and "self [us]" not in line:
                own, _, name = line.removeprefix("import time:").split("|")
                self_us[name.strip()] = int(own)
        return self_us

    bare = set(modules([sys.executable, "-c", "pass"]))
    best = min(sum(us for name, us in modules(argv).items() if name not in bare) for _ in range(runs))
    return best / 1000


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.exit("run it as: python -m bench cli")
    main()
