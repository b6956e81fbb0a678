"""The connect call (to be built)."""

from typing import Any

from ..protocol import ErrorCode
from .errors import GuestError


async def connect(channel: Any, message: Any) -> None:
    raise GuestError(ErrorCode.UNSUPPORTED, "Connect is not built yet")
