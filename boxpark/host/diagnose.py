"""`boxpark diagnose`: one archive a user can attach to a bug report, and a list of what it could not hold.

It gathers, part by part, what a maintainer asks for first: versions (host, backend tools, image, guest
kernel, dockerd), the configuration, `status --json`, the boot timeline, the tail of every log in the
machine's state directory, the agent's view (the machine record, its processes) and the guest's view
(processes, mounts, network, dockerd) over the Guest API through the agent's `api.sock`, as `exec` does.
Each part either lands in the archive or in the README's list of what is missing and why: a stopped
machine, a gone agent or a deaf guest makes a smaller bundle, never a traceback.

What it must never do: put a secret in the archive. The machine secret file is never read into it (only
read to mask its text and to dial the guest), and every byte of every member passes `mask()` on the way in:
URL credentials (proxies), values of token/secret/password keys, bearer and basic credentials, and the
literal secrets this host knows (the machine secret, proxy passwords from the config and the agent's
environment). Importing this module must stay cheap (the CLI imports it to build its parser): stdlib and
the state module only; the Guest API client is imported when the guest is asked.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from .. import __version__
from .state import Machine, config_home

DEFAULT_LOG_MIB = 5
MASK = "***"
SECRET_FILE_NAMES = ("secret",)  # the machine secret's files (state dir and backend dir): never collected
COMMAND_TIMEOUT = 20.0  # seconds for one host tool or guest command
CALL_TIMEOUT = 30.0  # seconds for one Guest API call (a TCG guest under load is slow, not dead)

# ----------------------------------------------------------------------------------------- masking

# Every log passes through these, so they stay linear: key words are found in a lower-cased copy (a
# case-insensitive alternation is 10x slower) and no pattern starts or backtracks inside a word (possessive
# `*+`). Measured on 5 MiB of docker.log-like text on a loaded 2-core host: 7 s and quadratic on runs of key
# words with plain `[\w.-]*` patterns; 1.9 s this way, and at most 12 s for 5 MiB of nothing but `token=a`.
_URL_USERINFO = re.compile(rb"(?<![A-Za-z0-9+.\-])([A-Za-z][A-Za-z0-9+.\-]*+://)([^\s/@:'\"<>]++)(:[^\s/@'\"<>]*+)?@")
_SECRET_WORD = r"(?:token|secret|passw(?:or)?d|passphrase|api[_\-]?key|access[_\-]?key|private[_\-]?key|credential|auth)"
_SECRET_KEY = rf"[\w.\-]*?{_SECRET_WORD}[\w.\-]*+"  # a name that says its value is a secret
_KEYWORD = re.compile(_SECRET_WORD.encode())  # searched in lower-cased text
_WORD_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_WORD_REST = re.compile(rb"[\w.\-]*+")
_SEPARATOR_VALUE = re.compile(rb"[\"']?\s*[:=]\s*"  # `key=`, `key: `, `"key": `, then a value quoted or bare
                              rb"(?:\"([^\"\r\n]*)\"|'([^'\r\n]*)'|([^\s\"',;{}\[\]][^\s\"',;]*))")
_AUTHORIZATION = re.compile(rb"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)([^\"'\r\n]+)")  # the whole value
# A credential after the scheme word has a digit or base64's +/=; an English word after "basic" does not.
_SCHEME_CREDENTIAL = re.compile(rb"(?i)\b(bearer|basic)(\s+)(?=[A-Za-z._~\-]*[0-9+/=])[A-Za-z0-9._~+/=\-]{6,}")
_NOT_SECRET_KEY = re.compile(r"(?i)(_file|_path|_dir|_socket)$")  # names where a secret lives, not secrets


def mask(data: bytes, literals: tuple[bytes, ...] = ()) -> bytes:
    """`data` with every credential it shows replaced by ***.

    Literal secrets first (they may appear anywhere, in any form a program printed them), then URL
    credentials (`scheme://user:password@` → `scheme://***:***@`), Authorization values, `Bearer`/`Basic`
    credentials, and the values of keys that name a secret (`token=…`, `"password": "…"`, `X_API_KEY: …`),
    except keys naming a file or path where one is kept.
    """
    for literal in sorted(set(literals), key=len, reverse=True):
        if len(literal) >= 4:  # shorter ones would mask half the text and hide nothing
            data = data.replace(literal, MASK.encode())
    lower = data.lower()
    if b"://" in data:
        data = _URL_USERINFO.sub(lambda m: m[1] + (b"***:***@" if m[3] is not None else b"***@"), data)
    if b"authorization" in lower:
        data = _AUTHORIZATION.sub(lambda m: m[1] + MASK.encode(), data)
    if b"bearer" in lower or b"basic" in lower:
        data = _SCHEME_CREDENTIAL.sub(lambda m: m[1] + m[2] + MASK.encode(), data)
    return _mask_key_values(data)


def _mask_key_values(data: bytes) -> bytes:
    """The values of keys whose names say they are secrets, masked; one pass, each word looked at once."""
    lower = data.lower()  # ASCII only: the offsets stay the same
    parts: list[bytes] = []
    done = at = 0
    while (found := _KEYWORD.search(lower, at)) is not None:
        start, end = found.start(), _WORD_REST.match(data, found.end()).end()  # type: ignore[union-attr]
        while start > at and data[start - 1] in _WORD_BYTES:
            start -= 1
        at = end
        value = _SEPARATOR_VALUE.match(data, end)
        if value is None:
            continue
        at = value.end()
        group = next(i for i in (1, 2, 3) if value[i] is not None)
        if _NOT_SECRET_KEY.search(data[start:end].decode(errors="replace")) or value[group] in (b"", MASK.encode()):
            continue
        parts += [data[done:value.start(group)], MASK.encode()]
        done = value.end(group)
    parts.append(data[done:])
    return b"".join(parts)


def mask_structure(value: Any) -> Any:
    """A JSON-like structure with the values of secret-named keys and URL credentials masked."""
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if (re.fullmatch(_SECRET_KEY, str(key), re.IGNORECASE) and not _NOT_SECRET_KEY.search(str(key))
                    and isinstance(item, (str, int, float)) and item not in ("", 0)):
                result[key] = MASK
            else:
                result[key] = mask_structure(item)
        return result
    if isinstance(value, list):
        return [mask_structure(item) for item in value]
    if isinstance(value, str):
        return mask(value.encode()).decode(errors="replace")
    return value


def url_secrets(url: str) -> list[bytes]:
    """The user name and password of a URL (proxy) as literals to mask, raw and percent-decoded."""
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        username, password = parts.username, parts.password
    except ValueError:
        return []
    found = []
    for item in (password, username if password else None):
        if item:
            found += [item.encode(), unquote(item).encode()]
    return found


# ------------------------------------------------------------------------------------------ bundle


class Bundle:
    """The archive's members, masked as they are added, and the parts that could not be collected."""

    def __init__(self, top: str, literals: tuple[bytes, ...], say: Callable[[str], None]) -> None:
        self.top = top
        self.literals = literals
        self.say = say
        self.members: dict[str, bytes] = {}
        self.missing: list[tuple[str, str]] = []  # (part, why)
        self.notes: list[str] = []

    def add(self, name: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self.members[name] = mask(raw, self.literals)

    def add_json(self, name: str, value: Any) -> None:
        self.add(name, json.dumps(mask_structure(value), indent=2, default=str) + "\n")

    def lack(self, part: str, why: str) -> None:
        self.missing.append((part, why))
        self.say(f"  missing: {part}: {why}")

    def part(self, name: str, collect: Callable[[], None]) -> None:
        """Run one collector; whatever goes wrong becomes a line in the README, never the end of the run."""
        self.say(f"collecting {name}")
        try:
            collect()
        except Exception as exc:  # a part that fails must not cost the others: say why, go on
            self.lack(name, _sentence(exc))

    def write(self, path: Path, readme: str) -> None:
        import tarfile

        self.add("README.txt", readme)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)  # logs: the user's to share
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
                now = time.time()
                for name in ["README.txt", *sorted(n for n in self.members if n != "README.txt")]:
                    info = tarfile.TarInfo(f"{self.top}/{name}")
                    info.size, info.mtime, info.mode = len(self.members[name]), now, 0o644
                    tar.addfile(info, io.BytesIO(self.members[name]))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class Missing(Exception):
    """A part cannot be collected, for a reason that is no fault: the message says which."""


