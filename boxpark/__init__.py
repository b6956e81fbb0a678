"""Boxpark: a minimal Linux guest VM with a Python init, driven over the Guest API, running Docker."""

__version__ = "0.1.0"
