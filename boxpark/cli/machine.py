"""The machine commands: up, down, status, exec, shell, logs — thin clients of the machine agent.

`up` starts the agent detached and follows its progress; killing `up` (or `logs -f`, or `shell`) harms
nothing, the agent goes on. Every other command talks to the agent's control socket or, for `exec` and
`shell`, to the guest's API: the guest's own socket where the host reaches it as one (the sandbox; its
record in backend/machine.json says), else the api.sock the agent forwards. Failures are sentences with a hint, exit codes are
meaningful: 0 ok, 1 failed, 2 bad usage, 3 not running, the command's own code for `exec`.
`status`, `exec` and `logs` run often and must start quickly: nothing here may import the agent, a backend,
the image builder, asyncio, subprocess, shutil or typing at its top — the commands that need them import
them (python -X importtime, or `python -m bench cli_startup`, shows what each command loads). `exec` and
`shell` speak to the guest through `plainexec`, which loads neither asyncio nor msgspec.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..errors import BoxparkError
from ..host.state import Machine, config_home

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any, Iterator

NOT_RUNNING = 3


class CommandFailed(BoxparkError):
    """A machine command cannot do what was asked; `hint` says what to do, `code` is the exit code."""


def machine_of(args: argparse.Namespace) -> Machine:
    return Machine.named(args.name)  # a bad name is a StateError: a usage error


def control(machine: Machine, op: str, timeout: float | None = 10.0) -> Iterator[dict[str, Any]]:
    """Send one request to the agent; yield each JSON line it answers with."""
    answers = machine.request(op, timeout)
    try:
        first = next(answers)
    except TimeoutError:
        raise
    except OSError:  # no socket, or nobody listening on it
        raise CommandFailed(f"machine {machine.name!r} is not running", f"start it: boxpark up --name {machine.name}",
                            NOT_RUNNING) from None
    except StopIteration:
        return
    yield first
    yield from answers


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config:
        if not os.path.exists(args.config):
            raise CommandFailed(f"no configuration file {args.config}", "boxpark config --default > FILE makes one", 2)
        return str(args.config)
    default = config_home() / "boxpark.toml"
    return str(default) if default.exists() else None


# ----------------------------------------------------------------------------------------- up


def up(args: argparse.Namespace) -> int:
    from ..host.config import ConfigError, load

    machine = machine_of(args)
    config_path = _config_path(args)
    try:
        config = load(config_path)  # check it here, before anything starts, with the key named
    except ConfigError as exc:
        raise CommandFailed(str(exc), "fix the file, or see the defaults: boxpark config --default", 2) from None
    if machine.running() and next(control(machine, "status"))["state"] in ("failed", "stopping"):
        _wait_gone(machine)  # an agent on its way out (its machine died, or `down`): start a fresh one
    if machine.running():
        status = next(control(machine, "status"))
        if status["state"] == "ready":
            _print_ready(machine, status, args)
            print(f"boxpark: machine {machine.name!r} is already running", file=sys.stderr)
            _say_changed(machine, status, config)
            return 0
        print(f"boxpark: machine {machine.name!r} is already starting; following it", file=sys.stderr)
    else:
        machine.ensure()
        if machine.stale():
            for what in machine.clean():
                print(f"boxpark: cleaned up after a dead agent: {what}", file=sys.stderr)
        python, env = sys.executable, None
        if config.backend == "vz":
            python, env = _vz_launcher()  # says first when this is no Mac
            _ensure_imported_image(config)
        elif not config.image:
            _ensure_image(config, quiet=args.quiet)
        _start_agent(machine, config_path, python, env)
    last = None
    for event in control(machine, "follow", timeout=None):
        if not args.quiet:
            print(f"  {event['phase']:<10} {event['message']}", file=sys.stderr)
        last = event
        if event["state"] in ("ready", "failed", "stopped"):
            break
    if last is None or last["state"] != "ready":
        raise CommandFailed(f"machine {machine.name!r} did not come up: {last['message'] if last else 'no agent'}",
                            f"see {machine.agent_log} (boxpark logs agent)")
    _print_ready(machine, next(control(machine, "status")), args)
    return 0


def _say_changed(machine: Machine, status: dict[str, Any], config: Any) -> None:
    """A running machine keeps the settings it started with: name the ones the config now changes."""
    from ..host.config import changed_settings

    if "config" not in status:  # an agent from before status carried its config
        return
    changed = changed_settings(status["config"], config)
    if changed:
        print(f"boxpark: changed since it started, taking effect when it starts again: {', '.join(changed)} "
              f"(boxpark down --name {machine.name} && boxpark up --name {machine.name})", file=sys.stderr)


def _wait_gone(machine: Machine, timeout: float = 60.0) -> None:
    pid = machine.agent_pid()
    deadline = time.monotonic() + timeout
    while pid is not None and _alive(pid):
        if time.monotonic() > deadline:
            raise CommandFailed(f"the agent of {machine.name!r} is stopping and did not finish in {timeout:g} s",
                                f"see {machine.agent_log}; `boxpark down --name {machine.name}` stops it")
        time.sleep(0.05)


def _ensure_image(config: Any, quiet: bool = False) -> None:
    """Build the default image if it is missing or stale, showing the build's steps as the agent's phases are
    shown (and why it builds); an up-to-date image costs one line."""
    from ..image import build
    from ..image.progress import Console

    arch = config.guest_arch
    directory = build.default_image_dir(arch, with_docker=True)
    if (directory / "manifest.json").exists() and os.environ.get("BOXPARK_SKIP_IMAGE_CHECK"):
        return
    if quiet:
        build.build_image(directory, arch=arch, with_docker=True)
        return
    print(f"boxpark: checking the guest image ({directory})", file=sys.stderr, flush=True)
    with Console(sys.stderr, prefix=f"  {'image':<10} ", hold=True) as console:
        build.build_image(directory, arch=arch, with_docker=True, progress=console)


def _ensure_imported_image(config: Any) -> None:
    """A Mac cannot build the image: without `image` in the config, an imported one must be there."""
    if config.image:
        return
    from ..image.build import default_image_dir

    arch = config.guest_arch
    directory = default_image_dir(arch, with_docker=True)
    if not (directory / "manifest.json").exists():
        raise CommandFailed(
            f"no {arch} guest image in {directory}: a Mac cannot build one (no debootstrap)",
            f"on a Linux machine run `boxpark image build --arch {arch}` and `boxpark image export --arch {arch}`, "
            f"copy the bundle here, then run `boxpark image import FILE` (or `boxpark image import URL`) "
            f"and `boxpark up` again")


def _vz_launcher() -> tuple[str, dict[str, str]]:
    """The signed Python the agent needs for VZ (made on the first `up`), and its environment."""
    from ..host.vzsign import SignError, agent_environment, ensure_launcher

    try:
        return ensure_launcher().path, agent_environment()
    except SignError as exc:
        raise CommandFailed(exc.message, exc.hint or "run `boxpark vz sign`") from None


def _start_agent(machine: Machine, config_path: str | None, python: str | None = None,
                 env: dict[str, str] | None = None) -> None:
    argv = [python or sys.executable, "-m", "boxpark", "agent", "run", "--name", machine.name]
    if config_path:
        argv += ["--config", os.path.abspath(config_path)]
    import subprocess

    log = open(machine.agent_log, "ab")
    agent = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                             close_fds=True, cwd="/", env=env)
    log.close()
    deadline = time.monotonic() + 15
    while not machine.control_answers(timeout=0.5):
        if agent.poll() is not None or time.monotonic() > deadline:
            tail = machine.agent_log.read_text(errors="replace").strip().splitlines()[-1:]
            raise CommandFailed("the machine agent did not start" + (f": {tail[0]}" if tail else ""),
                                f"see {machine.agent_log}")
        time.sleep(0.05)


def _print_ready(machine: Machine, status: dict[str, Any], args: argparse.Namespace) -> None:
    import shutil
    import subprocess

    host = status.get("docker_host") or f"unix://{machine.docker_socket}"
    if shutil.which("docker") and not getattr(args, "no_context", False):
        context = "boxpark" if machine.name == "default" else f"boxpark-{machine.name}"
        subprocess.run(["docker", "context", "rm", "-f", context], capture_output=True)
        subprocess.run(["docker", "context", "create", context, "--docker", f"host={host}",
                        "--description", f"Boxpark machine {machine.name}"], capture_output=True)
        print(f"boxpark: docker context {context!r} created (docker --context {context} …)", file=sys.stderr)
    print(f"export DOCKER_HOST={host}")


# --------------------------------------------------------------------------------------- down


def down(args: argparse.Namespace) -> int:
    import signal

    machine = machine_of(args)
    pid = machine.agent_pid()
    if pid is None:
        if machine.stale():
            for what in machine.clean():
                print(f"boxpark: {what}", file=sys.stderr)
        print(f"boxpark: machine {machine.name!r} is not running", file=sys.stderr)
        return 0
    try:
        for event in control(machine, "down", timeout=None):
            if not args.quiet:
                print(f"  {event['phase']:<10} {event['message']}", file=sys.stderr)
    except (CommandFailed, ConnectionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            machine.clean()
            raise CommandFailed("the agent did not stop in 60 s: killed it")
        time.sleep(0.05)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has finished all it had to do
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# ------------------------------------------------------------------------------------- status


def status(args: argparse.Namespace) -> int:
    machine = machine_of(args)
    try:
        info = next(control(machine, "status"))
    except (CommandFailed, ConnectionError, ValueError, StopIteration):  # not running, or gone mid-answer
        info = machine.offline_status()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(f"{machine.name}: {info['state']}" + (f": {info['failure']}" if info.get("failure") else ""))
        return NOT_RUNNING
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['name']}: {info['state']} ({info['backend']}, agent pid {info['pid']})")
    if info.get("failure"):
        print(f"  {info['failure']}")
    if info.get("docker_host"):
        print(f"  DOCKER_HOST={info['docker_host']}")
    docker = info.get("docker")
    if docker:
        extra = f", status {docker['status']!r}" if docker["status"] else ""
        restarts = f", {docker['restarts']} restarts" if docker["restarts"] else ""
        print(f"  docker: {docker['state']}{extra}{restarts}"
              + (f", last exit {docker['last_exit']}" if docker["last_exit"] else "")
              + (f", next start in {docker['next_start_in']:.1f} s" if docker.get("next_start_in") else ""))
        if docker.get("last_error") and docker["state"] != "ready":
            print(f"  dockerd said: {docker['last_error']}")
    for line in resource_lines(info.get("resources"), ready=info["state"] == "ready"):
        print(f"  {line}")
    disk = disk_line(info)
    if disk:
        print(f"  {disk}")
    ports = info.get("ports")
    if ports:
        for port in ports["forwarded"]:
            n = port["connections"]
            print(f"  port: {port['host']}/{port['proto']} → {port['container']} (guest {port['guest']}, "
                  f"{n} connection{'' if n == 1 else 's'})")
        for problem in ports["problems"]:
            print(f"  port NOT forwarded: {problem}")
    if (info.get("mount_guard") or {}).get("on") is False:
        print("  mount guard: off (docker.mount_guard = false): a bind of a path the guest lacks is made empty")
    services = info.get("host_services") or {}
    for forward in services.get("forwards", []):
        state = "listening" if forward["listening"] else "NOT listening (retrying)"
        print(f"  {forward['name']}: {forward['guest']} in the guest → {forward['host']} ({state}, "
              f"{forward['accepted']} connections, {forward['refused']} refused)")
    if services.get("note"):
        print(f"  {services['note']}")
    boot = info.get("boot")
    if boot:
        steps = sum(s["ms"] for s in boot["timeline"])
        print(f"  boot: {boot['monotonic_ms']:.0f} ms to Ready (kernel {boot['kernel']}; init steps {steps:.0f} ms)")
        for step in boot["timeline"]:
            print(f"    {step['step']:<10} {step['ms']:8.1f} ms" + (f"  ERROR {step['error']}" if step["error"] else ""))
    if info.get("phases"):
        print("  phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in info["phases"].items()))
    return 0


def disk_line(info: dict[str, Any]) -> str | None:
    """`status`'s line when the data disk cannot give space back (its device offers the guest no discard);
    nothing when it can, or when the machine has no data disk or has not mounted it yet."""
    if info.get("disk_discard") is False:
        return ("data disk: cannot give space back to the host (its device offers no discard); "
                "deleted images and containers stay allocated in its image")
    return None


def size_text(n: int) -> str:
    """Bytes for people: 512 B, 1.5 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def resource_lines(resources: dict[str, Any] | None, ready: bool = True) -> list[str]:
    """The `status` lines for what the machine costs (agent.resources): the guest's memory, the VM process's
    RSS, the data disk; a figure the agent could not read is left out or said to be unknown."""
    if not resources:
        return []
    lines = []
    memory = resources.get("guest_memory")
    if memory:
        balloon = memory.get("balloon")
        lines.append(f"memory: {size_text(memory['used'])} used, {size_text(memory['available'])} available "
                     f"of {size_text(memory['total'])} in the guest"
                     + (f", {size_text(balloon)} given back by the balloon" if balloon else ""))
    elif ready:
        lines.append("memory: the guest's figures are unknown (it did not answer in time)")
    if resources.get("vm_rss") is not None:
        lines.append(f"VM process: {size_text(resources['vm_rss'])} resident on the host")
    disk = resources.get("data_disk")
    if disk:
        lines.append(f"data disk: {size_text(disk['size'])}, {size_text(disk['allocated'])} allocated on the host")
    return lines


