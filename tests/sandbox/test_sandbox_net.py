"""The sandbox backend's network, from both sides: slirp4netns's tap is the guest's eth0 and goes with the
machine; without slirp4netns the sandbox boots with loopback only and the host's log says so."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from boxpark.host.backends.sandbox import SandboxBackend
from tests.machines import Machines, _machine_reporter, image_dir, machines  # noqa: F401

pytestmark = [pytest.mark.sandbox,
              pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")]



@pytest.mark.skipif(shutil.which("slirp4netns") is None, reason="needs slirp4netns")
def test_slirp4netns_gives_eth0_and_goes_with_the_machine(machines: Machines) -> None:  # noqa: F811
    machine = machines.boot("sandbox")
    backend = machine.backend
    assert isinstance(backend, SandboxBackend) and backend.slirp is not None
    slirp = backend.slirp.pid
    assert slirp in backend.pids()
    pidfd = os.pidfd_open(slirp)
    try:
        assert machine.sh("cat /sys/class/net/eth0/operstate").strip() in ("up", "unknown")
        assert "10.0.2.100" in machine.sh("cat /proc/net/fib_trie")
        assert machine.sh("cat /proc/sys/net/ipv4/conf/eth0/proxy_arp").strip() == "1"
        assert machine.ready is not None
        network = next(s for s in machine.ready.timeline if s.name == "network")
        assert network.error is None and network.duration_ns < 2e9  # found the tap, not the wait's deadline
        machine.close()
        with pytest.raises(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, 0)
    finally:
        os.close(pidfd)


@pytest.mark.skipif(shutil.which("slirp4netns") is None or shutil.which("ip") is None,
                    reason="needs slirp4netns and ip (iproute2)")
def test_slirp4netns_leaves_the_hosts_mounts_alone(machines: Machines) -> None:  # noqa: F811
    """Its --enable-sandbox unmounts what it does not need where it starts: in a private mount namespace of
    its own, never the host's (a named network namespace's mount once vanished from /run/netns)."""
    name = f"boxpark-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        machine = machines.boot("sandbox")
        backend = machine.backend
        assert isinstance(backend, SandboxBackend) and backend.slirp is not None
        assert os.readlink(f"/proc/{backend.slirp.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert machine.sh("cat /sys/class/net/eth0/operstate").strip() in ("up", "unknown")  # slirp has set up
        mounted = lambda: f"/run/netns/{name} " in Path("/proc/self/mountinfo").read_text()  # noqa: E731
        deadline = time.monotonic() + 5  # slirp4netns unmounted within 2 s when it shared our mounts
        while time.monotonic() < deadline:
            assert mounted(), "slirp4netns unmounted a host mount"
            time.sleep(0.2)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_without_slirp4netns_the_sandbox_has_loopback_only(machines: Machines,  # noqa: F811
                                                           caplog: pytest.LogCaptureFixture) -> None:
    backend = SandboxBackend()
    backend.slirp4netns = None
    with caplog.at_level(logging.WARNING, logger="boxpark.host.sandbox"):
        machine = machines.create("sandbox", backend_object=backend)
        machine.start()
        machine.wait_ready()
    assert any("slirp4netns is not installed" in r.getMessage() for r in caplog.records)
    assert backend.slirp is None
    assert machine.sh("ls /sys/class/net").split() == ["lo"]
    assert machine.ready is not None and all(s.error is None for s in machine.ready.timeline)
