"""Machine configuration: `boxpark.toml`, checked whole before anything boots.

Every key is optional; `DEFAULT_TOML` is the documented default and needs no editing. A bad file is a
`ConfigError` naming the key and the reason. Sizes take "512MiB", "2GiB", "20G" or a number of bytes.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

import msgspec

from ..errors import BoxparkError
from .spec import host_arch

DEFAULT_BACKEND = "vz" if sys.platform == "darwin" else "qemu"

DEFAULT_TOML = f"""\
# boxpark.toml: every key is optional; these are the defaults.
backend = "{DEFAULT_BACKEND}"{' ' * (12 - len(DEFAULT_BACKEND))}# qemu (Linux), vz (macOS), sandbox (Linux, no VM: for development)
# arch = "amd64"        # the guest's architecture: amd64 or arm64 (default: the host's)
cpus = 2
memory = "2GiB"
console = false         # the guest's console on hvc0 (always logged to the state dir when on)
# image = "~/.cache/boxpark/images/amd64"   # a built or imported image directory
# kernel = ""  initrd = ""                  # override the image's kernel and initramfs
# cmdline = ""                              # replace the whole kernel command line
# ssh_agent = ""        # the host's SSH agent at /run/host-services/ssh-auth.sock in the guest:
                        # "" = SSH_AUTH_SOCK where `boxpark up` runs, a socket path, or "off"

[disk]                  # the data disk: Docker's data lives here
size = "20GiB"          # grow it here; Boxpark resizes the guest's filesystem on the next `up`
# path = ""             # default: <state dir>/data.img

[swap]
size = "1GiB"           # "0" for none

[docker]
# daemon_json = "~/.config/boxpark/daemon.json"   # your daemon.json; Boxpark adds what it needs
                        # (a unix socket in "hosts", "data-root": setting those yourself is refused)
# socket = ""           # the host socket; default: <state dir>/docker.sock
restart_delay = 1.0     # seconds before restarting a dockerd that exited, doubling ...
restart_delay_max = 30.0  # ... up to this; back to restart_delay once it has been ready for a minute
ready_timeout = 120.0   # seconds dockerd has to send READY=1 before it is stopped and started again
log_size = "10MiB"      # docker.log rolls over at this size ...
log_files = 3           # ... keeping this many old ones (docker.log.1 is the newest)
mount_guard = true      # refuse a bind mount of a path neither shared from the host nor in the guest
                        # (with a sentence saying how to share it); false: dockerd makes it empty, silently

[time]
push_interval = 60      # seconds between pushes of the host's time to the guest

[dns]                   # names resolve in the guest and its containers as on the host: A/AAAA/PTR questions
host_resolver = true    # go to the host's own resolver (hosts file, VPN split DNS, macOS scoped resolvers),
                        # others and failures to the network's; false: the network's resolvers only
# hosts_file = ""       # an extra hosts file read before the host's resolver (names for containers only)

[ports]                 # published container ports (docker run -p) answer on the host
forward = true
all_interfaces = false  # true: a binding on all interfaces (docker's default) listens on all of the
                        # host's; false: on 127.0.0.1 and ::1 only (others on the network cannot reach it)

[home]                  # your home directory, shared into the guest at the same path (virtiofs), so that
share = true            # `docker run -v "$PWD":/src ...` works from anywhere under it; false: not shared
# path = ""             # default: $HOME of the user running `up`
read_only = false       # a [[mounts]] entry with the same target replaces this share

[proxy]                 # dockerd's proxies (pulls, pushes, logins), written as the guest reaches them
# http = ""             # HTTP_PROXY, e.g. "http://proxy.corp:3128"; this host is host.boxpark.internal
# https = ""            # HTTPS_PROXY
# no_proxy = ""         # NO_PROXY, e.g. "localhost,.corp"
from_env = true         # a key left empty takes HTTP(S)_PROXY/NO_PROXY from the environment of `up`
                        # (a proxy there on localhost/127.x becomes host.boxpark.internal: the host)

