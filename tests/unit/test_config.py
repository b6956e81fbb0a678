"""boxpark.toml: the documented default loads as is; every bad value names its key; mounts sort parent-first."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from boxpark.host import config as cfg


def test_the_documented_default_is_the_default() -> None:
    loaded = cfg.loads(cfg.DEFAULT_TOML)
    assert loaded == cfg.validate(cfg.Config())
    assert loaded.memory_bytes == 2 * 1024 ** 3 and loaded.disk_bytes == 20 * 1024 ** 3
    assert loaded.swap_bytes == 1024 ** 3 and loaded.guest_arch in ("amd64", "arm64")


def test_no_file_means_defaults(tmp_path) -> None:
    assert cfg.load(tmp_path / "missing.toml") == cfg.validate(cfg.Config())


@pytest.mark.parametrize("text, key, fragment", [
    ('cpus = "two"', "cpus", "expected `int`"),
    ("cpus = 0", "cpus", "between 1 and 64"),
    ('memory = "lots"', "memory", "size like"),
    ('memory = "100MiB"', "memory", "at least 256MiB"),
    ("frob = 1", "frob", "unknown setting"),
    ("[docker]\nfoo = 1", "docker.foo", "unknown setting"),
    ('backend = "hyperv"', "backend", "'hyperv' is not one of qemu, vz, sandbox"),
    ('[disk]\nsize = "1MiB"', "disk.size", "at least 64MiB"),
    ('[[mounts]]\nsource = "/nonexistent-dir"\ntarget = "/x"', "mounts[0].source", "not a directory"),
    ('[[mounts]]\nsource = "/tmp"\ntarget = "rel"', "mounts[0].target", "absolute"),
    ('[[mounts]]\nsource = "/tmp"\ntarget = "/x"\n[[mounts]]\nsource = "/tmp"\ntarget = "/x/"',
     "mounts[1].target", "twice"),
    ('[[mounts]]\nsource = "sdb"\ntarget = "/data"\ntype = "ext4"', "mounts[0].source", "guest device"),
    ("[time]\npush_interval = 0", "time.push_interval", "at least 1"),
    ('[dns]\nhost_resolver = "yes"', "dns.host_resolver", "expected `bool`"),
    ("[dns]\nhosts = 1", "dns.hosts", "unknown setting"),
    ('image = "/nonexistent/image"', "image", "does not exist"),
])
def test_bad_values_name_the_key(text: str, key: str, fragment: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(text, "boxpark.toml")
    assert info.value.key == key
    assert str(info.value).startswith(f"boxpark.toml: {key}: ") and fragment in str(info.value)


def test_dns_asks_the_host_by_default_and_takes_an_extra_hosts_file() -> None:
    assert cfg.loads("").dns.host_resolver and not cfg.loads("").dns.hosts_file
    config = cfg.loads('[dns]\nhost_resolver = false\nhosts_file = "~/boxpark.hosts"', "boxpark.toml")
    assert (config.dns.host_resolver, config.dns.hosts_file) == (False, "~/boxpark.hosts")


def test_broken_toml_says_so() -> None:
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.loads("cpus = ")


def test_a_file_that_is_not_utf8_is_named_in_one_sentence(tmp_path) -> None:
    path = tmp_path / "boxpark.toml"
    path.write_bytes(b'cpus = 2\n# caf\xe9 in Latin-1\n')
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte 14); save it as UTF-8"


def test_up_with_a_file_that_is_not_utf8_prints_one_sentence(tmp_path) -> None:
    path = tmp_path / "boxpark.toml"
    path.write_bytes(b"memory = \"2GiB\" # \xff\n")
    env = {**os.environ, "BOXPARK_HOME": str(tmp_path / "home"), "LC_ALL": "C"}
    result = subprocess.run([sys.executable, "-m", "boxpark", "up", "--config", str(path), "--name", "utf8"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and str(path) in result.stderr and "not UTF-8" in result.stderr
    assert not (tmp_path / "home" / "utf8" / "agent.pid").exists()


@pytest.mark.parametrize("text, size", [("512MiB", 512 * 1024 ** 2), ("2G", 2 * 1024 ** 3), ("1.5GiB", 1536 * 1024 ** 2),
                                        ("4096", 4096), (123, 123), ("1T", 1024 ** 4)])
def test_sizes(text, size) -> None:
    assert cfg.parse_size(text, "k") == size


def test_mounts_sort_parent_first_whatever_the_order() -> None:
    mounts = [cfg.Mount(source="/dev/vdc", target=t, type="ext4") for t in ("/a/b/c", "/a", "/a/b", "/b", "/a/bb")]
    for _ in range(20):
        random.shuffle(mounts)
        order = [m.target for m in cfg.sorted_mounts(mounts)]
        for i, target in enumerate(order):
            for parent in order[i + 1:]:
                assert not target.startswith(parent.rstrip("/") + "/"), order


# ------------------------------------------------------------------------------ the home share

def test_the_home_is_shared_at_the_same_path_by_default(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = cfg.loads("")
    assert config.home_mount() == cfg.Mount(source=str(tmp_path), target=str(tmp_path))
    assert config.all_mounts()[-1].target == str(tmp_path)


def test_the_home_share_can_be_moved_made_read_only_or_turned_off(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", "/nonexistent-home")
    assert cfg.loads("").home_mount() is None  # no such home: nothing to share, no error
    other = tmp_path / "me"
    other.mkdir()
    moved = cfg.loads(f'[home]\npath = "{other}"\nread_only = true').home_mount()
    assert moved == cfg.Mount(source=str(other), target=str(other), read_only=True)
    assert cfg.loads(f'[home]\npath = "{other}"\nshare = false').all_mounts() == []


def test_a_mount_with_the_homes_target_replaces_the_home_share(tmp_path) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    config = cfg.loads(f'[home]\npath = "{home}"\n[[mounts]]\nsource = "{elsewhere}"\ntarget = "{home}/"')
    assert config.home_mount() is None
    assert [m.source for m in config.all_mounts()] == [str(elsewhere)]


def test_the_home_share_is_last_and_a_mount_below_it_sorts_after_it(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    config = cfg.loads(f'[home]\npath = "{tmp_path}"\n[[mounts]]\nsource = "tmpfs"\ntarget = "{tmp_path}/sub"\n'
                       f'type = "tmpfs"')
    assert [m.target for m in config.all_mounts()] == [f"{tmp_path}/sub", str(tmp_path)]
    assert [m.target for m in cfg.sorted_mounts(config.all_mounts())] == [str(tmp_path), f"{tmp_path}/sub"]


# ------------------------------------------------------------------------------ proxies and CAs

CERT = """-----BEGIN CERTIFICATE-----
MIIBfTCCASOgAwIBAgIUbm9uZSBvZiB0aGlzIGlzIHJlYWwwCgYIKoZIzj0EAwIw
-----END CERTIFICATE-----
"""


@pytest.mark.parametrize("text, key, fragment", [
    ('[home]\npath = "/nonexistent-home"', "home.path", "not a directory"),
    ('[home]\npath = "/"', "home.path", "other than /"),
    ('[proxy]\nhttps = "proxy:3128"', "proxy.https", "URL like"),
    ('[proxy]\nhttp = "ftp://proxy:21"', "proxy.http", "URL like"),
    ('[proxy]\nftp = "x"', "proxy.ftp", "unknown setting"),
    ('[certificates]\nca = ["/nonexistent.pem"]', "certificates.ca[0]", "No such file"),
    ("[certificates]\nca = 1", "certificates.ca", "expected `array`"),
])
def test_bad_home_proxy_and_ca_values_name_the_key(text: str, key: str, fragment: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(text, "boxpark.toml")
    assert info.value.key == key and fragment in str(info.value), str(info.value)


def test_ca_files_must_hold_pem_certificates(tmp_path) -> None:
    good, key, garbled, empty = (tmp_path / n for n in ("good.pem", "key.pem", "garbled.pem", "empty.pem"))
    good.write_text("a comment line\n" + CERT + CERT)
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
    garbled.write_text("-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n")
    empty.write_text("")
    assert cfg.loads(f'[certificates]\nca = ["{good}"]').certificates.ca == [str(good)]
    assert cfg.pem_certificates(good.read_bytes()) == [CERT.encode()] * 2
    for i, bad in enumerate((key, garbled, empty)):
        with pytest.raises(cfg.ConfigError) as info:
            cfg.loads(f'[certificates]\nca = ["{good}", "{bad}"]')
        assert info.value.key == "certificates.ca[1]" and str(bad) in str(info.value)


def test_proxies_come_from_the_config_then_from_the_environment_of_up() -> None:
    environ = {"HTTPS_PROXY": "http://env-proxy:3128", "http_proxy": "http://lower:80", "NO_PROXY": "localhost"}
    configured = cfg.loads('[proxy]\nhttps = "http://10.0.2.2:3128"').proxy
    assert cfg.proxy_env(configured, environ) == {
        "HTTPS_PROXY": "http://10.0.2.2:3128", "https_proxy": "http://10.0.2.2:3128",
        "HTTP_PROXY": "http://lower:80", "http_proxy": "http://lower:80",
        "NO_PROXY": "localhost", "no_proxy": "localhost"}
    only_config = cfg.loads('[proxy]\nhttps = "http://10.0.2.2:3128"\nfrom_env = false').proxy
    assert cfg.proxy_env(only_config, environ) == {"HTTPS_PROXY": "http://10.0.2.2:3128",
                                                   "https_proxy": "http://10.0.2.2:3128"}
    assert cfg.proxy_env(cfg.Proxy(), {}) == {}


@pytest.mark.parametrize("value, guest", [
    ("http://127.0.0.1:3128", "http://host.boxpark.internal:3128"),
    ("http://user:pw@localhost:3128/", "http://user:pw@host.boxpark.internal:3128/"),
    ("127.0.0.2:8080", "host.boxpark.internal:8080"),
    ("http://[::1]:3128", "http://host.boxpark.internal:3128"),
    ("http://localhost.corp:3128", "http://localhost.corp:3128"),
    ("http://proxy.corp:3128", "http://proxy.corp:3128"),
])
def test_a_loopback_proxy_from_the_environment_is_reached_at_the_host_address(value, guest) -> None:
    env = cfg.proxy_env(cfg.Proxy(), {"HTTP_PROXY": value, "NO_PROXY": "localhost,127.0.0.1"})
    assert env["HTTP_PROXY"] == env["http_proxy"] == guest
    assert env["NO_PROXY"] == "localhost,127.0.0.1"
    assert cfg.proxy_env(cfg.Proxy(http="http://127.0.0.1:1"), {})["HTTP_PROXY"] == "http://127.0.0.1:1"  # as written


@pytest.mark.parametrize("daemon, backend, fragment", [
    ({"data-root": "/srv/docker"}, "qemu", 'remove "data-root"'),
    ({"hosts": ["unix:///run/other.sock"]}, "qemu", "remove 'unix:///run/other.sock' from \"hosts\""),
    ({"hosts": ["fd://"]}, "qemu", "only tcp:// entries"),
    ({"hosts": "tcp://0.0.0.0:2375"}, "qemu", "must be a list"),
    ({"bridge": "docker1"}, "sandbox", 'remove "bridge"'),
    ([1, 2], "qemu", "must be a JSON object"),
])
def test_a_daemon_json_key_boxpark_sets_is_refused_at_load_with_the_key_named(tmp_path, daemon, backend,
                                                                              fragment) -> None:
    import json

    path = tmp_path / "daemon.json"
    path.write_text(json.dumps(daemon))
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(f'backend = "{backend}"\n[docker]\ndaemon_json = "{path}"')
    assert info.value.key == "docker.daemon_json" and fragment in str(info.value), str(info.value)


def test_the_users_own_daemon_json_keys_load(tmp_path) -> None:
    path = tmp_path / "daemon.json"
    path.write_text('{"debug": true, "hosts": ["tcp://127.0.0.1:2375"], "bridge": "docker1"}')
    assert cfg.loads(f'[docker]\ndaemon_json = "{path}"').docker.daemon_json == str(path)
    path.write_bytes(b'{"debug": \xff}')
    with pytest.raises(cfg.ConfigError, match="not valid JSON"):
        cfg.loads(f'[docker]\ndaemon_json = "{path}"')


@pytest.mark.parametrize("text, key", [
    ("[docker]\nready_timeout = 0", "docker.ready_timeout"),
    ('[docker]\nlog_size = "1KiB"', "docker.log_size"),
    ('[docker]\nlog_size = "lots"', "docker.log_size"),
    ("[docker]\nlog_files = -1", "docker.log_files"),
])
def test_bad_docker_service_values_name_the_key(text: str, key: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(text)
    assert info.value.key == key, str(info.value)


def test_qemu_is_not_offered_on_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its backend needs Linux's pidfds and prctl: on a Mac `up` says so in one sentence, and vz is the way."""
    monkeypatch.setattr(cfg.sys, "platform", "darwin")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads('backend = "qemu"', "boxpark.toml")
    assert info.value.key == "backend"
    assert str(info.value) == ("boxpark.toml: backend: qemu is not offered on macOS; use vz (Apple's "
                               "Virtualization.framework) here")


def test_changed_settings_names_dotted_keys_and_compares_sizes_by_bytes() -> None:
    import msgspec

    running = msgspec.to_builtins(cfg.loads('memory = "2GiB"\n[disk]\nsize = "20GiB"\n'))
    assert cfg.changed_settings(running, cfg.loads('memory = 2147483648\n[disk]\nsize = "20480MiB"\n')) == []
    changed = cfg.loads('memory = "4GiB"\ncpus = 4\n[disk]\nsize = "40GiB"\n[[mounts]]\nsource = "tmpfs"\n'
                        'target = "/srv"\ntype = "tmpfs"\n')
    assert cfg.changed_settings(running, changed) == ["cpus", "disk.size", "memory", "mounts"]
