"""Boxpark benchmarks: `python -m bench [NAME…]`; one JSON line per figure on stdout (DESIGN.md §5)."""