# --------------------------------------------------------------------------------------- logs


LOGS = {"docker": "docker_log", "console": "console_log", "init": "init_log", "agent": "agent_log"}


def logs(args: argparse.Namespace) -> int:
    machine = machine_of(args)
    path: Path = getattr(machine, LOGS[args.which])
    if not path.exists():
        raise CommandFailed(f"no {args.which} log yet for {machine.name!r} ({path})")
    with open(path, "rb") as f:
        if args.tail:
            f.seek(max(0, path.stat().st_size - args.tail * 200))
            lines = f.read().splitlines(keepends=True)[-args.tail:]
            sys.stdout.buffer.write(b"".join(lines))
        else:
            while chunk := f.read(65536):
                sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        if not args.follow:
            return 0
        inode = os.fstat(f.fileno()).st_ino
        while True:
            chunk = f.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                continue
            try:
                if os.stat(path).st_ino != inode:  # rotated: continue in the new file
                    f.close()
                    f = open(path, "rb")
                    inode = os.fstat(f.fileno()).st_ino
                    continue
            except FileNotFoundError:
                pass
            time.sleep(0.2)


# ---------------------------------------------------------------------------------- exec, shell


GUEST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
             "LANG": "C.UTF-8"}
"""The environment of a command `exec` and `shell` run (with this terminal's TERM), in /root."""


