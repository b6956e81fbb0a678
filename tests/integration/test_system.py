"""set_time, sync and the hostname: argument checks, the machine-wide gate, and the real system calls only
where they cannot reach this host (a private UTS namespace; a process without CAP_SYS_TIME).

Nothing here may set this host's clock, even when the code under test is broken: every set_time runs in
a process that cannot (CAP_SYS_TIME dropped, checked before the call). A clock really stepped is the vm
tier's (tests/vm/test_qemu_boot.py), inside a QEMU guest.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from boxpark import protocol
from boxpark.guest import system
from boxpark.guest.errors import GuestError
from boxpark.guest.server import GuestServer
from boxpark.host.client import GuestClient, RemoteError
from boxpark.protocol import ErrorCode
from tests.guestserver import running_server
from tests.nsfixture import guest_namespace, is_root, namespace_argv, python_argv, requires_root, run_in_namespace

pytestmark = pytest.mark.integration


CAP_SYS_TIME = 25
# run first in every process that calls set_time: it must not be able to set the clock, whatever follows
NO_CLOCK = """
import re
caps = int(re.search(r"CapEff:\\s+(\\w+)", open("/proc/self/status").read()).group(1), 16)
if caps & (1 << 25):
    sys.exit(99)  # CAP_SYS_TIME is there: never try
import time
from boxpark import protocol
from boxpark.guest import system
from boxpark.guest.errors import GuestError
"""


def can_set_the_clock() -> bool:
    with open("/proc/self/status") as f:
        caps = int(re.search(r"CapEff:\s+(\w+)", f.read())[1], 16)  # type: ignore[index]
    return bool(caps & (1 << CAP_SYS_TIME))


def without_cap_sys_time(code: str) -> list[str]:
    """`code` (after NO_CLOCK) as a python process that cannot set the clock: root's loses CAP_SYS_TIME."""
    argv = python_argv(NO_CLOCK + code)
    if can_set_the_clock():
        if not is_root():
            pytest.skip("this process may set the clock but is not root: cannot drop the capability")
        argv = namespace_argv(argv)
    return argv


def set_time_without_cap_sys_time(time_expression: str, threshold_ns: int) -> str:
    """What system.set_time says, called where it cannot set the clock: the reply, or the error's code."""
    code = f"""
try:
    print(system.set_time(protocol.SetTime(time_ns={time_expression}, threshold_ns={threshold_ns})))
except GuestError as exc:
    print(exc.code.name, exc.message)
"""
    out = subprocess.run(without_cap_sys_time(code), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out
    return out.stdout


@pytest.mark.parametrize("time_ns, threshold_ns", [
    ("0", 0), (str(int(time.time())), 0), (str(8_000_000_000 * 10**9), 0), ("time.time_ns()", -1),
])
def test_set_time_refuses_insane_values_before_any_syscall(time_ns: str, threshold_ns: int) -> None:
    # a check that let them through would reach clock_settime: PERMISSION_DENIED here, not INVALID_ARGUMENT
    assert set_time_without_cap_sys_time(time_ns, threshold_ns).startswith("INVALID_ARGUMENT")


def test_set_time_within_the_threshold_does_not_step() -> None:
    reply = set_time_without_cap_sys_time("time.time_ns()", 10 * 10**9)
    assert reply.startswith("TimeSet(") and "stepped=False" in reply, reply  # a step would be PERMISSION_DENIED


def test_set_time_without_cap_sys_time_is_permission_denied() -> None:
    """The real clock_settime, in a process that cannot set the clock (checked before the call)."""
    reply = set_time_without_cap_sys_time("time.time_ns() + 3600 * 10**9", 0)
    assert reply.startswith("PERMISSION_DENIED") and "CAP_SYS_TIME" in reply


def clock_pushes_without_cap_sys_time(*offsets_ms: int) -> list[str]:
    """The init's `Clock.set_from_host` answering pushes off by `offsets_ms` (5 ms threshold), one after the
    other in one process that cannot set the clock: each reply, or the error's code."""
    code = f"""
from boxpark.guest.clock import Clock
clock = Clock(emit=lambda event: print("event", event))
for offset in {list(offsets_ms)!r}:
    try:
        print(clock.set_from_host(protocol.SetTime(time_ns=time.time_ns() + offset * 10**6, threshold_ns=5 * 10**6)))
    except GuestError as exc:
        print(exc.code.name, exc.message)
"""
    out = subprocess.run(without_cap_sys_time(code), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out
    return out.stdout.splitlines()


def test_a_host_push_within_the_threshold_changes_nothing() -> None:
    replies = clock_pushes_without_cap_sys_time(0, 0)
    assert all(r.startswith("TimeSet(") and "stepped=False" in r for r in replies), replies


def test_a_later_push_a_little_off_slews_with_the_real_adjtime() -> None:
    """The first push off by more than the threshold steps; a later one 40 ms off calls adjtime(3), which
    needs CAP_SYS_TIME too: refused here, which proves it was the real call."""
    first, second = clock_pushes_without_cap_sys_time(0, 40)
    assert first.startswith("TimeSet(") and "stepped=False" in first, first
    assert second.startswith("PERMISSION_DENIED not permitted to slew"), second


def test_a_first_push_off_or_one_far_off_steps() -> None:
    replies = clock_pushes_without_cap_sys_time(40, 0, 60_000)  # step refused; nothing; a minute: step refused
    assert [r.split(" the clock")[0] for r in (replies[0], replies[2])] == ["PERMISSION_DENIED not permitted to step"] * 2, replies
    assert not any(r.startswith("event") for r in replies), replies


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


@pytest.fixture
def server_without_cap_sys_time(tmp_path: Path, short_tmp: str) -> Iterator[str]:
    """A Guest API server (not PID 1) that could not set the clock even if its gate let a SetTime through."""
    if not can_set_the_clock():
        with running_server(tmp_path) as srv:
            yield srv.address
        return
    if not is_root():
        pytest.skip("this process may set the clock but is not root: cannot drop the capability")
    with guest_namespace(short_tmp) as ns:
        yield ns.address


def test_sync_and_the_gate_off_pid1(server_without_cap_sys_time: str) -> None:
    assert GuestServer().machine_wide is False

    async def body() -> None:
        async with await GuestClient.open(server_without_cap_sys_time) as client:
            await client.sync()
            for attempt in (client.set_time(time.time_ns() + 3600 * 10**9, threshold_ns=0),
                            client.hostname("renamed")):
                with pytest.raises(RemoteError) as info:
                    await attempt
                # the gate's refusal, not the missing capability's
                assert info.value.code == ErrorCode.PERMISSION_DENIED and "not the guest's init" in info.value.message
            assert await client.hostname() == socket.gethostname()

    asyncio.run(body())
