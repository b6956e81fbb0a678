"""set_time, sync and the hostname: argument checks, the machine-wide gate, and the real system calls only
where they cannot reach this host (a private UTS namespace; a process without CAP_SYS_TIME)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from boxpark import protocol
from boxpark.guest import system
from boxpark.guest.errors import GuestError
from boxpark.guest.server import GuestServer
from boxpark.host.client import GuestClient, RemoteError
from boxpark.protocol import ErrorCode
from tests.guestserver import running_server
from tests.nsfixture import python_argv, requires_root, run_in_namespace

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("time_ns, threshold_ns", [
    (0, 0), (int(time.time()), 0), (8_000_000_000 * 10**9, 0), (time.time_ns(), -1),
])
def test_set_time_refuses_insane_values_before_any_syscall(time_ns: int, threshold_ns: int) -> None:
    with pytest.raises(GuestError) as info:
        system.set_time(protocol.SetTime(time_ns=time_ns, threshold_ns=threshold_ns))
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


def test_set_time_within_the_threshold_does_not_step() -> None:
    result = system.set_time(protocol.SetTime(time_ns=time.time_ns(), threshold_ns=10 * 10**9))
    assert not result.stepped and abs(result.offset_ns) < 10 * 10**9


@requires_root
def test_set_time_without_cap_sys_time_is_permission_denied() -> None:
    """The real clock_settime, in a process that cannot set the clock (checked before the call)."""
    code = """
import re, time
from boxpark import protocol
from boxpark.guest import system
from boxpark.guest.errors import GuestError
caps = int(re.search(r"CapEff:\\s+(\\w+)", open("/proc/self/status").read()).group(1), 16)
if caps & (1 << 25):
    sys.exit(99)  # CAP_SYS_TIME is there: never try
try:
    system.set_time(protocol.SetTime(time_ns=time.time_ns() + 3600 * 10**9, threshold_ns=0))
except GuestError as exc:
    print(exc.code.name, exc.message)
"""
    out = run_in_namespace(python_argv(code), check=False)
    assert out.returncode == 0, out
    assert out.stdout.startswith("PERMISSION_DENIED") and "CAP_SYS_TIME" in out.stdout


@requires_root
def test_set_hostname_for_real_in_a_private_uts_namespace() -> None:
    code = """
import socket
from boxpark.guest import system
from boxpark.guest.errors import GuestError
system.set_hostname("boxpark-guest.test")
print(socket.gethostname())
try:
    system.set_hostname("bad name!")
except GuestError as exc:
    print(exc.code.name)
"""
    before = socket.gethostname()
    out = run_in_namespace(python_argv(code), uts=True)
    assert out.stdout.split() == ["boxpark-guest.test", "INVALID_ARGUMENT"]
    assert socket.gethostname() == before


@pytest.mark.parametrize("name", ["", "-leading", "a" * 65, "has space", "under_score", "a..b", "ünïcode"])
def test_bad_hostnames(name: str) -> None:
    with pytest.raises(GuestError):
        system.check_hostname(name)


def test_good_hostnames() -> None:
    for name in ("boxpark", "docker-host", "vm1.example.com", "a" * 63):
        system.check_hostname(name)


def test_sync_and_the_gate_off_pid1(tmp_path: Path) -> None:
    assert GuestServer().machine_wide is False
    with running_server(tmp_path) as srv:
        async def body() -> None:
            async with await GuestClient.open(srv.address) as client:
                await client.sync()
                for attempt in (client.set_time(time.time_ns() + 3600 * 10**9, threshold_ns=0),
                                client.hostname("renamed")):
                    with pytest.raises(RemoteError) as info:
                        await attempt
                    assert info.value.code == ErrorCode.PERMISSION_DENIED
                assert await client.hostname() == socket.gethostname()

        asyncio.run(body())
