"""The home share's options end to end on the sandbox (a machine each: they cannot share one with the
everyday tests' writable share): `read_only = true` and `share = false` (with the mount guard off, which
needs a machine of its own too)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests import mountchecks, sharechecks, upchecks
from tests.upmachine import UpMachine

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("docker") is None,
                                 reason="needs root, unshare and the docker CLI")]


def machine_with_home(home_section: str) -> tuple[UpMachine, Path]:
    m = UpMachine("sandbox")
    home = m.home / "user"
    home.mkdir()
    os.chown(home, 1234, 1234)
    m.config.write_text(f'backend = "sandbox"\n[home]\npath = "{home}"\n{home_section}\n')
    m.up_or_fail()
    return m, home


def test_a_read_only_home_is_read_and_never_written(tmp_path) -> None:
    m, home = machine_with_home("read_only = true")
    try:
        sharechecks.home_share_read_only(m, home, tmp_path)
        upchecks.down_leaves_nothing(m)
    finally:
        m.destroy()


def test_a_home_not_shared_is_not_in_the_guest_and_the_mount_guard_can_be_off(tmp_path) -> None:
    m, home = machine_with_home("share = false\n[docker]\nmount_guard = false")
    try:
        sharechecks.home_not_shared(m, home)
        mountchecks.guard_off_lets_binds_through(m, tmp_path)
        upchecks.down_leaves_nothing(m)
    finally:
        m.destroy()
