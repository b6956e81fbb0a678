"""The vz backend on a Mac: limits, VZ's own refusal text, and a boot of the imported arm64 image to Ready.

Needs: Apple silicon, macOS 13+, `pip install '.[macos]'`, a Python signed with the virtualization
entitlement (`boxpark vz sign`, then run pytest with the launcher it prints), and for the boot an imported
image (`boxpark image import FILE`). Each missing piece skips with what to do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
from pathlib import Path

import pytest

from boxpark.host.backends import BackendError, get_backend
from boxpark.host.backends.vz import VzBackend, VzError, VzMachine, read_limits
from boxpark.host.backends.vzplan import make_plan
from boxpark.host.guestlink import guest_client
from boxpark.host.spec import MissingImageError, spec_from_image


def image_dir() -> Path:
    from boxpark.image.build import default_image_dir

    directory = Path(os.environ.get("BOXPARK_TEST_IMAGE") or default_image_dir("arm64", with_docker=True))
    if not (directory / "manifest.json").exists():
        pytest.skip(f"no arm64 image in {directory}: boxpark image export on Linux, then boxpark image import FILE")
    return directory


@pytest.fixture
def state() -> Path:
    with tempfile.TemporaryDirectory(prefix="bpvz", dir="/tmp") as d:  # short: sockets live here
        yield Path(d)


def test_limits_are_sane() -> None:
    limits = read_limits()
    assert limits.host_arch == "arm64"
    assert 1 <= limits.min_cpus <= limits.max_cpus and limits.min_memory < limits.max_memory
    assert limits.rosetta in ("installed", "not-installed", "unsupported")


def test_get_backend_gives_vz() -> None:
    assert isinstance(get_backend("vz"), VzBackend)


def test_vz_refusal_is_reported_verbatim(state: Path) -> None:
    """A plan VZ refuses (more CPUs than allowed, past our own check) fails with VZ's text."""
    spec = spec_from_image(image_dir(), state, name="refused")
    limits = read_limits()
    plan = dataclasses.replace(make_plan(spec, limits), cpus=limits.max_cpus + 1)

    async def main() -> None:
        machine = VzMachine(plan, asyncio.get_running_loop(), lambda kept: kept.close())
        with pytest.raises(VzError, match="VZ refused the machine's configuration: .+"):
            await machine.start()
        await machine.close()

    asyncio.run(main())


def test_boot_to_ready_exec_and_stop(state: Path) -> None:
    spec = spec_from_image(image_dir(), state, name="vztest", memory=1024)

    async def main() -> None:
        backend = VzBackend()
        async with backend:
            try:
                await backend.start(spec)
            except VzError as exc:
                if "entitlement" in str(exc):
                    pytest.skip(f"this Python is not signed for VZ: {exc}")
                raise
            ready = await backend.wait_ready(120)
            assert ready.boot_id
            client = await guest_client(backend)
            try:
                result = await client.exec(["uname", "-m"])
                assert result.stdout == b"aarch64\n"
                if backend.plan is not None and backend.plan.rosetta is not None:
                    assert backend.rosetta_ready
                    entry = await client.read_all("/proc/sys/fs/binfmt_misc/rosetta")
                    assert b"/run/rosetta/rosetta" in entry
            finally:
                await client.close()
            code = await backend.stop(timeout=30)
            assert code == 0, backend.ended_message(code or 0, "at stop")
        assert not (state / "api.sock").exists() and not (state / "events.sock").exists()

    try:
        asyncio.run(main())
    except MissingImageError as exc:
        pytest.skip(str(exc))
    except BackendError:
        raise
