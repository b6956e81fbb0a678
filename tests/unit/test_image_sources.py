"""The mirror comes from the host's apt sources: deb822 and one-line formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from boxpark.image.sources import (
    AptSource,
    guest_sources_list,
    parse_deb822,
    parse_one_line,
    pick_mirror,
    read_host_sources,
)
from boxpark.image.subp import BuildError

DEB822 = """\
Types: deb
# a comment line inside a stanza
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: http://security.example/debian-security/
Suites: bookworm-security
Components: main contrib

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://multi.example/debian
 http://continued.example/debian
Suites: trixie
Components: main
"""


def test_deb822_stanzas_types_uris_and_continuations() -> None:
    sources = parse_deb822(DEB822)
    assert (
        AptSource("deb", "http://mirror.example/debian", ("bookworm", "bookworm-updates"), ("main",))
        in sources
    )
    # trailing slash dropped, one entry per type
    assert (
        AptSource(
            "deb", "http://security.example/debian-security", ("bookworm-security",), ("main", "contrib")
        )
        in sources
    )
    assert (
        AptSource(
            "deb-src", "http://security.example/debian-security", ("bookworm-security",), ("main", "contrib")
        )
        in sources
    )
    assert not any("disabled" in s.uri for s in sources)
    assert {s.uri for s in sources if s.suites == ("trixie",)} == {
        "http://multi.example/debian",
        "http://continued.example/debian",
    }


def test_one_line_format_with_options_and_comments() -> None:
    text = """\
# deb http://commented.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://one.example/debian/ bookworm main contrib
deb-src http://one.example/debian bookworm main
deb http://two.example/debian bookworm-security main  # trailing comment
garbage line
"""
    sources = parse_one_line(text)
    assert sources[0] == AptSource("deb", "http://one.example/debian", ("bookworm",), ("main", "contrib"))
    assert sources[1].type == "deb-src"
    assert sources[2] == AptSource("deb", "http://two.example/debian", ("bookworm-security",), ("main",))
    assert len(sources) == 3


def test_pick_mirror_takes_the_suite_itself_not_updates_or_security() -> None:
    sources = parse_deb822(DEB822)
    assert pick_mirror(sources, "bookworm") == "http://mirror.example/debian"
    assert pick_mirror(sources, "trixie") == "http://multi.example/debian"


def test_pick_mirror_without_a_match_says_what_to_do() -> None:
    with pytest.raises(BuildError) as info:
        pick_mirror(parse_deb822(DEB822), "sid")
    assert "sid" in str(info.value) and info.value.hint


def test_pick_mirror_ignores_deb_src_and_non_http() -> None:
    sources = [
        AptSource("deb-src", "http://src.example/debian", ("bookworm",), ("main",)),
        AptSource("deb", "file:/srv/local", ("bookworm",), ("main",)),
        AptSource("deb", "https://real.example/debian", ("bookworm",), ("main",)),
    ]
    assert pick_mirror(sources, "bookworm") == "https://real.example/debian"


def test_guest_sources_list_has_suite_updates_and_security_once() -> None:
    sources = parse_deb822(DEB822) + parse_deb822(DEB822)
    assert guest_sources_list(sources, "bookworm") == (
        "deb http://mirror.example/debian bookworm main\n"
        "deb http://mirror.example/debian bookworm-updates main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
    )


def test_read_host_sources_reads_both_formats_in_apt_order(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("deb http://first.example/debian bookworm main\n")
    (tmp_path / "sources.list.d" / "b.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "a.list").write_text("deb http://second.example/debian bookworm main\n")
    (tmp_path / "sources.list.d" / "ignored.txt").write_text("deb http://no.example/debian bookworm main\n")
    uris = [s.uri for s in read_host_sources(tmp_path)]
    assert uris[:3] == [
        "http://first.example/debian",
        "http://second.example/debian",
        "http://mirror.example/debian",
    ]
    assert "http://no.example/debian" not in uris