[certificates]          # extra CA certificates (PEM files) the guest trusts: dockerd (registries)
ca = []                 # and the guest's CA bundle, e.g. ["~/corp-root-ca.pem"]

# [[mounts]]            # host directories (virtiofs) or guest disks, mounted parent first
# source = "/srv/data"
# target = "/srv/data"
# type = "virtiofs"     # virtiofs for a host directory, tmpfs, or a filesystem type for a guest device
# options = []
# read_only = false
# optional = false      # true: a failure is logged and `up` goes on
"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)


class ConfigError(BoxparkError):
    """The configuration is wrong: `key` names the setting, the message says what to change."""

    exit_code = 2

    def __init__(self, key: str, reason: str, path: str = "") -> None:
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{key}: {reason}" if key else f"{where}{reason}")
        self.key = key


def parse_size(value: str | int, key: str) -> int:
    """Bytes from "2GiB", "512M", "20G" or an integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(key, "a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a size like \"2GiB\", got {value!r}")
    match = _SIZE.match(value)
    if not match:
        raise ConfigError(key, f"expected a size like \"2GiB\" or \"512MiB\", got {value!r}")
    number, unit = float(match[1]), match[2].upper()
    return int(number * 1024 ** "KMGT".find(unit) * 1024) if unit else int(number)


class Mount(msgspec.Struct, forbid_unknown_fields=True):
    source: str
    target: str
    type: str = "virtiofs"
    options: list[str] = []
    read_only: bool = False
    optional: bool = False


class Disk(msgspec.Struct, forbid_unknown_fields=True):
    size: str | int = "20GiB"
    path: str = ""


class Swap(msgspec.Struct, forbid_unknown_fields=True):
    size: str | int = "1GiB"
    disk: str = ""


class Docker(msgspec.Struct, forbid_unknown_fields=True):
    daemon_json: str = ""
    socket: str = ""
    restart_delay: float = 1.0
    restart_delay_max: float = 30.0
    ready_timeout: float = 120.0
    log_size: str | int = "10MiB"
    log_files: int = 3
    mount_guard: bool = True


class Time(msgspec.Struct, forbid_unknown_fields=True):
    push_interval: float = 60.0


class Dns(msgspec.Struct, forbid_unknown_fields=True):
    host_resolver: bool = True
    hosts_file: str = ""


class Ports(msgspec.Struct, forbid_unknown_fields=True):
    forward: bool = True
    all_interfaces: bool = False


class Home(msgspec.Struct, forbid_unknown_fields=True):
    share: bool = True
    path: str = ""
    read_only: bool = False


class Proxy(msgspec.Struct, forbid_unknown_fields=True):
    http: str = ""
    https: str = ""
    no_proxy: str = ""
    from_env: bool = True


class Certificates(msgspec.Struct, forbid_unknown_fields=True):
    ca: list[str] = []


class Config(msgspec.Struct, forbid_unknown_fields=True):
    backend: Literal["qemu", "vz", "sandbox"] = DEFAULT_BACKEND  # type: ignore[assignment]
    arch: Literal["amd64", "arm64", ""] = ""
    cpus: int = 2
    memory: str | int = "2GiB"
    console: bool = False
    image: str = ""
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    disk: Disk = msgspec.field(default_factory=Disk)
    swap: Swap = msgspec.field(default_factory=Swap)
    docker: Docker = msgspec.field(default_factory=Docker)
    time: Time = msgspec.field(default_factory=Time)
    ports: Ports = msgspec.field(default_factory=Ports)
    dns: Dns = msgspec.field(default_factory=Dns)
    home: Home = msgspec.field(default_factory=Home)
    proxy: Proxy = msgspec.field(default_factory=Proxy)
    certificates: Certificates = msgspec.field(default_factory=Certificates)
    mounts: list[Mount] = []
    ssh_agent: str = ""  # the host's SSH agent socket for the guest: "" = SSH_AUTH_SOCK of `up`, "off" = none

    # -- derived, checked values
    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory, "memory")

    @property
    def disk_bytes(self) -> int:
        return parse_size(self.disk.size, "disk.size")

    @property
    def swap_bytes(self) -> int:
        return parse_size(self.swap.size, "swap.size")

    @property
    def docker_log_bytes(self) -> int:
        return parse_size(self.docker.log_size, "docker.log_size")

    @property
    def guest_arch(self) -> str:
        return self.arch or host_arch()

    def home_mount(self) -> Mount | None:
        """The home share as a mount, or None: turned off, no such directory, or a [[mounts]] entry has its target."""
        if not self.home.share:
            return None
        path = os.path.normpath(expand(self.home.path) if self.home.path else os.path.expanduser("~"))
        if not os.path.isabs(path) or path == "/" or not os.path.isdir(path):
            return None
        if any(os.path.normpath(m.target) == path for m in self.mounts):
            return None
        return Mount(source=path, target=path, read_only=self.home.read_only)

    def all_mounts(self) -> list[Mount]:
        """The configured mounts and the home share: what the guest mounts."""
        home = self.home_mount()
        return [*self.mounts, home] if home is not None else list(self.mounts)


MEMORY_FILESYSTEMS = ("tmpfs",)  # mounts that need no device: the source is only a name

CHOICES = {"backend": ("qemu", "vz", "sandbox"), "arch": ("amd64", "arm64")}


def expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path)) if path else path


def validate(config: Config, path: str = "") -> Config:
    """Check what the schema cannot: ranges, sizes, paths, mounts. Raises ConfigError."""
    def fail(key: str, reason: str) -> None:
        raise ConfigError(key, reason, path)

    if not 1 <= config.cpus <= 64:
        fail("cpus", f"must be between 1 and 64, not {config.cpus}")
    try:
        memory = config.memory_bytes
        disk = config.disk_bytes
        config.swap_bytes
        config.docker_log_bytes
    except ConfigError as exc:
        raise ConfigError(exc.key, str(exc).split(": ", 1)[1], path) from None
    if memory < 256 * 1024 ** 2:
        fail("memory", f"at least 256MiB is needed, not {config.memory}")
    if disk and disk < 64 * 1024 ** 2:
        fail("disk.size", f"at least 64MiB is needed, not {config.disk.size}")
    if config.backend == "vz" and sys.platform != "darwin":
        fail("backend", "vz needs macOS; use qemu (or sandbox for development) here")
    if config.backend == "qemu" and sys.platform == "darwin":  # its backend watches QEMU with Linux's pidfds
        fail("backend", "qemu is not offered on macOS; use vz (Apple's Virtualization.framework) here")
    if config.docker.restart_delay <= 0 or config.docker.restart_delay_max < config.docker.restart_delay:
        fail("docker.restart_delay", "must be positive and not above docker.restart_delay_max")
    if not config.docker.ready_timeout > 0:
        fail("docker.ready_timeout", "must be positive")
    if config.docker_log_bytes < 4096:
        fail("docker.log_size", f"at least 4KiB is needed, not {config.docker.log_size}")
    if not 0 <= config.docker.log_files <= 100:
        fail("docker.log_files", f"must be between 0 and 100, not {config.docker.log_files}")
    if config.time.push_interval < 1:
        fail("time.push_interval", "must be at least 1 second")
    seen: set[str] = set()
    for i, mount in enumerate(config.mounts):
        key = f"mounts[{i}]"
        if not mount.target.startswith("/"):
            fail(f"{key}.target", f"must be an absolute path in the guest, not {mount.target!r}")
        target = os.path.normpath(mount.target)
        if target == "/":
            fail(f"{key}.target", "cannot be / (the root is the image's)")
        if target in seen:
            fail(f"{key}.target", f"{target} is mounted twice")
        seen.add(target)
        if mount.type == "virtiofs":
            source = expand(mount.source)
            if not os.path.isdir(source) and not mount.optional:
                fail(f"{key}.source", f"{mount.source} is not a directory on this host")
        elif mount.type not in MEMORY_FILESYSTEMS and not mount.source.startswith("/dev/"):
            fail(f"{key}.source", f"a {mount.type} mount needs a guest device like /dev/vdc, not {mount.source!r}")
    if config.home.path and config.home.share:
        home = expand(config.home.path)
        if not os.path.isabs(home) or os.path.normpath(home) == "/":
            fail("home.path", f"must be an absolute directory other than /, not {config.home.path!r}")
        if not os.path.isdir(home):
            fail("home.path", f"{config.home.path} is not a directory on this host")
    for key in ("http", "https"):
        value = getattr(config.proxy, key)
        if value and not _PROXY_URL.match(value):
            fail(f"proxy.{key}", f"expected a URL like \"http://proxy.example:3128\", not {value!r}")
    for i, name in enumerate(config.certificates.ca):
        reason = pem_problem(expand(name))
        if reason:
            fail(f"certificates.ca[{i}]", f"{name}: {reason}")
    for key, value in (("image", config.image), ("kernel", config.kernel), ("initrd", config.initrd),
                       ("docker.daemon_json", config.docker.daemon_json)):
        if value and not os.path.exists(expand(value)):
            fail(key, f"{value} does not exist")
    if config.docker.daemon_json:
        reason = daemon_json_problem(expand(config.docker.daemon_json), config.backend)
        if reason:
            fail("docker.daemon_json", f"{config.docker.daemon_json}: {reason}")
    return config


def daemon_owned(backend: str) -> dict[str, str]:
    """The daemon.json keys Boxpark sets itself on `backend`, each with why a user's value cannot stay."""
    owned = {"data-root": "Boxpark keeps Docker's data on the machine's data disk (see [disk])"}
    if backend == "sandbox":
        for key in ("bridge", "iptables"):
            owned[key] = "the sandbox backend runs dockerd without a bridge or iptables"
    return owned


