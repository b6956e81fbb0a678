"""The mount guard's host side: start the guest's authorization plugin before dockerd and keep it running.

The plugin (`boxpark.guest.authz`) refuses a bind mount of a path that is neither shared from the host nor
present in the guest. The agent starts it as a guest service after the mounts and before dockerd, with the
shares that were mounted (`--share`: virtiofs shares, named in its refusals; `--known`: the guest's other
configured mounts), waits until its socket is there (dockerd refuses to start without the plugins it is
told about), adds it to daemon.json's `authorization-plugins`, and starts it again if it ever exits:
without it dockerd answers every API call with an error. Nothing here blocks the agent's loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable

from .. import protocol
from ..transport import RemoteError, TransportError
from .client import GuestClient
from .config import Mount

log = logging.getLogger("boxpark.agent.mountguard")

PLUGIN = "boxpark-mounts"  # authz.PLUGIN (the host never imports guest code)
SOCKET = f"/run/docker/plugins/{PLUGIN}.sock"  # authz.SOCKET
NAME = "boxpark-mounts"  # the guest service's name
GUEST_CODE = "/usr/lib/boxpark/python"  # image.rootfs.PYTHON_DIR: where boxpark's code is in the guest
START = f"import sys; sys.path.insert(0, {GUEST_CODE!r}); from boxpark.guest.authz import main; main()"


class MountGuardError(Exception):
    """The plugin did not start; the message says why (the agent fails `up` with it)."""


def plugin_argv(mounts: list[Mount], mounted: list[str]) -> list[str]:
    """The plugin's command line: each mounted share (`--share`) and other guest mount (`--known`)."""
    argv = ["python3", "-SI", "-c", START]
    done = {os.path.normpath(target) for target in mounted}
    for mount in mounts:
        target = os.path.normpath(mount.target)
        if target in done:
            argv += ["--share" if mount.type == "virtiofs" else "--known", target]
    return argv


def with_plugin(daemon: dict[str, Any]) -> dict[str, Any]:
    """daemon.json with the plugin first in `authorization-plugins` (a user's own plugins stay after it)."""
    theirs = [p for p in daemon.get("authorization-plugins") or [] if p != PLUGIN]
    return {**daemon, "authorization-plugins": [PLUGIN, *theirs]}


class MountGuard:
    """The plugin as a guest service: `start` once before dockerd, then `run` restarts it if it exits."""

    def __init__(self, dial: Callable[[], Awaitable[GuestClient]], argv: list[str]) -> None:
        self._dial = dial
        self.argv = argv
        self.starts = 0

    async def start(self, client: GuestClient, timeout: float = 60.0) -> None:
        """Launch the plugin and return once its socket is there; MountGuardError if it exits or never listens."""
        await client.launch(NAME, self.argv, replace=True, ring_records=1000, ring_bytes=256 * 1024)
        self.starts += 1
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                exit_ = await client.wait(NAME, timeout=0.05)
            except RemoteError as exc:
                if exc.code != protocol.ErrorCode.TIMEOUT:
                    raise
            else:
                raise MountGuardError(f"the mount guard ({NAME}) exited at its start (code {exit_.code}, "
                                      f"signal {exit_.signal}): {await self._last_words(client)}")
            try:
                await client.stat(SOCKET)
                return
            except RemoteError as exc:
                if exc.code != protocol.ErrorCode.NOT_FOUND:
                    raise
            if asyncio.get_running_loop().time() > deadline:
                raise MountGuardError(f"the mount guard ({NAME}) did not listen on {SOCKET} within {timeout:g} s")

    async def _last_words(self, client: GuestClient) -> str:
        lines: list[str] = []
        stream = await client.attach(NAME, follow=False)
        try:
            async for frame in stream:
                if isinstance(frame, protocol.LogBatch):
                    lines += [r.data.decode(errors="replace") for r in frame.records if r.stream == 2]
        finally:
            stream.close()
        return lines[-1] if lines else "it said nothing"

    async def run(self) -> None:
        """Until cancelled: wait for the plugin's exit and start it again (after 1 s, doubling up to 30 s)."""
        delay = 1.0
        while True:
            try:
                client = await self._dial()
                async with client:
                    exit_ = await client.wait(NAME)
                    log.warning("the mount guard exited (code %s, signal %s): starting it again in %.0f s; "
                                "dockerd refuses API calls meanwhile", exit_.code, exit_.signal, delay)
                    await asyncio.sleep(delay)
                    await self.start(client)
                    delay = min(delay * 2, 30.0)
            except (TransportError, RemoteError, ConnectionError, protocol.ProtocolError, MountGuardError) as exc:
                log.warning("watching the mount guard: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
