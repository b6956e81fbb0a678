"""The vz backend off a Mac: a clear refusal, and the parts of its executor that are plain Python."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from boxpark.host.backends import BACKENDS, BackendError, get_backend
from boxpark.host.backends.vz import VmEnd, require_macos


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")
def test_vz_off_macos_says_so() -> None:
    assert "vz" in BACKENDS
    with pytest.raises(BackendError, match=r"the vz backend runs on macOS .*not linux; use backend = \"qemu\""):
        get_backend("vz")


def test_vz_without_pyobjc_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import Virtualization  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("PyObjC's Virtualization is installed here")
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(BackendError,
                       match=r"needs PyObjC's Virtualization and libdispatch .*pip install 'boxpark\[macos\]'"):
        require_macos()


def test_vm_end_counts_the_first_end_from_any_thread() -> None:
    async def main() -> None:
        end = VmEnd(asyncio.get_running_loop())
        assert end.returncode is None and end.reason == "" and await end.wait_for(0.01) is None
        threads = [threading.Thread(target=end.finish, args=(code, f"end {code}")) for code in (0, 1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        code = await end.wait()
        assert code in (0, 1, 2) and end.returncode == code and end.reason == f"end {code}"
        end.finish(1, "later")  # a late delegate call changes nothing
        await asyncio.sleep(0.01)
        assert end.returncode == code

    asyncio.run(main())