def daemon_json_problem(path: str, backend: str) -> str:
    """What makes the user's daemon.json unusable ("" when nothing): unreadable, not a JSON object, or a key
    Boxpark sets itself. Refused at load, before anything boots, rather than silently overridden."""
    import json

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    except ValueError as exc:  # UnicodeDecodeError too
        return f"not valid JSON: {exc}"
    if not isinstance(data, dict):
        return "must be a JSON object"
    for key, why in daemon_owned(backend).items():
        if key in data:
            return f"remove \"{key}\": {why}"
    hosts = data.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        return "\"hosts\" must be a list of strings"
    for host in hosts:
        if not host.startswith("tcp://"):
            return (f"remove {host!r} from \"hosts\": Boxpark serves dockerd's unix socket itself "
                    f"(the host's is [docker] socket); only tcp:// entries can be added")
    return ""


_PROXY_URL = re.compile(r"^(https?|socks5h?)://([^/@\s]+@)?[^/:@\s]+(:\d{1,5})?/?$", re.IGNORECASE)
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----", re.DOTALL)


def pem_certificates(data: bytes) -> list[bytes]:
    """Each PEM certificate block in `data` (BEGIN to END line), in order."""
    return [match[0] + b"\n" for match in _PEM.finditer(data)]


def pem_problem(path: str) -> str:
    """What is wrong with a CA certificate file ("" when it holds one or more well-formed PEM certificates)."""
    import binascii

    try:
        with open(path, "rb") as f:
            data = f.read(4 * 1024 * 1024)
    except OSError as exc:
        return exc.strerror or str(exc)
    blocks = list(_PEM.finditer(data))
    if not blocks:
        return "not a PEM certificate (no \"-----BEGIN CERTIFICATE-----\" block)"
    for block in blocks:
        try:
            der = binascii.a2b_base64(b"".join(block[1].split()))
        except binascii.Error:
            return "a certificate block is not valid base64"
        if der[:1] != b"\x30":  # a DER SEQUENCE
            return "a certificate block does not hold a DER certificate"
    return ""


