"""The macOS tier: the vz backend's PyObjC layer on a real Mac. Everything here skips elsewhere, saying why."""

from __future__ import annotations

import sys

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    if sys.platform != "darwin":
        reason = f"macOS only (Virtualization.framework); this host is {sys.platform}"
    else:
        try:
            import dispatch  # noqa: F401
            import Virtualization  # noqa: F401
        except ImportError:
            reason = "needs PyObjC's Virtualization and libdispatch: pip install '.[macos]'"
    for item in items:
        if "tests/macos/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.macos)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
