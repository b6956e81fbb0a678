"""Shared pytest fixtures: the namespace fixtures (`short_tmp`, `guest_ns`) from `tests/nsfixture.py`."""

from .nsfixture import guest_ns, short_tmp  # noqa: F401  (registers the fixtures)
