"""The init's imports from a freshly mounted squashfs, by the root's layout: what every sandbox boot pays.

Each sandbox boot (and each VM boot) mounts the root squashfs anew, so the image's Python and the modules the
init imports before Ready are read cold: every small .pyc costs a decompressed 128 KiB fragment block. This
takes the part of the built image the init's Python reads (python3, its libraries, the stdlib, Boxpark's
layer), packs it three ways and times, interleaved, the init's imports on a fresh mount (cold) and again
(warm):
- `current`: the base's options (`rootfs.BASE_COMPRESSION`: lz4 -Xhc, 128 KiB blocks, fragments);
- `zstd15`: zstd level 15, the base's compression before lz4 (smaller, slower to decompress);
- `zstd15_no_fragments`: the same without fragments (each small file compressed alone).
Figures: the cold-start penalty (cold − warm, median) of each layout, its reference the current one's.
Needs root, unsquashfs/mksquashfs and the built image; a few minutes (three mksquashfs runs).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._report import figure

ROUNDS = 7
IMPORTS = ("import sys; sys.path.insert(0, '/usr/lib/boxpark/python'); import boxpark.guest.init, "
           "boxpark.guest.mounts, boxpark.guest.clock, boxpark.guest.network, asyncio, boxpark.guest.server, "
           "boxpark.protocol, boxpark.transport, boxpark.guest.events, boxpark.guest.reaper, boxpark.guest.dns")
TIMED = ('set -e; root=$2; mount -t squashfs -o ro "$1" "$root"; '
         't() { s=$(date +%s%N); chroot "$root" /usr/bin/python3 -SI -c "$3"; e=$(date +%s%N); '
         'echo $(( e - s )); }; t "$@"; t "$@"')
PARTS = ["usr/bin/python3", "usr/bin/python3.11", "usr/lib/python3.11", "usr/lib/x86_64-linux-gnu",
         "usr/lib/aarch64-linux-gnu", "lib", "lib64", "usr/lib64", ".boxpark", "usr/lib/boxpark"]


def cold_and_warm(image: Path) -> tuple[float, float]:
    from boxpark.host.backends.loopdev import loop_device

    with tempfile.TemporaryDirectory(prefix="bp-bench-") as mnt, loop_device(str(image)) as dev:
        out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", TIMED, "sh", dev, mnt,
                              IMPORTS], check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]) / 1e6, int(out[1]) / 1e6


def main() -> None:
    if os.geteuid() != 0 or not shutil.which("unsquashfs") or not shutil.which("mksquashfs"):
        print("squashfs_cold: needs root, unsquashfs and mksquashfs", file=sys.stderr)
        return
    from bench.boot import image
    from boxpark.image.rootfs import BASE_COMPRESSION

    root = image() / "root.squashfs"
    work = Path(tempfile.mkdtemp(prefix="bp-bench-sq-", dir="/tmp"))
    try:
        tree = work / "tree"
        subprocess.run(["unsquashfs", "-q", "-n", "-d", str(tree), str(root), *PARTS],
                       capture_output=True)  # a part this arch lacks is only a warning
        if not (tree / "usr/bin/python3").exists():
            raise RuntimeError(f"no usr/bin/python3 in {root}")
        layouts = {"current": list(BASE_COMPRESSION),
                   "zstd15": ["-comp", "zstd", "-Xcompression-level", "15"],
                   "zstd15_no_fragments": ["-comp", "zstd", "-Xcompression-level", "15", "-no-fragments"]}
        for name, options in layouts.items():
            subprocess.run(["mksquashfs", str(tree), str(work / f"{name}.sqfs"), "-noappend", "-no-progress",
                            "-quiet", *options], check=True, capture_output=True)
        penalty: dict[str, list[float]] = {name: [] for name in layouts}
        cold: dict[str, list[float]] = {name: [] for name in layouts}
        for _ in range(ROUNDS):
            for name in layouts:
                c, w = cold_and_warm(work / f"{name}.sqfs")
                cold[name].append(c)
                penalty[name].append(c - w)
        for name in layouts:
            size = (work / f"{name}.sqfs").stat().st_size / 1e6
            print(f"   {name}: {size:.0f} MB; cold {statistics.median(cold[name]):.0f} ms "
                  f"({', '.join(f'{c:.0f}' for c in cold[name])})", file=sys.stderr)
        reference = statistics.median(penalty["current"])
        for name in layouts:
            figure(f"squashfs_cold_penalty_{name}", statistics.median(penalty[name]), "ms", reference,
                   "informational: lower is a faster boot")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
