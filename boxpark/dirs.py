"""Where Boxpark keeps the user's files: configuration, machine state, and the image cache.

One rule for all three, the XDG Base Directory one: Boxpark's own variable ($BOXPARK_HOME for state,
$BOXPARK_CACHE for the cache) wins, then $XDG_CONFIG_HOME / $XDG_DATA_HOME / $XDG_CACHE_HOME, then
~/.config, ~/.local/share, ~/.cache; each with `boxpark` below it. Host and image builder both import this
(the builder is optional at run time, so it cannot live in either); it must never create anything.
"""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable, "")
    # the XDG spec: a relative path in these variables is invalid and is ignored, as unset
    return Path(value) if os.path.isabs(value) else Path.home() / fallback


def config_home() -> Path:
    """$XDG_CONFIG_HOME/boxpark, else ~/.config/boxpark: where boxpark.toml is looked for."""
    return _xdg("XDG_CONFIG_HOME", ".config") / "boxpark"


def data_home() -> Path:
    """$BOXPARK_HOME, else $XDG_DATA_HOME/boxpark, else ~/.local/share/boxpark: the machines' state."""
    if os.environ.get("BOXPARK_HOME"):
        return Path(os.environ["BOXPARK_HOME"])
    return _xdg("XDG_DATA_HOME", ".local/share") / "boxpark"


def cache_home() -> Path:
    """$BOXPARK_CACHE, else $XDG_CACHE_HOME/boxpark, else ~/.cache/boxpark: images and what builds them."""
    if os.environ.get("BOXPARK_CACHE"):
        return Path(os.environ["BOXPARK_CACHE"]).expanduser()
    return _xdg("XDG_CACHE_HOME", ".cache") / "boxpark"
