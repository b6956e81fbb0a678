"""The mount guard's host side: the plugin's command line from the mounts that were made, daemon.json."""

from __future__ import annotations

from boxpark.guest import authz
from boxpark.host import mountguard
from boxpark.host.config import Mount
from boxpark.image import rootfs


def test_the_plugin_gets_the_mounted_shares_and_guest_mounts_only() -> None:
    mounts = [Mount(source="/home/me", target="/home/me/"), Mount(source="/srv", target="/srv", optional=True),
              Mount(source="/dev/vdc", target="/data", type="ext4"), Mount(source="tmpfs", target="/scratch",
                                                                            type="tmpfs")]
    argv = mountguard.plugin_argv(mounts, ["/home/me", "/data", "/scratch"])  # the optional /srv failed
    assert argv[:4] == ["python3", "-SI", "-c", mountguard.START]
    assert argv[4:] == ["--share", "/home/me", "--known", "/data", "--known", "/scratch"]


def test_daemon_json_names_the_plugin_first_and_keeps_the_users() -> None:
    assert mountguard.with_plugin({"hosts": ["unix:///x"]})["authorization-plugins"] == [authz.PLUGIN]
    user = {"authorization-plugins": ["opa", authz.PLUGIN]}
    assert mountguard.with_plugin(user)["authorization-plugins"] == [authz.PLUGIN, "opa"]
    assert user == {"authorization-plugins": ["opa", authz.PLUGIN]}  # not changed in place


def test_the_host_and_the_guest_agree_on_names_and_paths() -> None:
    # the host never imports guest code, so the names are written twice: they must not drift apart
    assert (mountguard.PLUGIN, mountguard.SOCKET) == (authz.PLUGIN, authz.SOCKET)
    assert mountguard.GUEST_CODE == rootfs.PYTHON_DIR
