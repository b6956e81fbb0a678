"""Backends: what runs a guest. One small contract (`base.Backend`); `get_backend(name)` gives one.

    async with get_backend("qemu") as backend:
        await backend.start(spec)
        ready = await backend.wait_ready(60)
        sock = await backend.dial(API_PORT)

The modules, one concern each: `base` (the contract and what every backend shares), `process` (host
processes watched through pidfds), `logs` (the ends of a machine's logs), `userns` (owner-mapped user
namespaces); `qemu` (the backend) over `qemuargv` (decisions and argv, no I/O), `qmp` and `virtiofsd`;
`sandbox` over `preinit` (run inside its namespaces), `cgroup` and `loopdev`; `vz` over `vzplan` (no
PyObjC) and `..gcdbridge`. Nothing here knows the agent, the configuration or the image builder.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from ..eventstream import EventStreamError
from ..spec import MachineSpec
from .base import API_PORT, Backend, BackendError, UnsupportedSpec
from .logs import summary, tail

BACKENDS = ("qemu", "sandbox", "vz")


def get_backend(name: str) -> Backend:
    """A new, unstarted backend by name: `qemu`, `sandbox` or `vz` (macOS; `BackendError` elsewhere)."""
    if name == "qemu":
        from .qemu import QemuBackend

        return QemuBackend()
    if name == "sandbox":
        from .sandbox import SandboxBackend

        return SandboxBackend()
    if name == "vz":
        from .vz import VzBackend, require_macos

        require_macos()
        return VzBackend()
    raise BackendError(f"unknown backend {name!r}; one of: {', '.join(BACKENDS)}")


@contextlib.asynccontextmanager
async def open_backend(name: str, spec: MachineSpec) -> AsyncIterator[Backend]:
    """A started backend for `spec`; leaving the block stops it and cleans up."""
    backend = get_backend(name)
    async with backend:
        await backend.start(spec)
        yield backend


__all__ = ["API_PORT", "Backend", "BackendError", "BACKENDS", "EventStreamError", "UnsupportedSpec",
           "get_backend", "open_backend", "summary", "tail"]
