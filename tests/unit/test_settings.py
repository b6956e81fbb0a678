"""The init's settings: kernel command line words → settings; bad words are warnings, never fatal."""

from __future__ import annotations

from boxpark.guest.settings import DEFAULT_API, parse


def test_defaults_and_foreign_words_ignored() -> None:
    settings = parse("root=/dev/vda rootfstype=squashfs console=ttynull quiet".split())
    assert settings.api == [DEFAULT_API] and settings.net == "dhcp" and not settings.warnings


def test_every_key() -> None:
    settings = parse([
        "boxpark.api=tcp:0.0.0.0:1024,unix:/run/api.sock", "boxpark.events=tcp:10.0.2.2:4000",
        "boxpark.secret=fwcfg:opt/boxpark/secret", "boxpark.net=static:10.0.2.15/24,10.0.2.2,10.0.2.3",
        "boxpark.hostname=box-1", "boxpark.log=debug", "boxpark.logfile=/run/x.log", "boxpark.sandbox=1",
        "boxpark.api_peers=10.0.2.2,10.0.2.3",
    ])
    assert settings.api_peers == ["10.0.2.2", "10.0.2.3"]
    assert settings.api == ["tcp:0.0.0.0:1024", "unix:/run/api.sock"]
    assert settings.events == "tcp:10.0.2.2:4000"
    assert settings.secret == "fwcfg:opt/boxpark/secret"
    assert settings.net == "static" and settings.static is not None
    assert (settings.static.address, settings.static.prefix, settings.static.gateway, settings.static.dns) == (
        "10.0.2.15", 24, "10.0.2.2", ["10.0.2.3"])
    assert settings.hostname == "box-1" and settings.log == "debug" and settings.sandbox
    assert not settings.warnings


def test_bad_words_become_warnings_and_defaults_stand() -> None:
    settings = parse(["boxpark.frob=1", "boxpark.net=static:10.0.2.300/24,1.1.1.1", "boxpark.api=http://x",
                      "boxpark.log", "boxpark.hostname=bad name!", "boxpark.sandbox=yes", "boxpark.api_peers=host"])
    assert settings.net == "dhcp" and settings.api == [DEFAULT_API] and not settings.sandbox
    assert settings.api_peers is None
    assert len(settings.warnings) == 7
    assert any("unknown key" in w for w in settings.warnings)
