"""Storage calls of the Guest API (to be built)."""

from typing import Any

from ..protocol import ErrorCode
from .errors import GuestError


def _todo(message: Any) -> Any:
    raise GuestError(ErrorCode.UNSUPPORTED, f"{type(message).__name__} is not built yet")


mount = umount = swapon = swapoff = resize_disk = _todo
