"""The one base of the errors a person sees: a sentence, a hint, an exit code.

Any layer raises a `BoxparkError` (or a subclass naming its area) when the person running Boxpark can act
on the failure; the `boxpark` command shows it in one place (`boxpark.cli.main`: the sentence, the hint,
the exit code — a traceback only with `--debug`). Errors that are bugs stay ordinary exceptions and keep
their traceback. This module imports nothing of the package, so every module may raise its errors without
an import cycle; it must stay that small.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~3 ms of every command's start)
if TYPE_CHECKING:
    from typing import ClassVar


class BoxparkError(Exception):
    """Something the person can act on: `message` says what is wrong, `hint` what to do, `code` the exit code.

    A subclass names whose error it is and sets its usual `exit_code`; a caller may still pass `code`.
    """

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, hint: str | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or ""
        self.code = self.exit_code if code is None else code


class UsageError(BoxparkError):
    """The command line or a file it names is wrong; the message says what to change."""

    exit_code = 2