GUEST_SEES_HOST = "host.boxpark.internal"  # the host, by the name the guest resolves on every backend
_LOOPBACK_PROXY = re.compile(r"^(?P<scheme>[a-z0-9]+://)?(?P<user>[^/@]*@)?(?P<host>localhost|127(?:\.\d+){3}|\[::1\])(?=[:/]|$)",
                             re.IGNORECASE)


def proxy_env(proxy: Proxy, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """HTTP_PROXY, HTTPS_PROXY, NO_PROXY (and their lower-case twins) for dockerd in the guest.

    A configured key wins; an empty one is taken from `environ` (the environment of `up`, upper case
    first) when `from_env` is on. A proxy taken from the environment on the host's loopback (localhost,
    127.x) is meant for the host: the guest reaches it as host.boxpark.internal (10.0.2.2, the host's
    loopback, on QEMU and the sandbox). Keys with no value are left out.
    """
    environ = os.environ if environ is None else environ
    result = {}
    for key, value in (("HTTP_PROXY", proxy.http), ("HTTPS_PROXY", proxy.https), ("NO_PROXY", proxy.no_proxy)):
        if not value and proxy.from_env:
            value = environ.get(key) or environ.get(key.lower()) or ""
            if key != "NO_PROXY":
                value = _LOOPBACK_PROXY.sub(lambda m: f"{m['scheme'] or ''}{m['user'] or ''}{GUEST_SEES_HOST}", value)
        if value:
            result[key] = result[key.lower()] = value
    return result


def loads(text: str, path: str = "") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"not valid TOML: {exc}", path) from None
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        where = where.rstrip("`").lstrip(".")
        unknown = re.search(r"unknown field `([^`]*)`", message)
        if unknown:
            key = f"{where}.{unknown[1]}" if where else unknown[1]
            raise ConfigError(key, "unknown setting (`boxpark config --default` shows them all)", path) from None
        if message.startswith("Invalid enum value") and where in CHOICES:
            message = f"{message.split(' ', 3)[-1]} is not one of {', '.join(CHOICES[where])}"
        raise ConfigError(where, message[0].lower() + message[1:], path) from None
    return validate(config, path)