def _sentence(exc: BaseException) -> str:
    if isinstance(exc, Missing):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, TimeoutError) and not text:  # asyncio's too, since 3.11
        return "no answer in time"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------- the host


def _run(argv: list[str], timeout: float = COMMAND_TIMEOUT) -> str:
    """A host tool's output (stdout, else stderr); OSError or Missing with the reason when it fails."""
    import subprocess

    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                            errors="replace")
    if result.returncode != 0:
        raise Missing(f"{' '.join(argv[:2])} exited with {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[:200]}")
    return (result.stdout or result.stderr).strip()


def _first_line(argv: list[str]) -> str:
    path = shutil.which(argv[0]) if not os.path.isabs(argv[0]) else argv[0]
    if not path:
        return f"not installed ({argv[0]})"
    try:
        return _run([path, *argv[1:]]).splitlines()[0]
    except Exception as exc:  # not runnable, failed, hung (TimeoutExpired), printed nothing
        return f"unknown ({_sentence(exc)})"


def _agent_argv(pid: int | None) -> list[str]:
    if pid is None:
        return []
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _agent_proxy_secrets(pid: int | None) -> list[bytes]:
    """Proxy credentials in the agent's environment (`from_env`: dockerd got them): literals to mask."""
    if pid is None:
        return []
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []
    found = []
    for entry in environ:
        key, _, value = entry.partition(b"=")
        if key.lower() in (b"http_proxy", b"https_proxy", b"all_proxy"):
            found += url_secrets(value.decode(errors="replace"))
    return found


