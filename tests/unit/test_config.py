"""boxpark.toml: the documented default loads as is; every bad value names its key; mounts sort parent-first."""

from __future__ import annotations

import random

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
    ('image = "/nonexistent/image"', "image", "does not exist"),
])
def test_bad_values_name_the_key(text: str, key: str, fragment: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(text, "boxpark.toml")
    assert info.value.key == key
    assert str(info.value).startswith(f"boxpark.toml: {key}: ") and fragment in str(info.value)


def test_broken_toml_says_so() -> None:
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.loads("cpus = ")


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
