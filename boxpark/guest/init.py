"""PID 1 of the Boxpark guest: the boot steps in order, then the PID-1 duties, forever.

This file reads as the boot's list (DESIGN.md §1); each step lives in the module of its concern and is
timed by `Timeline.step`, whose records become the `Ready` event's timeline. A failed step is logged with
its cause and the boot goes on where it safely can. The init never exits on its own: a PID 1 exit panics
the kernel; when nothing else is possible it powers off.

The boot path: imports here are the ones the boot needs, in the order it needs them.
"""

from __future__ import annotations

import gc
import os
import time

BOOT_START_NS = time.monotonic_ns()

import contextlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from typing import TYPE_CHECKING, Iterator  # noqa: E402

from .. import __version__  # noqa: E402
from . import initlog, rootfs, settings as settings_  # noqa: E402

if TYPE_CHECKING:
    from .dns import Forwarder
    from .network import Result

log = logging.getLogger("boxpark.init")


class Timeline:
    """The boot steps with their durations (and errors), in the order they ran."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, int, str | None]] = []

    @contextlib.contextmanager
    def step(self, name: str, fatal: bool = False) -> Iterator[None]:
        start = time.monotonic_ns()
        try:
            yield
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self.steps.append((name, time.monotonic_ns() - start, error))
            log.error("step %s failed: %s", name, error)
            if fatal:
                raise
        else:
            self.steps.append((name, time.monotonic_ns() - start, None))
            log.debug("step %s took %.1f ms", name, (time.monotonic_ns() - start) / 1e6)


def main() -> None:
    """The entry point of /sbin/init."""
    # The boot's imports make some 25 000 objects and almost no garbage: no collector pass until Ready
    # (~3 ms of CPU less, 6% of the imports); `serve` turns it back on once Ready is sent.
    gc.disable()
    # PID 1 speaks no TLS: asyncio imports ssl only to offer it (`import ssl` in a try), which loads OpenSSL
    # on every boot before Ready. A None entry makes that import fail, as on a Python built without ssl.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    log_ = initlog.setup()
    log_.info("started (boxpark %s, pid %d)", __version__, os.getpid())
    timeline = Timeline()
    try:
        with timeline.step("rootfs", fatal=True):
            rootfs.ensure_proc()
            settings = settings_.load()
            initlog.set_level(settings.log)
            lower = rootfs.overlay_root()
            log.debug("root: tmpfs overlay over %s", lower)
        boot(settings, timeline)
    except BaseException as exc:  # the last line of defence of a PID 1
        log.critical("the boot failed: %s: %s", type(exc).__name__, exc, exc_info=True)
        power_off(reboot=False, sandbox=os.environ.get("BOXPARK_SETTINGS") is not None)


def boot(settings: settings_.Settings, timeline: Timeline) -> None:
    from . import mounts

    _raise_limits(settings.sandbox)
    moved = None
    with timeline.step("mounts"):
        mounts.mount_all()
        moved = mounts.enter_init_cgroup()  # the move ends beside the next steps (see the "cgroup" step)
    channel = initlog.open_channel(settings.logfile)
    log.debug("log channel: %s", channel or "console only")
    for warning in settings.warnings:
        log.warning("%s", warning)

    from . import clock as clock_

    clock = clock_.Clock()
    with timeline.step("clock"):
        log.info("clock: %s", "no RTC in the sandbox" if settings.sandbox else clock.from_rtc())

    from . import network

    net = network.Result("not configured")
    with timeline.step("network"):
        network.init_hostname(settings.hostname)
        net = network.configure(settings)
        log.info("network: %s", net.summary)

    import asyncio

    with timeline.step("cgroup"):  # no process was started before this: all would stay in the root cgroup
        if moved is None:
            raise RuntimeError("the init did not leave the root cgroup (the mounts step failed)")
        moved()
        enabled = mounts.enable_controllers()
        log.debug("cgroup controllers: %s", " ".join(enabled) or "none")

    asyncio.run(serve(settings, timeline, clock, net))


def _raise_limits(sandbox: bool) -> None:
    """Open files for a thousand proxied connections (three fds each), inherited by every service;
    socket buffers that let a log stream absorb a slow host (machine-wide: not in the sandbox)."""
    import resource

    try:
        with open("/proc/sys/fs/nr_open") as f:
            most = min(int(f.read()), 1 << 20)
    except (OSError, ValueError) as exc:
        log.warning("RLIMIT_NOFILE not raised: %s", exc)
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
        except (OSError, ValueError):  # a sandbox cannot pass the host's hard limit: take all of it
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open files limited to %d (the host's hard limit)", hard)
    if not sandbox:
        try:
            with open("/proc/sys/net/core/wmem_max", "w") as f:
                f.write(str(4 << 20))
        except OSError as exc:
            log.warning("net.core.wmem_max not raised: %s", exc)


def read_secret(source: str) -> bytes | None:
    """The machine secret from `fwcfg:NAME` (QEMU's -fw_cfg) or `file:PATH`; never the command line."""
    if not source:
        return None
    kind, _, name = source.partition(":")
    if kind == "file":
        path = name
    else:
        path = f"/sys/firmware/qemu_fw_cfg/by_name/{name}/raw"
        if not os.path.exists("/sys/firmware/qemu_fw_cfg"):
            from . import subp

            subp.run(["modprobe", "qemu_fw_cfg"], timeout=10)
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise ValueError(f"the secret from {source} is too short")
    return secret


async def start_dns(net: Result) -> Forwarder | None:
    """The DNS forwarder on eth0's address, then resolv.conf pointing at it; None without a network."""
    from . import dns, network

    if not net.address or not net.gateway:
        return None
    upstreams = [server for server in net.dns if server != net.address]  # never itself: a loop
    forwarder = dns.Forwarder(net.address, upstreams, net.gateway)
    await forwarder.start()
    network.write_resolv_conf([net.address])
    log.info("dns: forwarder on %s:53 → %s; %s is %s", net.address, ", ".join(upstreams) or "no upstream",
             network.HOST_ALIAS, net.gateway)
    return forwarder


async def keep_lease(net: Result, forwarder: Forwarder | None) -> None:
    """eth0's DHCP lease, renewed for as long as the machine runs; the forwarder moves with the address."""
    from . import network

    async def moved(net: Result) -> None:
        nonlocal forwarder
        if forwarder is not None:
            await forwarder.stop()
        forwarder = None
        try:
            forwarder = await start_dns(net)
        except OSError as exc:
            log.error("dns: no forwarder on %s: %s", net.address, exc)

    try:
        await network.keep_lease(net, moved)
    except OSError as exc:  # no port 68 for the renewals: the lease runs out, the rest goes on
        log.error("dhcp: the lease cannot be renewed: %s", exc)


async def serve(settings: settings_.Settings, timeline: Timeline, clock: object, net: Result | None = None) -> None:
    """Start the Guest API, send Ready, then do PID 1's duties until a shutdown is asked for."""
    import asyncio
    import signal

    from .. import protocol
    from ..transport import TransportError, parse_address
    from . import events, reaper
    from .server import GuestServer, boot_id

    loop = asyncio.get_running_loop()
    shutdown: asyncio.Future[tuple[bool, str]] = loop.create_future()

    def request_shutdown(reboot: bool, reason: str) -> None:
        if not shutdown.done():
            shutdown.set_result((reboot, reason))

    event_log = events.EventLog(boot_id())
    clock.emit = event_log.emit  # type: ignore[attr-defined]
    dialer = None
    with timeline.step("events"):  # dialed now: the handshake with the host runs beside the next steps
        secret = None
        try:
            secret = read_secret(settings.secret)
        except Exception as exc:
            log.error("no machine secret (%s): tcp addresses will be refused", exc)
        try:
            events_to = parse_address(settings.events)
            dialer = loop.create_task(events.stream_to_host(event_log, events_to, secret))
        except TransportError as exc:
            log.error("no event stream: %s", exc)
    forwarder = lease = None
    if net is not None:
        with timeline.step("dns"):
            forwarder = await start_dns(net)
        if net.lease is not None:
            lease = loop.create_task(keep_lease(net, forwarder))  # noqa: F841 (it runs as long as the loop)
    server: GuestServer | None = None
    api: list[str] = []
    with timeline.step("api"):
        server = GuestServer(pid1=True, machine_wide=True, allow_swap=not settings.sandbox,
                             on_power=lambda reboot: request_shutdown(reboot, "asked over the API"),
                             event_log=event_log, clock=clock)
        for text in settings.api:
            try:
                address = parse_address(text)
                peers = settings.api_peers if address.kind == "tcp" else None
                await server.listen(address, secret=secret, peers=peers)
                api.append(str(address))
                if peers:
                    log.info("the Guest API on %s serves connections from %s only", address, ", ".join(peers))
            except TransportError as exc:
                log.error("the Guest API cannot listen on %s: %s", text, exc)
        log.info("Guest API on %s", ", ".join(api) or "nothing")

    for signum, reboot in ((signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGPWR, False),
                           (signal.SIGHUP, True)):
        loop.add_signal_handler(signum, request_shutdown, reboot, signal.Signals(signum).name)
    loop.add_signal_handler(signal.SIGCHLD, reaper.reap_orphans)
    reaper.reap_orphans()

    ready = protocol.Ready(
        boot_id=event_log.boot_id, boxpark=__version__, kernel=os.uname().release, arch=os.uname().machine,
        timeline=[protocol.BootStep(name, duration, error) for name, duration, error in timeline.steps],
        monotonic_ns=time.monotonic_ns(), api=",".join(api))
    event_log.emit(ready)
    init_ms = (time.monotonic_ns() - BOOT_START_NS) / 1e6
    log.info("ready: %.0f ms in the init, %.0f ms since the kernel started", init_ms, time.monotonic_ns() / 1e6)
    gc.enable()

    if not settings.sandbox:
        refine = loop.run_in_executor(None, clock.refine)  # type: ignore[attr-defined]
        refine.add_done_callback(lambda f: log.info("clock refine: %s", f.result() if not f.exception()
                                                    else f.exception()))

    reboot, reason = await shutdown
    log.info("shutting down (%s)", reason)
    event_log.emit(protocol.ShuttingDown(reason=reason, reboot=reboot))
    await asyncio.sleep(0.1)  # let the event stream carry it
    await server.close()
    await server.processes.stop_all(grace=10.0)
    if dialer is not None:
        dialer.cancel()
    power_off(reboot=reboot, sandbox=settings.sandbox)


def power_off(reboot: bool, sandbox: bool) -> None:
    """Sync, unmount what can be, and power off or reboot; never return (a PID 1 must not exit)."""
    from . import libc

    os.sync()
    try:
        points = [m[2] for m in rootfs.mountinfo()]
    except OSError:
        points = []
    for point in reversed(points):
        if point in ("/", "/proc", "/sys", "/dev"):
            continue
        try:
            libc.umount2(point, libc.MNT_DETACH)
        except OSError:
            pass
    os.sync()
    log.info("%s", "rebooting" if reboot else "powering off")
    if os.getpid() != 1:
        sys.exit(0)
    if sandbox:
        os._exit(0)  # no machine to power off: PID 1 ending ends the sandbox's namespaces
    try:
        libc.reboot(libc.RB_AUTOBOOT if reboot else libc.RB_POWER_OFF)
    except OSError as exc:
        log.critical("reboot(2) failed: %s", exc.strerror)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
