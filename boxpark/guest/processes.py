"""Process calls of the Guest API: exec, launch, attach, wait, signal, list (to be built)."""

from __future__ import annotations

from typing import Any

from ..protocol import ErrorCode
from .errors import GuestError


class Processes:
    def __init__(self, events: Any) -> None:
        self.events = events

    async def _todo(self, channel: Any, message: Any) -> None:
        raise GuestError(ErrorCode.UNSUPPORTED, f"{type(message).__name__} is not built yet")

    exec = launch = attach = wait = signal = list = _todo

    async def stop_all(self, grace: float) -> None:
        return None