def _not_running(machine: Machine) -> CommandFailed:
    return CommandFailed(f"machine {machine.name!r} is not running", f"start it: boxpark up --name {machine.name}",
                         NOT_RUNNING)


def _secret(machine: Machine) -> bytes | None:
    for path in (machine.secret_file, machine.backend_dir / "secret"):
        if path.exists():
            from ..transport import read_secret

            return read_secret(str(path))
    return None


def _api_path(machine: Machine) -> str:
    """The unix socket of the guest's API: the guest's own, as the backend's record names it, when the host
    reaches it as a unix socket with no secret (the sandbox); else the agent's Guest Proxy (api.sock)."""
    record = machine.read_json(machine.backend_dir / "machine.json")
    if isinstance(record, dict) and not record.get("secret_file"):
        api = record.get("api")
        if isinstance(api, str) and api.startswith("unix:"):
            return api[len("unix:"):]
    return str(machine.api_socket)


def exec_(args: argparse.Namespace) -> int:
    machine = machine_of(args)
    argv = [a for a in args.argv if a != "--"] if args.argv and args.argv[0] == "--" else args.argv
    if not argv:
        raise CommandFailed("nothing to run", "boxpark exec -- COMMAND [ARG…]", 2)
    return _run(machine, argv, tty=args.tty and sys.stdin.isatty(), stdin=args.interactive)


