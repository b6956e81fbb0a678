"""Which Debian mirror to build from: the host's own apt sources, never a name written in our code.

Reads both formats apt knows — deb822 `*.sources` files (`URIs:`/`Suites:` stanzas) and one-line
`sources.list` entries — and picks, for a suite, the mirror debootstrap uses plus the suite's updates and
security entries that the guest's apt uses for the same packages' fixes. Pure parsing; no network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .subp import BuildError


@dataclass(frozen=True)
class AptSource:
    """One apt source: a `deb` (or `deb-src`) URI with its suites and components."""

    type: str
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_deb822(text: str) -> list[AptSource]:
    """Parse a deb822 `.sources` file: stanzas separated by blank lines, `Key: value` with continuations."""
    sources: list[AptSource] = []
    for stanza in _stanzas(text):
        if stanza.get("enabled", "yes").strip().lower() == "no":
            continue
        types = stanza.get("types", "").split()
        uris = stanza.get("uris", "").split()
        suites = tuple(stanza.get("suites", "").split())
        components = tuple(stanza.get("components", "").split())
        for type_ in types:
            for uri in uris:
                sources.append(AptSource(type_, uri.rstrip("/"), suites, components))
    return sources


def _stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
            continue
        if raw[0] in " \t":
            if key is not None:
                current[key] += " " + raw.strip()
            continue
        name, sep, value = raw.partition(":")
        if not sep:
            continue
        key = name.strip().lower()
        current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def parse_one_line(text: str) -> list[AptSource]:
    """Parse one-line `sources.list` entries: `deb [options] URI suite [component...]`."""
    sources: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "[" in line:  # drop the [arch=... signed-by=...] options block
            head, _, rest = line.partition("[")
            line = head + rest.partition("]")[2]
        words = line.split()
        if len(words) < 3 or words[0] not in ("deb", "deb-src"):
            continue
        sources.append(AptSource(words[0], words[1].rstrip("/"), (words[2],), tuple(words[3:])))
    return sources


def read_host_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """Every source configured on this host, in the order apt reads them."""
    sources: list[AptSource] = []
    main_list = etc_apt / "sources.list"
    if main_list.is_file():
        sources += parse_one_line(main_list.read_text(encoding="utf-8", errors="replace"))
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                sources += parse_one_line(path.read_text(encoding="utf-8", errors="replace"))
            elif path.suffix == ".sources":
                sources += parse_deb822(path.read_text(encoding="utf-8", errors="replace"))
    return sources


def pick_mirror(sources: list[AptSource], suite: str) -> str:
    """The URI of the first binary source that carries `suite` itself (not -updates or -security)."""
    for source in sources:
        if source.type == "deb" and suite in source.suites and source.uri.startswith(("http:", "https:")):
            return source.uri
    raise BuildError(
        f"no Debian mirror for '{suite}' in this host's apt sources",
        hint=f"add a 'deb' entry for suite {suite} to /etc/apt/sources.list.d/debian.sources "
        "(URIs: your Debian mirror)",
    )


def guest_sources_list(sources: list[AptSource], suite: str) -> str:
    """A one-line sources.list for the guest: `suite`, `suite-updates`, `suite-security` (main only)."""
    wanted = (suite, f"{suite}-updates", f"{suite}-security")
    lines: list[str] = []
    for source in sources:
        if source.type != "deb" or not source.uri.startswith(("http:", "https:")):
            continue
        for s in source.suites:
            line = f"deb {source.uri} {s} main"
            if s in wanted and line not in lines:
                lines.append(line)
    return "".join(line + "\n" for line in lines)
