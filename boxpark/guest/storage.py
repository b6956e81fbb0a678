"""The storage calls of the Guest API, each in the module of its concern (this module only names them).

`Mount`/`Umount` in `filesystems` (their options in `mountopts`), `Swapon`/`Swapoff` in `swap`, `ResizeDisk`
in `disks`. The server imports them from here on their first use, keeping them off the boot path.
"""

from __future__ import annotations

from .disks import resize_disk
from .filesystems import mount, umount
from .swap import swapoff, swapon

__all__ = ["mount", "resize_disk", "swapoff", "swapon", "umount"]
