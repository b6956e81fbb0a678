"""File calls of the Guest API (to be built)."""

from typing import Any

from ..protocol import ErrorCode
from .errors import GuestError


def _todo(message: Any) -> Any:
    raise GuestError(ErrorCode.UNSUPPORTED, f"{type(message).__name__} is not built yet")


read_file = write_file = mkdir = stat = _todo