def shell(args: argparse.Namespace) -> int:
    machine = machine_of(args)
    argv = ["/bin/bash", "-l"] if not args.argv else args.argv
    return _run(machine, argv, tty=sys.stdin.isatty(), stdin=True)


def _run(machine: Machine, argv: list[str], *, tty: bool, stdin: bool) -> int:
    """Run argv in the guest with this terminal (raw mode and window size on a tty, plain pipes otherwise) on
    one connection straight to the guest's API; its exit code."""
    from .. import __version__
    from . import plainexec, terminal

    rows, cols = terminal.size()
    env = {"TERM": os.environ.get("TERM", "xterm"), **GUEST_ENV}
    try:
        code, signum = plainexec.run(_api_path(machine), _secret(machine), argv, env=env, cwd="/root", rows=rows,
                                     cols=cols, client=f"boxpark-exec {__version__}", stdin=stdin, tty=tty)
    except (FileNotFoundError, ConnectionRefusedError):
        if machine.running():
            raise CommandFailed(f"machine {machine.name!r} is starting: its guest API is not up yet",
                                f"wait for it: boxpark up --name {machine.name}", NOT_RUNNING) from None
        raise _not_running(machine) from None
    except plainexec.GuestError as exc:
        raise CommandFailed(f"the guest refused the call ({exc.code_name}): {exc.message}") from None
    except plainexec.OutputClosed:  # our stdout's reader went away (`| head`): end as a shell's command would
        return 128 + 13
    except OSError as exc:
        raise CommandFailed(f"the connection to the guest failed: {exc.strerror or exc}") from None
    return code if code is not None else 128 + (signum or 0)


