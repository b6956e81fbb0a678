"""Moved: the machine commands are `boxpark.cli.machine` now; these names stay importable from here until
the lead removes the shims after merging issue 11."""

from ..cli.machine import NOT_RUNNING, CommandFailed, _ensure_imported_image, add_arguments, control, machine_of

__all__ = ["NOT_RUNNING", "CommandFailed", "_ensure_imported_image", "add_arguments", "control", "machine_of"]
