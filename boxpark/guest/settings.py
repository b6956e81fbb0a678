"""The init's settings: `boxpark.KEY=VALUE` words from the kernel command line or a settings file.

The boot path: stdlib only, nothing slow. A bad value never stops the boot: it is reported in `warnings`
(the init logs them) and the default stands. docs/boot.md is the reference for every key.
"""

from __future__ import annotations

import os

DEFAULT_API = "vsock:4294967295:1024"
DEFAULT_EVENTS = "vsock:2:1025"


class Static:
    """A static eth0 configuration: `static:ADDR/PREFIX,GATEWAY[,DNS…]`."""

    def __init__(self, address: str, prefix: int, gateway: str, dns: list[str] | None = None) -> None:
        self.address = address
        self.prefix = prefix
        self.gateway = gateway
        self.dns = dns or []


class Settings:
    """Plain attributes (no dataclass: its import costs 15 ms of the boot)."""

    def __init__(self) -> None:
        self.api = [DEFAULT_API]
        self.api_peers: list[str] | None = None  # tcp: the only source addresses served (None: any)
        self.events = DEFAULT_EVENTS
        self.secret = ""  # "fwcfg:NAME" or "file:PATH"
        self.net = "dhcp"  # "dhcp", "none" or "static"
        self.static: Static | None = None
        self.hostname = "boxpark"
        self.log = "info"
        self.logfile = ""
        self.sandbox = False
        self.warnings: list[str] = []


def _ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and 0 <= int(p) <= 255 for p in parts)


def parse(words: list[str]) -> Settings:
    """Settings from `boxpark.*` words; other words are ignored, bad ones end up in `warnings`."""
    settings = Settings()
    for word in words:
        if not word.startswith("boxpark."):
            continue
        key, sep, value = word[len("boxpark."):].partition("=")
        if not sep:
            settings.warnings.append(f"ignored {word!r}: expected boxpark.{key}=VALUE")
            continue
        problem = _apply(settings, key, value)
        if problem:
            settings.warnings.append(f"ignored {word!r}: {problem}")
    return settings


def _apply(settings: Settings, key: str, value: str) -> str:
    """Set one key; return why not, or ''."""
    if key == "api":
        addresses = [a for a in value.split(",") if a]
        if not addresses or any(a.split(":", 1)[0] not in ("vsock", "unix", "tcp") for a in addresses):
            return "expected vsock:, unix: or tcp: addresses"
        settings.api = addresses
    elif key == "api_peers":
        peers = [p for p in value.split(",") if p]
        if not peers or not all(_ipv4(p) for p in peers):
            return "expected IPv4 addresses, comma-separated"
        settings.api_peers = peers
    elif key == "events":
        if value.split(":", 1)[0] not in ("vsock", "unix", "tcp"):
            return "expected a vsock:, unix: or tcp: address"
        settings.events = value
    elif key == "secret":
        if not value.startswith(("fwcfg:", "file:")):
            return "expected fwcfg:NAME or file:PATH"
        settings.secret = value
    elif key == "net":
        if value in ("dhcp", "none"):
            settings.net = value
        elif value.startswith("static:"):
            fields = value[len("static:"):].split(",")
            address, _, prefix = fields[0].partition("/")
            if len(fields) < 2 or not _ipv4(address) or not prefix.isdigit() or not 0 <= int(prefix) <= 32 \
                    or not all(_ipv4(f) for f in fields[1:]):
                return "expected static:ADDR/PREFIX,GATEWAY[,DNS…] with IPv4 addresses"
            settings.net = "static"
            settings.static = Static(address, int(prefix), fields[1], fields[2:])
        else:
            return "expected dhcp, none or static:ADDR/PREFIX,GATEWAY[,DNS…]"
    elif key == "hostname":
        if not value or len(value) > 64 or not all(c.isalnum() or c in "-." for c in value):
            return "expected a hostname of letters, digits, '-' and '.'"
        settings.hostname = value
    elif key == "log":
        if value not in ("debug", "info", "warning"):
            return "expected debug, info or warning"
        settings.log = value
    elif key == "logfile":
        if not value.startswith("/"):
            return "expected an absolute path"
        settings.logfile = value
    elif key == "sandbox":
        if value not in ("0", "1"):
            return "expected 0 or 1"
        settings.sandbox = value == "1"
    elif key == "init":
        pass  # the initramfs's key (which init to run): not ours
    else:
        return "unknown key"
    return ""


def load() -> Settings:
    """From the file named by $BOXPARK_SETTINGS, else from /proc/cmdline."""
    path = os.environ.get("BOXPARK_SETTINGS") or "/proc/cmdline"
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        settings = Settings()
        settings.warnings.append(f"cannot read settings from {path}: {exc.strerror}; using defaults")
        return settings
    return parse(text.split())
