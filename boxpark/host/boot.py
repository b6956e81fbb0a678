"""`boxpark boot`: boot a guest in the foreground, show its boot timeline and API address, stop it on Ctrl-C.

A development and debugging command (machines for everyday use are the agent's, behind `boxpark up`):
no machine state is kept beyond its state directory, which is a fresh temporary directory unless
`--state` names one. Importing this module costs nothing: the backends load when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..protocol import Ready
    from .backends import Backend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `boxpark boot`."""
    parser.add_argument("--backend", choices=("qemu", "sandbox"), default="qemu",
                        help="qemu: a VM (default); sandbox: Linux namespaces, no VM (root; for development)")
    parser.add_argument("--image", metavar="DIR",
                        help="the image directory (default: the one `boxpark image build` makes for this arch)")
    parser.add_argument("--arch", choices=("amd64", "arm64"), help="the guest's architecture (default: the image's)")
    parser.add_argument("--console", action="store_true", help="the guest's console on hvc0 (in STATE/console.log)")
    parser.add_argument("--state", metavar="DIR", help="the state directory (default: a temporary one, removed on exit)")
    parser.add_argument("--rtc-base", metavar="TIME", default="utc",
                        help="qemu: the RTC's start, utc (default), localtime or YYYY-MM-DD[THH:MM:SS] (UTC)")
    parser.add_argument("--cpus", type=int, help="virtual CPUs (qemu default: 2)")
    parser.add_argument("--memory", type=int, metavar="MIB", help="memory in MiB (qemu default: 2048)")
    parser.add_argument("--cmdline", metavar="LINE", help="replace the whole kernel command line (expert)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning"), help="the init's log level")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for Ready (default 120)")


# ------------------------------------------------------------------------------------ the timeline


@dataclass
class Share:
    label: str
    seconds: float


def boot_shares(backend: Backend, ready: Ready) -> tuple[float, list[Share]]:
    """(start→Ready seconds as the host saw it, the shares of it) from the backend's clocks and Ready.

    The guest's CLOCK_MONOTONIC at Ready minus its steps is the kernel's share (with the initramfs and the
    init's own Python start). In the sandbox that clock is the host's, so the share before the steps is
    measured from the spawn instead: unshare, the pre-init and the init's Python start.
    """
    assert backend.events is not None and backend.events.ready_at is not None and backend.spawned_at is not None
    total = backend.events.ready_at - backend.spawned_at
    guest_mono = ready.monotonic_ns / 1e9
    steps = sum(step.duration_ns for step in ready.timeline) / 1e9
    if backend.name == "sandbox":
        before = guest_mono - steps - backend.spawned_at
        return total, [Share("namespaces, pre-init, the init's start", before), Share("init steps", steps),
                       Share("Ready's delivery", total - before - steps)]
    return total, [Share("QEMU, firmware, delivery", total - guest_mono),
                   Share("kernel, initramfs, the init's start", guest_mono - steps), Share("init steps", steps)]


def format_timeline(backend: Backend, ready: Ready) -> str:
    total, shares = boot_shares(backend, ready)
    lines = [f"the guest is ready: {total * 1000:.0f} ms from start ({backend.name}"
             + (f", {backend.describe()['accel']}" if backend.describe().get("accel") else "") + ")"]
    for share in shares:
        lines.append(f"  {share.label:<40} {share.seconds * 1000:8.0f} ms  {share.seconds / total:5.0%}")
    for step in ready.timeline:
        error = f"  FAILED: {step.error}" if step.error else ""
        lines.append(f"    step {step.name:<34} {step.duration_ns / 1e6:8.1f} ms{error}")
    lines.append(f"  guest: {ready.arch}, kernel {ready.kernel}, boxpark {ready.boxpark}, boot {ready.boot_id}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the command


def _image_dir(arch: str) -> str:
    try:
        from ..image.build import default_image_dir
    except ImportError:  # the builder is optional at run time
        from ..dirs import cache_home

        return str(cache_home() / "images" / arch)
    return str(default_image_dir(arch, with_docker=True))


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from .spec import MissingImageError, SpecError, host_arch, spec_from_image

    arch = args.arch or host_arch()
    image = args.image or _image_dir(arch)
    state = os.path.abspath(args.state) if args.state else tempfile.mkdtemp(prefix=f"boxpark-{args.backend}-")
    fields: dict[str, object] = {"console": args.console, "rtc_base": args.rtc_base}
    if args.arch:
        fields["arch"] = args.arch
    if args.cpus is not None:
        fields["cpus"] = args.cpus
    if args.memory is not None:
        fields["memory"] = args.memory
    if args.cmdline:
        fields["command_line"] = args.cmdline
    if args.log_level:
        fields["settings"] = {"log": args.log_level}
    if args.backend == "sandbox":
        fields.update(kernel=None, initrd=None)
    try:
        try:
            spec = spec_from_image(image, state, **fields)
        except MissingImageError as exc:
            raise UsageError(str(exc)) from None
        try:
            return asyncio.run(_boot(args.backend, spec, args.timeout))
        except SpecError as exc:
            raise UsageError(f"bad machine spec: {exc}") from None
    finally:
        if not args.state:
            shutil.rmtree(state, ignore_errors=True)


async def _boot(backend_name: str, spec: object, timeout: float) -> int:
    from .backends import API_PORT, BackendError, get_backend
    from .eventstream import EventStreamError
    from .spec import MachineSpec

    assert isinstance(spec, MachineSpec)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    backend = get_backend(backend_name)
    async with backend:
        print(f"booting {spec.root} on {backend_name} (state: {spec.state_dir}) ...", file=sys.stderr, flush=True)
        try:
            await backend.start(spec)
            ready_or_stop = asyncio.ensure_future(backend.wait_ready(timeout))
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({ready_or_stop, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping in done and ready_or_stop not in done:
                ready_or_stop.cancel()
                print("interrupted before the guest was ready; stopping it", file=sys.stderr)
                return 130
            stopping.cancel()
            ready = ready_or_stop.result()
        except (BackendError, EventStreamError) as exc:
            print(f"boxpark boot: {exc}", file=sys.stderr)
            return 1
        print(format_timeline(backend, ready), flush=True)
        secret = f" --secret-file {backend.secret_file}" if backend.secret_file else ""
        api = backend.address(API_PORT)
        print(f"API: {api}" + (f"  (secret: {backend.secret_file})" if backend.secret_file else ""))
        print(f"try: boxpark guest call {api}{secret} info")
        print("Ctrl-C stops the machine", flush=True)
        ended = asyncio.ensure_future(backend.wait())
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if ended in done:
            code = ended.result()
            print(f"the machine ended by itself (status {code})", file=sys.stderr)
            return 0 if code == 0 else 1
        ended.cancel()
        print("stopping the machine ...", file=sys.stderr, flush=True)
        code = await backend.stop(timeout=15.0)
        print(f"stopped (status {code})", file=sys.stderr)
    return 0