# ------------------------------------------------------------------------------------- parser


# Each command's description and options; its one-line help is in boxpark.cli.COMMANDS.
def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="default", help="the machine's name (default: default)")
    if name == "up":
        parser.description = ("Build the guest image if needed, start the machine agent, boot the guest, run its "
                              "initialization and dockerd, and print `export DOCKER_HOST=…`. Also creates a docker "
                              "context named boxpark. Killing `up` does not stop the machine.")
        parser.add_argument("--config", metavar="FILE", help="boxpark.toml (default: $XDG_CONFIG_HOME or ~/.config, "
                                                             "then boxpark/boxpark.toml, else built-in defaults)")
        parser.add_argument("--quiet", "-q", action="store_true", help="print only the DOCKER_HOST line")
        parser.add_argument("--no-context", action="store_true", help="do not create a docker context")
        parser.set_defaults(func=up)
    elif name == "down":
        parser.description = "Stop dockerd, power the guest off, stop the agent."
        parser.add_argument("--quiet", "-q", action="store_true")
        parser.set_defaults(func=down)
    elif name == "status":
        parser.description = "Show the machine's state, its boot timeline, and dockerd's status."
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.set_defaults(func=status, logging=False)
    elif name == "exec":
        parser.description = "Run a command in the guest: boxpark exec [-it] -- CMD …"
        parser.add_argument("-i", "--interactive", action="store_true", help="pass stdin through")
        parser.add_argument("-t", "--tty", action="store_true", help="use a pseudo-terminal")
        parser.add_argument("argv", nargs=argparse.REMAINDER, help="the command and its arguments (after --)")
        parser.set_defaults(func=exec_, logging=False)
    elif name == "shell":
        parser.description = "An interactive login shell in the guest (a pty; window size changes are forwarded)."
        parser.add_argument("argv", nargs=argparse.REMAINDER, help="a command instead of the login shell")
        parser.set_defaults(func=shell, logging=False)
    elif name == "logs":
        parser.description = "Show the docker, console, init or agent log."
        parser.add_argument("which", nargs="?", default="docker", choices=sorted(LOGS), help="which log (default: docker)")
        parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
        parser.add_argument("-n", "--tail", type=int, default=0, metavar="N", help="only the last N lines")
        parser.set_defaults(func=logs, logging=False)
    else:
        raise ValueError(f"no machine command {name!r}")
