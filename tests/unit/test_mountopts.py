"""mount(8)-style options split into mount(2) flags, the propagation change and the data string (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from boxpark.guest import libc
from boxpark.guest.mountopts import MountOptions, parse_options, split_options


def test_nothing() -> None:
    assert parse_options([]) == MountOptions()


@pytest.mark.parametrize("word, flag", [
    ("ro", libc.MS_RDONLY), ("nosuid", libc.MS_NOSUID), ("nodev", libc.MS_NODEV), ("noexec", libc.MS_NOEXEC),
    ("noatime", libc.MS_NOATIME), ("relatime", libc.MS_RELATIME), ("strictatime", libc.MS_STRICTATIME),
    ("nodiratime", libc.MS_NODIRATIME), ("sync", libc.MS_SYNCHRONOUS), ("dirsync", libc.MS_DIRSYNC),
    ("lazytime", libc.MS_LAZYTIME), ("nosymfollow", libc.MS_NOSYMFOLLOW), ("bind", libc.MS_BIND),
    ("rbind", libc.MS_BIND | libc.MS_REC), ("remount", libc.MS_REMOUNT), ("move", libc.MS_MOVE),
    ("silent", libc.MS_SILENT), ("mand", libc.MS_MANDLOCK),
])
def test_flag_words(word: str, flag: int) -> None:
    options = parse_options([word])
    assert options.flags == flag and options.data == "" and options.propagation == 0


@pytest.mark.parametrize("set_, clear", [
    ("ro", "rw"), ("nosuid", "suid"), ("nodev", "dev"), ("noexec", "exec"), ("noatime", "atime"),
    ("relatime", "norelatime"), ("sync", "async"), ("nodiratime", "diratime"), ("lazytime", "nolazytime"),
])
def test_the_later_word_wins(set_: str, clear: str) -> None:
    assert parse_options([set_, clear]).flags == 0
    assert parse_options([clear, set_]).flags == parse_options([set_]).flags


@pytest.mark.parametrize("word, flags", [
    ("private", libc.MS_PRIVATE), ("rprivate", libc.MS_PRIVATE | libc.MS_REC),
    ("shared", libc.MS_SHARED), ("rshared", libc.MS_SHARED | libc.MS_REC),
    ("slave", libc.MS_SLAVE), ("rslave", libc.MS_SLAVE | libc.MS_REC),
    ("unbindable", libc.MS_UNBINDABLE), ("runbindable", libc.MS_UNBINDABLE | libc.MS_REC),
])
def test_propagation_is_a_separate_change(word: str, flags: int) -> None:
    options = parse_options([word])
    assert options.propagation == flags and options.flags == 0 and options.data == ""


def test_filesystem_options_go_to_data_in_order() -> None:
    options = parse_options(["size=64m,mode=1777", "nosuid", "uid=0", "lowerdir=/a:/b"])
    assert options.flags == libc.MS_NOSUID
    assert options.data == "size=64m,mode=1777,uid=0,lowerdir=/a:/b"


def test_quoted_commas_do_not_split() -> None:
    assert split_options(['context="system_u:object_r:tmp_t:s0:c127,c456",ro']) == [
        'context="system_u:object_r:tmp_t:s0:c127,c456"', "ro"]
    assert parse_options(['context="a,b"']).data == 'context="a,b"'


def test_unbalanced_quote_is_refused() -> None:
    with pytest.raises(ValueError, match="quote"):
        parse_options(['context="a,b'])


def test_userspace_only_words_are_dropped() -> None:
    options = parse_options(["defaults", "noauto", "nofail", "_netdev", "user", "comment=x", "x-systemd.after=y"])
    assert options == MountOptions()


def test_mkdir_option() -> None:
    assert parse_options(["X-mount.mkdir"]).mkdir == 0o755
    assert parse_options(["X-mount.mkdir=0700"]).mkdir == 0o700
    with pytest.raises(ValueError, match="mode"):
        parse_options(["X-mount.mkdir=rwx"])


def test_loop_is_refused_with_a_hint() -> None:
    with pytest.raises(ValueError, match="loop device"):
        parse_options(["loop"])


def test_bind_remount_readonly() -> None:
    options = parse_options(["remount,bind,ro"])
    assert options.remount and not options.bind
    assert options.flags == libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY


def test_empty_words_are_ignored() -> None:
    assert parse_options([",,ro,,", ""]).flags == libc.MS_RDONLY


_WORDS = st.sampled_from(["ro", "rw", "nosuid", "suid", "bind", "rbind", "private", "rshared", "size=1m",
                          "mode=0755", "defaults", "noatime", "relatime", "uid=1000", "remount"])


@given(st.lists(_WORDS, max_size=12))
def test_words_are_partitioned(words: list[str]) -> None:
    options = parse_options(words)
    data = [w for w in words if "=" in w]
    assert options.data == ",".join(data)
    assert parse_options([",".join(words)]) == options  # one comma-joined item is the same as a list