def load(path: str | Path | None) -> Config:
    """The configuration from `path`; no file at all means the defaults."""
    if path is None or not os.path.exists(path):
        return validate(Config())
    try:
        text = Path(path).read_text(encoding="utf-8")  # TOML is UTF-8, whatever the locale says
    except OSError as exc:
        raise ConfigError("", f"cannot read: {exc.strerror}", str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"not UTF-8 text (byte {exc.start}); save it as UTF-8", str(path)) from None
    return loads(text, str(path))


SIZES = ("memory", "disk.size", "swap.size", "docker.log_size")  # equal when they are the same bytes


def changed_settings(running: dict[str, Any], config: Config) -> list[str]:
    """The settings (dotted keys) in which `config` differs from what a running machine started with
    (`running`: its config as builtins, from the agent's status)."""
    def flat(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    def same(key: str, old: Any, new: Any) -> bool:
        if key in SIZES and old is not None and new is not None:
            try:
                return parse_size(old, key) == parse_size(new, key)
            except ConfigError:
                return False
        return bool(old == new)

    was, now = flat(running), flat(msgspec.to_builtins(config))
    return sorted(key for key in was.keys() | now.keys() if not same(key, was.get(key), now.get(key)))


def sorted_mounts(mounts: list[Mount]) -> list[Mount]:
    """Parents before children: by the depth of the normalised target, then by name."""
    return sorted(mounts, key=lambda m: (os.path.normpath(m.target).count("/"), len(m.target), m.target))
