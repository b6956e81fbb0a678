"""The VM tier's fixtures: the machine factory of `tests/machines.py` (booted guests, logs on failure)."""

from tests.machines import _machine_reporter, machines, module_machines  # noqa: F401  (registers the fixtures)
