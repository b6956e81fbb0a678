"""The ends of a machine's logs, for the sentence that says why a machine ended (never the whole file)."""

from __future__ import annotations

import os
import re


def _read_end(path: str | os.PathLike[str], size: int = 64 * 1024) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            data = f.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()


def tail(path: str | os.PathLike[str], lines: int = 15) -> str:
    """The last `lines` lines of a text file (empty when there is none)."""
    return "\n".join(_read_end(path)[-lines:])


# What says why a boot failed, wherever it is in a log: a stack dump after a panic pushes it out of the tail.
_TELLING = re.compile(r"Kernel panic|FATAL|Traceback|[Ee]rror|can't |cannot |not found|No such|Exec format")


def summary(path: str | os.PathLike[str], lines: int = 15, telling: int = 8) -> str:
    """The telling lines of a log (panics, FATAL, errors) that are not in its tail, then the tail."""
    text = _read_end(path)
    end = text[-lines:]
    before = [line for line in text[:-lines] if _TELLING.search(line)][-telling:] if len(text) > lines else []
    return "\n".join(before + (["[...]"] if before else []) + end)


def with_logs(headline: str, logs: list[tuple[str, str]], *, empty_hint: bool = True) -> str:
    """`headline`, then the telling end of each log in `logs` ((label, path)); says so when all are empty."""
    parts = [headline]
    for label, path in logs:
        text = summary(path)
        if text:
            parts.append(f"--- {label} ({path}), last lines:\n{text}")
    if len(parts) == 1 and empty_hint:
        parts.append(f"(nothing in {', '.join(p for _, p in logs)}; boot with the console on "
                     f"to see the kernel's messages)")
    return "\n".join(parts)
