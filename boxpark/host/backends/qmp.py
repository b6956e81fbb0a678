"""QMP, QEMU's machine protocol: a minimal client (one command at a time) and the parse of `info usernet`.

The qemu backend holds one connection on a socket it made and handed to QEMU (so no path races); a second
monitor (state/qmp-user.sock) is for people and tests.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
from typing import Any

from .base import BackendError

EVENTS_KEPT = 64  # the QMP events a connection keeps: a machine up for weeks moves its balloon often


class QmpError(Exception):
    """QEMU refused a QMP command: `klass` is QMP's error class, the message QEMU's."""

    def __init__(self, command: str, klass: str, message: str) -> None:
        super().__init__(f"QMP {command}: {message}")
        self.klass = klass


class Qmp:
    """A minimal QMP client: one command at a time; the last `EVENTS_KEPT` asynchronous events (read between
    replies: BALLOON_CHANGE at every balloon move, for instance) are kept in `events`, for diagnosis."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)

    @classmethod
    async def connect(cls, path: str) -> Qmp:
        reader, writer = await asyncio.open_unix_connection(path)
        qmp = cls(reader, writer)
        greeting = await qmp._read()
        if "QMP" not in greeting:
            raise BackendError(f"{path} is not a QMP socket: {greeting}")
        await qmp.execute("qmp_capabilities")
        return qmp

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise ConnectionResetError("QEMU closed the QMP connection")
        message: dict[str, Any] = json.loads(line)
        return message

    async def execute(self, command: str, **arguments: Any) -> Any:
        async with self._lock:
            request: dict[str, Any] = {"execute": command}
            if arguments:
                request["arguments"] = arguments
            self._writer.write(json.dumps(request).encode() + b"\n")
            await self._writer.drain()
            while True:
                message = await self._read()
                if "event" in message:
                    self.events.append(message)
                    continue
                if "error" in message:
                    error = message["error"]
                    raise QmpError(command, error.get("class", ""), error.get("desc", str(error)))
                return message.get("return")

    async def hmp(self, command_line: str) -> str:
        """A human monitor command (for what QMP lacks, e.g. `info usernet`)."""
        result = await self.execute("human-monitor-command", **{"command-line": command_line})
        return str(result)

    def close(self) -> None:
        self._writer.close()


_HOSTFWD = re.compile(r"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+(\d+)")


def forwarded_port(usernet: str, guest_port: int) -> int | None:
    """The host port of the hostfwd rule to `guest_port`, from `info usernet`."""
    for match in _HOSTFWD.finditer(usernet):
        if int(match[2]) == guest_port:
            return int(match[1])
    return None