def _machine_secrets(machine: Machine) -> list[bytes]:
    """The machine secret's text, read only so that it can be masked wherever a program printed it."""
    found = []
    for path in (machine.secret_file, machine.backend_dir / "secret"):
        try:
            text = path.read_bytes().strip()
        except OSError:
            continue
        if text:
            found.append(text)
    return found


def _config_path(given: str | None, agent_argv: list[str]) -> str | None:
    """The configuration the machine runs with: --config, else the agent's --config, else the default."""
    if given:
        return given
    if "--config" in agent_argv[:-1]:
        return agent_argv[agent_argv.index("--config") + 1]
    default = config_home() / "boxpark.toml"
    return str(default) if default.exists() else None


def _processes(pids: list[int]) -> str:
    """pid, parent, state, RSS, elapsed time and argv of the host processes of a machine."""
    if not pids:
        return "(none)\n"
    return _run(["ps", "-ww", "-o", "pid,ppid,stat,rss,etime,args", "-p", ",".join(map(str, pids))]) + "\n"


def _tail(path: Path, limit: int) -> tuple[bytes, int]:
    """The last `limit` bytes of a file, from the start of a line where there is one; and the file's size."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - limit))
        data = f.read(limit)
    if size > limit:
        cut = data.find(b"\n")
        data = data[cut + 1:] if 0 <= cut < 4096 else data
    return data, size


def _logs(machine: Machine) -> list[Path]:
    """Every log of the machine (rotated ones too), each file once however many links point at it."""
    seen: set[str] = set()
    found = []
    for directory in (machine.dir, machine.backend_dir):
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if not re.fullmatch(r".+\.log(\.\d+)?", path.name) or path.name in SECRET_FILE_NAMES:
                continue
            real = os.path.realpath(path)
            if real in seen or not os.path.isfile(real):
                continue
            seen.add(real)
            found.append(path)
    return found


# --------------------------------------------------------------------------------------- the guest

# Run by the guest's python3 (its image has no ps or ip): a process table, or the network as the guest sees it.
GUEST_SCRIPT = r'''
import fcntl, os, socket, struct, sys
def processes():
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    print(f"{'PID':>7} {'PPID':>7} S {'RSS_KiB':>9} {'CPU_s':>8}  COMMAND")
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            argv = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        end = stat.rindex(")")
        f = stat[end + 2:].split()
        cpu = (int(f[11]) + int(f[12])) / tick
        print(f"{pid:>7} {f[1]:>7} {f[0]} {int(f[21]) * page // 1024:>9} {cpu:>8.2f}  "
              + (argv or "[" + stat[stat.index("(") + 1:end] + "]"))
def read(path):
    try:
        return open(path).read().strip()
    except OSError as exc:
        return f"({exc.strerror})"
def network():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v6 = [l.split() for l in read("/proc/net/if_inet6").splitlines() if len(l.split()) == 6]
    for index, name in sorted(socket.if_nameindex()):
        c = f"/sys/class/net/{name}/"
        print(f"{index}: {name}: state {read(c + 'operstate')} mtu {read(c + 'mtu')} mac {read(c + 'address')}")
        for request, what in ((0x8915, "inet"), (0x891b, "netmask")):
            try:
                raw = fcntl.ioctl(s.fileno(), request, struct.pack("256s", name.encode()[:15]))
                print(f"    {what} {socket.inet_ntoa(raw[20:24])}")
            except OSError:
                pass
        for a in v6:
            if a[5] == name:
                print(f"    inet6 {socket.inet_ntop(socket.AF_INET6, bytes.fromhex(a[0]))}/{int(a[2], 16)}")
    print("\nroutes (IPv4):")
    for line in read("/proc/net/route").splitlines()[1:]:
        f = line.split()
        addr = lambda h: socket.inet_ntoa(struct.pack("<I", int(h, 16)))
        print(f"    {addr(f[1])}/{bin(int(f[7], 16)).count('1')} via {addr(f[2])} dev {f[0]} metric {f[6]}")
    print("\nlistening sockets:")
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in read(f"/proc/net/{proto}").splitlines()[1:]:
            f = line.split()
            if len(f) > 3 and (f[3] == "0A" or proto.startswith("udp") and f[3] == "07"):
                host, port = f[1].split(":")
                words = struct.pack("<" + "I" * (len(host) // 8), *(int(host[i:i + 8], 16) for i in range(0, len(host), 8)))
                family = socket.AF_INET6 if len(words) == 16 else socket.AF_INET
                print(f"    {proto:<5} {socket.inet_ntop(family, words)} port {int(port, 16)}")
    for path in ("/etc/resolv.conf", "/etc/hosts"):
        print(f"\n{path}:\n{read(path)}")
{"processes": processes, "network": network}[sys.argv[1]]()
'''

GUEST_COMMANDS = {  # member name → argv; run in the guest, each with its own timeout
    "guest/processes.txt": ["python3", "-I", "-c", GUEST_SCRIPT, "processes"],
    "guest/network.txt": ["python3", "-I", "-c", GUEST_SCRIPT, "network"],
    "guest/mounts.txt": ["findmnt", "--list", "-o", "TARGET,SOURCE,FSTYPE,OPTIONS"],
    "guest/df.txt": ["df", "-h"],
    "guest/dockerd-version.txt": ["dockerd", "--version"],
    "guest/docker-version.txt": ["docker", "version"],
    "guest/docker-info.txt": ["docker", "info"],
}
GUEST_FILES = {  # member name → guest path
    "guest/mountinfo.txt": "/proc/self/mountinfo",
    "guest/cmdline.txt": "/proc/cmdline",
    "guest/meminfo.txt": "/proc/meminfo",
    "guest/os-release.txt": "/etc/os-release",
    "guest/daemon.json": "/etc/docker/daemon.json",
}


async def _guest_view(machine: Machine, secret: bytes | None, backend: str, bundle: Bundle,
                      versions: dict[str, Any]) -> None:
    import asyncio

    import msgspec

    from .client import GuestClient

    client = await asyncio.wait_for(GuestClient.open(f"unix:{machine.api_socket}", secret=secret), CALL_TIMEOUT)
    async with client:
        info = await asyncio.wait_for(client.info(), CALL_TIMEOUT)
        bundle.add_json("guest/info.json", msgspec.to_builtins(info))
        versions["guest"] = {"kernel": info.kernel, "arch": info.arch, "boxpark": info.boxpark,
                             "protocol": info.protocol, "uptime_s": round(info.uptime, 1)}
        try:
            supervised = await asyncio.wait_for(client.list_processes(), CALL_TIMEOUT)
            bundle.add_json("guest/supervised.json", msgspec.to_builtins(supervised))
        except Exception as exc:
            bundle.lack("guest/supervised.json (the init's supervised processes)", _sentence(exc))
        for name, path in GUEST_FILES.items():
            if name == "guest/cmdline.txt" and backend == "sandbox":
                continue  # its /proc/cmdline is the host's; the sandbox's own is agent/kernel-cmdline.txt
            try:
                bundle.add(name, await asyncio.wait_for(client.read_all(path), CALL_TIMEOUT))
            except Exception as exc:
                bundle.lack(f"{name} ({path})", _sentence(exc))
        for name, argv in GUEST_COMMANDS.items():
            shown = " ".join(argv[:2]) if argv[0] != "python3" else f"the guest's {argv[-1]} script"
            try:
                result = await asyncio.wait_for(client.exec(argv, timeout=COMMAND_TIMEOUT), CALL_TIMEOUT)
            except Exception as exc:
                bundle.lack(f"{name} ({shown})", _sentence(exc))
                continue
            out = result.stdout + (b"\n--- stderr\n" + result.stderr if result.stderr else b"")
            if result.code != 0:
                why = "timed out" if result.timed_out else f"exit {result.code}, signal {result.signal}"
                out += f"\n--- {shown}: {why}\n".encode()
            bundle.add(name, out)
            if name == "guest/dockerd-version.txt" and result.code == 0:
                versions["guest"]["dockerd"] = result.stdout.decode(errors="replace").strip()


# --------------------------------------------------------------------------------------- the bundle


def write_bundle(machine_name: str, out_path: str | os.PathLike[str] | None = None, *,
                 config_path: str | None = None, log_bytes: int = DEFAULT_LOG_MIB << 20,
                 say: Callable[[str], None] = lambda message: None) -> Path:
    """Collect the machine's diagnostics into one tar.gz at `out_path` (default: in the current directory).

    Raises StateError for a bad machine name and OSError when the archive cannot be written; every other
    problem becomes a line of the README's "missing" list.
    """
    machine = Machine.named(machine_name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    top = f"boxpark-diagnose-{machine.name}-{stamp}"
    path = Path(out_path) if out_path else Path.cwd() / f"{top}.tar.gz"
    if path.is_dir() or str(out_path).endswith(os.sep):
        path = path / f"{top}.tar.gz"

    agent_pid = machine.agent_pid()
    running = agent_pid is not None and machine.control_answers()
    agent_argv = _agent_argv(agent_pid)
    config_file = _config_path(config_path, agent_argv)
    secrets = _machine_secrets(machine)
    literals = [*secrets, *_agent_proxy_secrets(agent_pid)]
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        literals += url_secrets(os.environ.get(key, ""))
    config: Any = None
    config_error = ""
    try:
        from .config import load  # msgspec, tomllib: cheap, but only when diagnosing

        config = load(config_file)
        for url in (config.proxy.http, config.proxy.https):
            literals += url_secrets(url)
    except Exception as exc:  # a bad file is still worth a look (masked): say why it did not load
        config_error = _sentence(exc)
    bundle = Bundle(top, tuple(literals), say)
    say(f"writing diagnostics of machine {machine.name!r} ({machine.dir})")

    versions: dict[str, Any] = {"host": {"boxpark": __version__, "python": sys.version.split()[0],
                                         "platform": platform.platform(), "kernel": " ".join(os.uname()),
                                         "docker_cli": _first_line(["docker", "--version"])}}
    backend = config.backend if config is not None else "unknown"

    def collect_config() -> None:
        if config_file and os.path.exists(config_file):
            bundle.add("config/boxpark.toml", Path(config_file).read_bytes())
        elif not running:
            bundle.lack("config/boxpark.toml", "no agent runs to say which file it was started with, and there "
                                              "is no default one; config/effective.json shows the defaults "
                                              "(give the file with --config FILE)")
        if config is None:
            raise Missing(f"the configuration did not load: {config_error}")
        import msgspec

        from .config import proxy_env

        bundle.add_json("config/effective.json", {"file": config_file or "(none: the defaults)",
                                                  "config": msgspec.to_builtins(config),
                                                  "dockerd_proxy_env": proxy_env(config.proxy)})
        if config.docker.daemon_json:
            from .config import expand

            daemon = Path(expand(config.docker.daemon_json))
            try:
                bundle.add_json("config/daemon.json", json.loads(daemon.read_text()))
            except (OSError, ValueError) as exc:
                bundle.lack(f"config/daemon.json ({daemon})", _sentence(exc))

    def collect_versions() -> None:
        tools = {"qemu": [["qemu-system-" + ("aarch64" if config and config.guest_arch == "arm64" else "x86_64"),
                           "--version"], ["/usr/lib/qemu/virtiofsd", "--version"]],
                 "sandbox": [["unshare", "--version"], ["slirp4netns", "--version"]],
                 "vz": [["sw_vers", "-productVersion"]]}.get(backend, [])
        versions["backend"] = {"name": backend, **{os.path.basename(argv[0]): _first_line(argv) for argv in tools}}

    def collect_manifest() -> None:
        from .config import expand

        arch = config.guest_arch if config is not None else platform.machine()
        image = Path(expand(config.image)) if config is not None and config.image else None
        if image is None:
            from ..dirs import cache_home  # where `image build` and `image import` put it (as the backends look)

            image = cache_home() / "images" / arch
        if not (image / "manifest.json").exists():
            raise Missing(f"no image manifest in {image}")
        manifest = json.loads((image / "manifest.json").read_text())
        bundle.add_json("image-manifest.json", manifest)
        versions["image"] = {"dir": str(image), "inputs_hash": manifest.get("inputs_hash"),
                             "kernel": manifest.get("inputs", {}).get("kernel"), "arch": manifest.get("arch"),
                             "suite": manifest.get("suite")}

    def collect_status() -> None:
        if running:
            status = next(machine.request("status"))
        else:  # what `boxpark status --json` says of a machine with no agent
            status = machine.offline_status()
        bundle.add_json("status.json", status)

    def collect_timeline() -> None:
        timeline = machine.read_json(machine.timeline_file)
        if timeline is None:
            raise Missing(f"no {machine.timeline_file.name}: the machine never reached Ready")
        lines = [f"boot {timeline.get('boot_id')}: kernel {timeline.get('kernel')}, "
                 f"{timeline.get('monotonic_ms') or 0:.0f} ms to Ready"]
        for step, ms, error in timeline.get("steps", []):
            lines.append(f"  {step:<10} {ms:8.1f} ms" + (f"  ERROR {error}" if error else ""))
        bundle.add("boot-timeline.txt", "\n".join(lines) + "\n")
        bundle.add_json("boot-timeline.json", timeline)

    def collect_logs() -> None:
        logs = _logs(machine)
        if not logs:
            raise Missing(f"no log files in {machine.dir}")
        for log in logs:
            try:
                data, size = _tail(log, log_bytes)
            except OSError as exc:
                bundle.lack(f"logs/{log.name}", _sentence(exc))
                continue
            where = "backend/" if log.parent == machine.backend_dir else ""
            bundle.add(f"logs/{where}{log.name}", data)
            if size > len(data):
                bundle.notes.append(f"logs/{where}{log.name}: the last {len(data)} of {size} bytes")

    def collect_agent() -> None:
        record = machine.read_json(machine.backend_dir / "machine.json")
        cmdline = machine.backend_dir / "cmdline"
        if cmdline.exists():
            bundle.add("agent/kernel-cmdline.txt", cmdline.read_bytes())
        if not running:
            raise Missing("no agent is running (its processes and machine record exist only while it runs)")
        pids = [agent_pid] if agent_pid else []
        if isinstance(record, dict):
            bundle.add_json("agent/machine.json", record)
            pids += [p for p in record.get("pids", []) if isinstance(p, int) and p not in pids]
        else:
            bundle.lack("agent/machine.json", "the agent has no machine record (the machine is not booted)")
        bundle.add("agent/processes.txt", _processes(pids))

    def collect_guest() -> None:
        if not running:
            raise Missing("the machine is not running: no agent answers on agent.sock, so the guest "
                               "cannot be asked")
        if not machine.api_socket.exists():
            raise Missing(f"the agent serves no {machine.api_socket.name} (the guest is not up yet)")
        import asyncio

        asyncio.run(_guest_view(machine, secrets[0] if secrets else None, backend, bundle, versions))

    bundle.part("config", collect_config)
    bundle.part("versions of the backend's tools", collect_versions)
    bundle.part("image manifest", collect_manifest)
    bundle.part("status", collect_status)
    bundle.part("boot timeline", collect_timeline)
    bundle.part(f"logs (the last {log_bytes / (1 << 20):g} MiB of each)", collect_logs)
    bundle.part("agent's view (machine record, processes)", collect_agent)
    bundle.part("guest's view (processes, mounts, network, dockerd)", collect_guest)
    bundle.add_json("versions.json", versions)
    path.parent.mkdir(parents=True, exist_ok=True)
    bundle.write(path, _readme(machine, running, config_file, bundle))
    return path


def _readme(machine: Machine, running: bool, config_file: str | None, bundle: Bundle) -> str:
    lines = [f"Boxpark diagnostics of machine {machine.name!r}, written {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
             f"by boxpark {__version__} on {platform.node() or 'this host'}.",
             f"Machine: {'running (its agent answered)' if running else 'not running'}; state directory "
             f"{machine.dir}{'' if machine.dir.exists() else ' (absent: never started here)'}; "
             f"configuration {config_file or '(none: the defaults)'}.",
             "",
             "Masked before writing: credentials in URLs (user:password@ of proxies), values of token, secret,",
             "password and key settings, bearer/basic credentials, and the machine secret wherever it appeared.",
             "The machine secret file is never included.",
             "",
             "Contents:"]
    lines += [f"  {name}" for name in sorted(bundle.members)]
    if bundle.notes:
        lines += ["", "Shortened:"] + [f"  {note}" for note in bundle.notes]
    lines += ["", "Missing (could not be collected):" if bundle.missing else "Missing: nothing; every part was collected."]
    lines += [f"  {part}: {why}" for part, why in bundle.missing]
    return "\n".join(lines) + "\n"
