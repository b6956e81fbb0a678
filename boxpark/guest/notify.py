"""sd_notify sockets for the Guest API (to be built)."""

from typing import Any

from ..protocol import ErrorCode
from .errors import GuestError


class NotifyHub:
    async def listen(self, channel: Any, message: Any) -> None:
        raise GuestError(ErrorCode.UNSUPPORTED, "NotifyListen is not built yet")

    def close(self) -> None:
        return None
