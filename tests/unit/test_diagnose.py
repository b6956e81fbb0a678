"""The diagnostics bundle's masking, and the partial bundle of a machine that is not running."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from boxpark.host.diagnose import mask, mask_structure, url_secrets, write_bundle


@pytest.mark.parametrize("text, hidden", [
    (b'http = "http://alice:pr0xyPw@proxy.corp:3128"', [b"alice", b"pr0xyPw"]),
    (b"HTTPS_PROXY=https://bob:s%40cret@10.0.0.1:8080/", [b"bob", b"s%40cret"]),
    (b"socks5://carol:hunter2@socks:1080 and more", [b"carol", b"hunter2"]),
    (b"git clone https://ghp_abcdef123456@github.com/x/y", [b"ghp_abcdef123456"]),
    (b'{"proxies": {"http-proxy": "http://dave:pw1234@p:1"}}', [b"dave", b"pw1234"]),
])
def test_mask_hides_credentials_in_urls(text: bytes, hidden: list[bytes]) -> None:
    masked = mask(text)
    assert all(secret not in masked for secret in hidden), masked
    assert b"***" in masked and b"@" in masked  # where the credentials were is still visible


@pytest.mark.parametrize("text, secret", [
    (b'token = "tok-123 with spaces"', b"tok-123 with spaces"),
    (b'{"registry_token": "eyJhbGciOi.x.y", "name": "n"}', b"eyJhbGciOi.x.y"),
    (b"export GITHUB_TOKEN=ghp_zzz999", b"ghp_zzz999"),
    (b"client_secret: 'sh-h'", b"sh-h"),
    (b"--password=Tr0ub4dor&3 --user x", b"Tr0ub4dor&3"),
    (b"X_API_KEY=k3y; next", b"k3y"),
    (b"{'auths': {'reg': {'auth': 'dXNlcjpwdw=='}}}", b"dXNlcjpwdw=="),
    (b"Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l", b"YWxhZGRpbjpvcGVuc2VzYW1l"),
    (b'curl -H "Authorization: Bearer abc.def-123"', b"abc.def-123"),
    (b"got bearer 0123456789abcdef from the helper", b"0123456789abcdef"),
    (b'level=warning msg="retrying login with PASSWORD=Hun7er2 for r"', b"Hun7er2"),
    (b"tokentoken_secret=s1 secret_path=/p", b"s1"),
])
def test_mask_hides_values_of_secret_keys_and_credentials(text: bytes, secret: bytes) -> None:
    masked = mask(text)
    assert secret not in masked, masked
    assert b"***" in masked


@pytest.mark.parametrize("text", [
    b'time="2024-01-01" level=info msg="API listen on /var/run/docker.sock"',
    b'"secret_file": "/home/u/.local/share/boxpark/default/backend/secret"',
    b"password: \"\"",
    b"a basic credentials check, and the bearer of news",
    b"overlay on / type overlay (rw,relatime,lowerdir=/run/root)",
])
def test_mask_leaves_text_without_secrets_alone(text: bytes) -> None:
    assert mask(text) == text


def test_mask_hides_literal_secrets_anywhere_even_in_binary_data() -> None:
    secret = b"4f9a0c1e" * 8
    data = b"\x00\xffboot" + secret + b"\nkey " + secret[:20] + b" tail"
    masked = mask(data, (secret, b"ab"))
    assert secret not in masked and masked.startswith(b"\x00\xffboot***")
    assert secret[:20] in masked  # only the whole secret is a literal; a 2-byte one would mask noise
    assert masked.endswith(b" tail")


def test_url_secrets_are_the_password_and_user_also_percent_decoded() -> None:
    assert set(url_secrets("http://us%65r:p%40ss@h:1")) == {b"p%40ss", b"p@ss", b"us%65r", b"user"}
    assert url_secrets("http://proxy:3128") == []
    assert url_secrets("http://[broken") == []


def test_mask_structure_masks_secret_keys_and_urls_in_nested_values() -> None:
    value = {"proxy": {"http": "http://u:pw99@p:1", "from_env": True},
             "registry-mirrors": ["https://tok:en12@mirror"],
             "api_key": "zzz", "secret_file": "/path/secret", "password": "", "cpus": 2}
    masked = mask_structure(value)
    assert masked["proxy"] == {"http": "http://***:***@p:1", "from_env": True}
    assert masked["registry-mirrors"] == ["https://***:***@mirror"]
    assert masked["api_key"] == "***" and masked["secret_file"] == "/path/secret"
    assert masked["password"] == "" and masked["cpus"] == 2


def test_a_machine_that_is_not_running_gives_a_partial_bundle_without_its_secrets(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BOXPARK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BOXPARK_CACHE", str(tmp_path / "cache"))
    state = tmp_path / "home" / "m1"
    (state / "backend").mkdir(parents=True)
    secret = b"9e107d9d372bb6826bd81d3542a419d6" * 2
    (state / "backend" / "secret").write_bytes(secret + b"\n")
    os.chmod(state / "backend" / "secret", 0o600)
    # logs as a crash left them; one of them printed what it should not have
    (state / "agent.log").write_bytes(b"x" * 3000 + b"\nagent: booting\nleaked " + secret + b" and sEcr3t-pw\n")
    (state / "backend" / "console.log").write_bytes(b"[    0.1] Linux version 6.1\n")
    (state / "console.log").symlink_to(state / "backend" / "console.log")
    (state / "boot-timeline.json").write_text(json.dumps(
        {"boot_id": "b1", "kernel": "6.1.0", "monotonic_ms": 812.5, "steps": [["rootfs", 3.5, None]]}))
    config = tmp_path / "boxpark.toml"
    config.write_text('backend = "sandbox"\n[proxy]\nhttp = "http://diag:sEcr3t-pw@host.boxpark.internal:3128"\n')

    out = write_bundle("m1", tmp_path / "out.tar.gz", config_path=str(config), log_bytes=1024)

    with tarfile.open(out) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    for name, data in files.items():
        assert secret not in data and b"sEcr3t-pw" not in data, name
    assert not any(name.endswith("secret") for name in files)
    readme = files["README.txt"].decode()
    assert "not running" in readme
    for part in ("agent's view", "guest's view", "image manifest"):
        assert f"  {part}" in readme, readme
    assert "logs/agent.log: the last" in readme  # shortened to --log-mib, and said so
    assert files["logs/agent.log"].endswith(b"leaked *** and ***\n") and len(files["logs/agent.log"]) < 1024
    assert b"Linux version" in files["logs/console.log"] and "logs/backend/console.log" not in files  # once
    assert json.loads(files["status.json"]) == {"name": "m1", "state": "stopped", "last_boot": json.loads(
        (state / "boot-timeline.json").read_text())}
    assert b"rootfs" in files["boot-timeline.txt"]
    assert b"http://***:***@host.boxpark.internal:3128" in files["config/boxpark.toml"]
    effective = json.loads(files["config/effective.json"])
    assert effective["config"]["backend"] == "sandbox"
    assert effective["dockerd_proxy_env"]["HTTP_PROXY"] == "http://***:***@host.boxpark.internal:3128"
    assert json.loads(files["versions.json"])["host"]["boxpark"]
    assert out.stat().st_mode & 0o077 == 0  # logs: the user decides whom to give it to


def test_an_archive_that_cannot_be_written_is_an_oserror_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BOXPARK_HOME", str(tmp_path / "home"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        write_bundle("m2", blocker / "sub" / "out.tar.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
