"""The soak: a sandbox machine under mixed load for a while (10 minutes by default), and what it leaves.

A real `boxpark up` (backend sandbox, its own BOXPARK_HOME and name: `_report.sandbox_machine`) runs, all
at once and each bounded in count and pace: `docker run --rm` loops; bursts of 500 connections to a
published port and to the Guest Proxy's docker.sock; storms of `boxpark exec`; a log flood (a service
running `seq`, its lines followed and checked at the host: every batch continues the last, `dropped`
counts what the ring let go, anything else missing is lost); dockerd SIGKILLed every 2 minutes; the agent
SIGKILLed once, early, then `up` again. All the while a separate process calls `info` every 100 ms on one
connection through the machine's api.sock (the agent's forward to the guest's own server): a stalled
PID 1 loop shows as a slow or failed probe. A second one calls it alike on the guest's own API socket
(the sandbox's backend/api.sock, not through the agent): what the two have apart is the agent's forward.

Timeline: warm-up (the agent kill and the second `up`, until every load ran again; a dockerd kill, until
every load ran again: the baseline comes after what the rest does to the new agent), a pause
long enough for idle relay threads to exit (`relay.IDLE_SECONDS`), the baseline (fds, threads, RSS of
the agent and the guest's init), the rest of the load, a wait (with a deadline) for both processes to
settle, the end figures. Traffic goes to loopback only; everything started is stopped by PID and the
machine goes down.

Figures (JSON lines, `_report.figure`): probe p50/p99/max (goals p99 <= 50 ms, max <= 1 s) and failures
outside the agent-kill window, the direct probe's (the guest alone), beside the same figures of a
reference (`REFERENCE`: an asyncio echo server probed alike, so what CPU contention alone costs on this
machine shows); agent and init fds/threads (end vs baseline, goal within 5%) and RSS (goal
growth <= 10%), and alike the agent's relay process (`relay.Handoff`: the api.sock forward's bytes); lines
lost within ring bounds (goal 0); docker working at the end (goal 1).
Run: `python -m bench soak` (BOXPARK_SOAK_SECONDS=N to shorten) or `python bench/soak.py --duration N`.
`run()` is what tests/sandbox/test_soak.py calls for its short run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._report import boxpark, figure, guest_init_pid, machine_api, sandbox_machine, stop_process  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_SECONDS = 600.0
IMAGE = "soak-bb"
PORT = 18097
BURST = 500
FLOOD_LINES = 200_000
PROBE_EVERY = 0.1
DOCKERD_KILL_EVERY = 120.0

PROBE = """
import asyncio, sys, time
from boxpark.host.client import GuestClient
address, out = sys.argv[1], sys.argv[2]
secret = open(sys.argv[3], "rb").read().strip() if len(sys.argv) > 3 else None
async def main():
    client = None
    following = time.monotonic()
    with open(out, "a", buffering=1) as log:
        while True:
            start = time.monotonic()
            try:
                if client is None:
                    client = await asyncio.wait_for(GuestClient.open(address, secret=secret), 10)
                    start = time.monotonic()  # the call is timed, not the (re)connection
                await asyncio.wait_for(client.info(), 10)
                log.write(f"{start:.6f} {(time.monotonic() - start) * 1000:.3f} ok\\n")
            except Exception as exc:
                log.write(f"{start:.6f} {(time.monotonic() - start) * 1000:.3f} {type(exc).__name__}\\n")
                if client is not None:
                    await client.close()
                client = None
            following = max(following + %(every)r, time.monotonic() - 1)
            await asyncio.sleep(max(0.0, following - time.monotonic()))
asyncio.run(main())
""" % {"every": PROBE_EVERY}

REFERENCE = """
import asyncio, ctypes, os, signal, socket, sys, time
path, out = sys.argv[1], sys.argv[2]
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen()
if os.fork() == 0:  # the server, in a process of its own like the init: it dies with the probe
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    async def echo(reader, writer):
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    async def serve():
        server = await asyncio.start_unix_server(echo, sock=listener)
        await server.serve_forever()
    asyncio.run(serve())
async def main():
    reader, writer = await asyncio.open_unix_connection(path)
    following = time.monotonic()
    with open(out, "a", buffering=1) as log:
        while True:
            start = time.monotonic()
            writer.write(b"info\\n")
            await reader.readline()
            log.write(f"{start:.6f} {(time.monotonic() - start) * 1000:.3f} ok\\n")
            following = max(following + %(every)r, time.monotonic() - 1)
            await asyncio.sleep(max(0.0, following - time.monotonic()))
asyncio.run(main())
""" % {"every": PROBE_EVERY}
"""The reference: a trivial asyncio echo server (a process of its own) probed the same way, in the same run.
Its tail is what CPU contention alone costs here; what the `info` probe has beyond it is the machine's."""


@dataclasses.dataclass
class Usage:
    """One process's footprint."""

    fds: int
    pipes: int
    threads: int
    rss_kb: int

    @classmethod
    def of(cls, pid: int) -> Usage:
        fds = pipes = 0
        for entry in os.listdir(f"/proc/{pid}/fd"):
            fds += 1
            with contextlib.suppress(OSError):
                pipes += os.readlink(f"/proc/{pid}/fd/{entry}").startswith("pipe:")
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        return cls(fds, pipes, len(os.listdir(f"/proc/{pid}/task")), rss)

    def within(self, baseline: Usage, tolerance: float, slack: int = 0) -> bool:
        """fds and threads no more than `tolerance` (a fraction) above the baseline, plus `slack`."""
        return (self.fds <= baseline.fds * (1 + tolerance) + slack
                and self.threads <= baseline.threads * (1 + tolerance) + slack)


@dataclasses.dataclass
class Tally:
    """What one load did: units that went through, units that failed (when, and why)."""

    ok: int = 0
    failures: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # (monotonic, why)
    since_up: int = 0  # units done since the warm-up's last kill: the warm-up waits for one of each

    def record(self, ok: bool, error: str = "") -> None:
        if ok:
            self.ok += 1
            self.since_up += 1
        else:
            self.failures.append((time.monotonic(), error[-300:]))

    def outside(self, windows: list[tuple[float, float]]) -> list[str]:
        """The failures that started outside `windows`."""
        return [why for at, why in self.failures if not any(start <= at <= end for start, end in windows)]


@dataclasses.dataclass
class Result:
    duration: float
    probe_ms: list[float]  # every answered probe outside the agent-kill window
    probe_failures: list[str]  # probes outside that window that got no answer: "time reason"
    reference_ms: list[float]  # the reference probe (REFERENCE) over the same time
    direct_ms: list[float]  # the probe on the guest's own API socket (not through the agent), alike
    baseline: dict[str, Usage]
    end: dict[str, Usage]
    middle: dict[str, Usage]  # halfway through the load after the baseline: growth after it is not warm-up
    settled: bool  # both came back within the tolerance of the baseline before the deadline
    lines: int
    dropped: int  # what the ring reported dropped (within bounds)
    lost: int  # lines missing and not reported dropped, or not what seq printed
    docker_working: bool
    tallies: dict[str, Tally]
    agent_window: list[tuple[float, float]]  # from the agent's SIGKILL to just after `up` returned
    dockerd_windows: list[tuple[float, float]]
    logs: str

    def summary(self) -> str:
        """What a failed test prints: everything but the probe's samples, then the machine's logs."""
        tallies = {name: (t.ok, len(t.failures), t.failures[-1:]) for name, t in self.tallies.items()}
        return (f"probes answered {len(self.probe_ms)}, failed {self.probe_failures[:5]}; lines {self.lines}, "
                f"dropped {self.dropped}, lost {self.lost}; docker working {self.docker_working}\n"
                f"baseline {self.baseline}\nend {self.end} (settled {self.settled})\nloads {tallies}\n{self.logs}")

    def percentile(self, fraction: float, samples: list[float] | None = None) -> float:
        ordered = sorted(self.probe_ms if samples is None else samples)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


class Soak:
    """The loads and the schedule, on one machine."""

    def __init__(self, machine: Path, work: Path) -> None:
        self.machine = machine
        self.home = machine.parent
        self.work = work
        self.docker = ["docker", "-H", f"unix://{machine}/docker.sock"]
        self.api = f"unix:{machine}/api.sock"
        self.running = threading.Event()  # loads run while set, pause while clear
        self.stopping = threading.Event()
        self.busy: dict[str, bool] = {}
        self.tallies: dict[str, Tally] = {}
        self.lines = self.dropped = self.lost = 0
        self.threads: list[threading.Thread] = []
        self.agent_window: list[tuple[float, float]] = []
        self.dockerd_windows: list[tuple[float, float]] = []  # from each SIGKILL until docker answers again

    # ------------------------------------------------------------------------------ the machine

    def agent_pid(self) -> int:
        return int((self.machine / "agent.pid").read_text().split()[0])

    def usage(self) -> dict[str, Usage]:
        agent = self.agent_pid()
        usage = {"agent": Usage.of(agent), "init": Usage.of(guest_init_pid(self.machine))}
        relay = _relay_process(agent)
        if relay is not None:  # the api.sock forward's relay process (`relay.Handoff`): counted on its own
            usage["relay"] = Usage.of(relay)
        return usage

    def run_docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.docker, *args], capture_output=True, text=True, timeout=timeout)

    def prepare(self) -> None:
        """The image (busybox and a page to serve) and the published server, unless they are there."""
        if self.run_docker("image", "inspect", IMAGE).returncode != 0:
            root = self.work / "rootfs"
            shutil.rmtree(root, ignore_errors=True)
            (root / "bin").mkdir(parents=True)
            (root / "www").mkdir()
            (root / "www" / "index.html").write_text("soak\n")
            shutil.copy("/bin/busybox", root / "bin" / "busybox")
            for applet in ("sh", "echo", "seq", "httpd", "true"):
                (root / "bin" / applet).symlink_to("busybox")
            subprocess.run(["tar", "-C", str(root), "-cf", str(self.work / "bb.tar"), "."], check=True)
            imported = self.run_docker("import", str(self.work / "bb.tar"), IMAGE)
            if imported.returncode != 0:
                raise RuntimeError(f"docker import failed: {imported.stderr.strip()}")
        if self.run_docker("network", "inspect", "soak").returncode != 0:
            self.run_docker("network", "create", "soak")  # the sandbox's dockerd has no default bridge
        if self.run_docker("inspect", "soak-http").returncode != 0:
            started = self.run_docker("run", "-d", "--name", "soak-http", "--restart", "always", "--pull", "never",
                                      "--network", "soak", "-p", f"{PORT}:9000", IMAGE,
                                      "httpd", "-f", "-p", "9000", "-h", "/www")
            if started.returncode != 0:
                raise RuntimeError(f"the published server did not start: {started.stderr.strip()}")

    def up_again(self) -> None:
        up = boxpark(self.home, "up", "--name", self.machine.name, "--config", str(self.home / "boxpark.toml"),
                     "--no-context")
        if up.returncode != 0:
            raise RuntimeError(f"up after the agent was killed failed: {up.stderr.strip()}")

    def kill_agent(self) -> None:
        """SIGKILL the agent, then `up` again; the probe's failures in between do not count."""
        pid = self.agent_pid()
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.up_again()
        self.prepare()
        self.agent_window.append((start, time.monotonic() + 2))
        for tally in self.tallies.values():
            tally.since_up = 0

    def kill_dockerd(self) -> None:
        async def kill() -> None:
            from boxpark.host.client import GuestClient

            async with await GuestClient.open(self.api) as client:
                await client.signal("dockerd", signal.SIGKILL)

        start = time.monotonic()
        try:
            asyncio.run(kill())
        except Exception as exc:  # the soak goes on; the figures will show what it cost
            _say(f"dockerd kill failed: {exc}")
            return
        deadline = start + 180
        while self.run_docker("version", timeout=30).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        self.dockerd_windows.append((start, time.monotonic() + 2))
        _say(f"dockerd SIGKILLed; docker answered again after {time.monotonic() - start:.1f} s")

    # ---------------------------------------------------------------------------------- loads

    def load(self, name: str, unit: Callable[[], None], every: float, offset: float = 0.0) -> None:
        """Run `unit` every `every` seconds while the loads run; a unit that raises counts as failed."""
        tally = self.tallies[name] = Tally()
        self.busy[name] = False

        def loop() -> None:
            next_at = time.monotonic() + offset
            while not self.stopping.wait(max(0.0, next_at - time.monotonic())):
                if not self.running.is_set():  # a slot that falls in a pause is skipped: after it the loads
                    next_at += every  # keep their phases instead of all starting at once (the two bursts
                    continue  # together: twice the warm-up's peak of relay threads)
                self.busy[name] = True
                try:
                    unit()
                    tally.record(True)
                except Exception as exc:
                    tally.record(False, f"{type(exc).__name__}: {exc}")
                finally:
                    self.busy[name] = False
                next_at = max(next_at + every, time.monotonic())  # one that overran starts the next at once

        thread = threading.Thread(target=loop, name=f"soak-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def docker_run(self) -> None:
        result = self.run_docker("run", "--rm", "--pull", "never", IMAGE, "echo", "soak")
        if result.returncode != 0 or result.stdout != "soak\n":
            raise RuntimeError(result.stderr.strip() or result.stdout)

    def port_burst(self) -> None:
        async def one() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
            writer.write(b"GET /index.html HTTP/1.0\r\n\r\n")
            data = await reader.read()
            writer.close()
            return data

        self._burst(one, b"\r\n\r\nsoak\n")

    def socket_burst(self) -> None:
        async def one() -> bytes:
            reader, writer = await asyncio.open_unix_connection(str(self.machine / "docker.sock"))
            writer.write(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
            data = await reader.read()
            writer.close()
            return data

        self._burst(one, b"\r\n\r\nOK")

    def _burst(self, one: Callable[[], object], ending: bytes) -> None:
        """`BURST` connections at once; raises with how many failed, if any did."""
        async def all_of() -> list[object]:
            return await asyncio.gather(*(asyncio.wait_for(one(), 60) for _ in range(BURST)),  # type: ignore
                                        return_exceptions=True)

        results = asyncio.run(all_of())
        bad = [r for r in results if not (isinstance(r, bytes) and r.endswith(ending))]
        if bad:
            raise RuntimeError(f"{len(bad)} of {BURST} connections failed, e.g. {bad[0]!r:.200}")

    def exec_storm(self) -> None:
        """20 `boxpark exec`, 4 at a time."""
        def one(i: int) -> str | None:
            result = boxpark(self.home, "exec", "--name", self.machine.name, "--", "sh", "-c", f"echo {i}")
            return None if (result.returncode, result.stdout) == (0, f"{i}\n") else result.stderr.strip()

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            errors = [e for e in pool.map(one, range(20)) if e is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} of 20 execs failed, e.g. {errors[0]}")

    def log_flood(self) -> None:
        """A service prints FLOOD_LINES numbered lines; the host checks every batch continues the last."""
        from boxpark import protocol
        from boxpark.host.client import GuestClient

        async def flood() -> tuple[int, int, int]:
            async with await GuestClient.open(self.api) as client:
                stream = await client.launch_connect("soak-flood", ["seq", "1", str(FLOOD_LINES)], replace=True)
                received = dropped = wrong = 0
                offset = previous = None  # a line's number minus its record's seq: the same for all
                async for frame in stream:
                    if isinstance(frame, protocol.LogBatch):
                        dropped += frame.dropped
                        received += len(frame.records)
                        for record in frame.records:
                            number = int(record.data) if record.data.isdigit() else -1
                            offset = number - record.seq if offset is None else offset
                            if number - record.seq != offset or (previous is not None and record.seq <= previous):
                                wrong += 1
                            previous = record.seq
                    elif isinstance(frame, protocol.Exit) and frame.code != 0:
                        raise RuntimeError(f"seq ended with {frame}")
                return received, dropped, max(0, FLOOD_LINES - received - dropped) + wrong

        received, dropped, lost = asyncio.run(asyncio.wait_for(flood(), 300))
        self.lines += received + dropped
        self.dropped += dropped
        self.lost += lost

    def start_loads(self) -> None:
        self.load("docker_run", self.docker_run, every=2.0)
        self.load("port_burst", self.port_burst, every=20.0, offset=1.0)
        self.load("socket_burst", self.socket_burst, every=20.0, offset=11.0)
        self.load("exec_storm", self.exec_storm, every=30.0, offset=5.0)
        self.load("log_flood", self.log_flood, every=15.0, offset=3.0)

    def pause(self) -> None:
        """Stop the loads between units and wait for the units under way."""
        self.running.clear()
        deadline = time.monotonic() + 600
        while any(self.busy.values()) and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        self.running.clear()
        self.stopping.set()
        for thread in self.threads:
            thread.join(600)


def _relay_process(agent: int) -> int | None:
    """The agent's child that runs `python -m boxpark.relay`, if it has one."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == agent and \
                    b"boxpark.relay" in Path(f"/proc/{entry}/cmdline").read_bytes():
                return int(entry)
        except (OSError, ValueError, IndexError):
            continue
    return None


def _probe_results(path: Path, windows: list[tuple[float, float]]) -> tuple[list[float], list[str]]:
    answered, failures = [], []
    for line in path.read_text().splitlines():
        at, ms, outcome = line.split()
        if any(start <= float(at) <= end for start, end in windows):
            continue
        if outcome == "ok":
            answered.append(float(ms))
        else:
            failures.append(f"{float(at):.1f} {outcome} after {float(ms):.0f} ms")
    return answered, failures


@contextlib.contextmanager
def _probe(script: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.DEVNULL, env=env)
    try:
        yield process
    finally:
        stop_process(process)


def _logs(machine: Path) -> str:
    parts = []
    for name in ("agent.log", "init.log", "docker.log"):
        with contextlib.suppress(OSError):
            parts.append(f"--- {name}\n" + "\n".join((machine / name).read_text(errors="replace").splitlines()[-30:]))
    return "\n".join(parts)


def _say(text: str) -> None:
    print(f"   {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def run(duration: float = DEFAULT_SECONDS, *, dockerd_kill_every: float = DOCKERD_KILL_EVERY,
        tolerance: float = 0.05, slack: int = 0) -> Result:
    """The soak on a fresh sandbox machine: `duration` seconds of load (warm-up included), then the
    settle; the machine is down and gone when this returns. Settled means fds and threads of both
    processes no more than `tolerance` (+ `slack`) above the baseline."""
    from boxpark import relay

    work = Path(tempfile.mkdtemp(prefix="bps", dir="/tmp"))
    try:
        with sandbox_machine() as machine:
            soak = Soak(machine, work)
            try:
                soak.prepare()
                _, secret = machine_api(machine)
                (work / "secret").write_bytes(secret or b"")
                keys = [str(work / "secret")] if secret else []
                with _probe(PROBE, f"unix:{machine}/api.sock", str(work / "probe.log"), *keys), \
                        _probe(PROBE, f"unix:{machine}/backend/api.sock", str(work / "direct.log"), *keys), \
                        _probe(REFERENCE, str(work / "reference.sock"), str(work / "reference.log")):
                    result = _schedule(soak, duration, dockerd_kill_every, tolerance, slack, relay.IDLE_SECONDS)
                    docker_working = soak.run_docker("run", "--rm", "--pull", "never", IMAGE, "echo",
                                                     "soak").stdout == "soak\n"
                answered, failures = _probe_results(work / "probe.log", soak.agent_window)
                reference, _ = _probe_results(work / "reference.log", soak.agent_window)
                direct, _ = _probe_results(work / "direct.log", soak.agent_window)
                return Result(duration=duration, probe_ms=answered, probe_failures=failures, reference_ms=reference,
                              direct_ms=direct,
                              docker_working=docker_working, lines=soak.lines, dropped=soak.dropped,
                              lost=soak.lost, tallies=soak.tallies, agent_window=soak.agent_window,
                              dockerd_windows=soak.dockerd_windows,
                              logs=_logs(machine), **result)
            finally:
                soak.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wait_for_every_load(soak: Soak, until: float) -> None:
    """Until `until` and until every load got through once since its `since_up` was reset (a deadline)."""
    deadline = time.monotonic() + 300
    while (time.monotonic() < until or any(t.since_up == 0 for t in soak.tallies.values())) \
            and time.monotonic() < deadline:
        time.sleep(0.5)


def _schedule(soak: Soak, duration: float, dockerd_kill_every: float, tolerance: float, slack: int,
              idle: float) -> dict[str, object]:
    start = time.monotonic()
    warmup = min(90.0, max(30.0, duration * 0.15))
    soak.running.set()
    soak.start_loads()
    time.sleep(warmup / 2)
    _say("agent SIGKILLed; up again")
    soak.kill_agent()
    _wait_for_every_load(soak, start + warmup / 2)
    soak.kill_dockerd()  # the new agent meets what the rest of the load does to it before the baseline
    for tally in soak.tallies.values():
        tally.since_up = 0
    _wait_for_every_load(soak, start + warmup)
    _say("warm-up done: " + ", ".join(f"{n} {t.ok} ok {len(t.failures)} failed" for n, t in soak.tallies.items()))
    _say(f"loads paused {idle + 10:.0f} s for idle relay threads to exit")
    soak.pause()
    time.sleep(idle + 10)
    baseline = soak.usage()
    _say(f"baseline {baseline}")
    soak.running.set()
    left = max(duration - (time.monotonic() - start) + idle + 10, 30.0)  # the pause is not load
    every = min(dockerd_kill_every, left / 2)  # a short run still kills it once
    end = time.monotonic() + left
    next_kill = time.monotonic() + every
    halfway = time.monotonic() + left / 2
    middle: dict[str, Usage] | None = None
    while time.monotonic() < end:
        if time.monotonic() >= next_kill and end - time.monotonic() > 5:
            soak.kill_dockerd()
            next_kill += every
        if middle is None and time.monotonic() >= halfway:
            middle = soak.usage()
            _say(f"halfway {middle}")
        time.sleep(0.5)
    _say("load done; waiting for the agent and init to settle")
    soak.stop()
    deadline = time.monotonic() + idle + 60
    while True:
        now = soak.usage()
        settled = all(now[k].within(baseline[k], tolerance, slack) for k in now if k in baseline)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(2)
    _say(f"end {now}")
    return {"baseline": baseline, "end": now, "middle": middle or now, "settled": settled}


def report(result: Result) -> None:
    for name, tally in result.tallies.items():
        outside = tally.outside(result.agent_window)
        elsewhere = tally.outside(result.agent_window + result.dockerd_windows)
        _say(f"{name}: {tally.ok} ok, {len(tally.failures)} failed: {len(outside)} outside the agent-kill window, "
             f"{len(elsewhere)} outside the dockerd-kill windows too{'; last: ' + elsewhere[-1] if elsewhere else ''}")
    _say(f"probes answered {len(result.probe_ms)}, failed {len(result.probe_failures)} "
         f"(outside the agent-kill window): {result.probe_failures[:5]}")
    figure("soak_probe_p50", result.percentile(0.5), "ms", None, "info every 100 ms")
    figure("soak_probe_p99", result.percentile(0.99), "ms", None, "<= 50 ms")
    figure("soak_probe_max", max(result.probe_ms, default=float("nan")), "ms", None, "<= 1000 ms")
    figure("soak_probe_failures", len(result.probe_failures), "probes", None, "0")
    figure("soak_direct_p50", result.percentile(0.5, result.direct_ms), "ms", None,
           "the same probe on the guest's own API socket, not through the agent")
    figure("soak_direct_p99", result.percentile(0.99, result.direct_ms), "ms", None, "idem")
    figure("soak_direct_max", max(result.direct_ms, default=float("nan")), "ms", None, "idem")
    figure("soak_reference_p50", result.percentile(0.5, result.reference_ms), "ms", None,
           "an asyncio echo server probed alike: CPU contention alone")
    figure("soak_reference_p99", result.percentile(0.99, result.reference_ms), "ms", None, "idem")
    figure("soak_reference_max", max(result.reference_ms, default=float("nan")), "ms", None, "idem")
    for who in ("agent", "init", "relay"):
        if who not in result.baseline or who not in result.end:
            continue
        before, after = result.baseline[who], result.end[who]
        figure(f"soak_{who}_fds", after.fds, "fds", before.fds, "ratio <= 1.05")
        figure(f"soak_{who}_pipe_fds", after.pipes, "fds", before.pipes, "ratio <= 1.05")
        figure(f"soak_{who}_threads", after.threads, "threads", before.threads, "ratio <= 1.05")
        figure(f"soak_{who}_rss", after.rss_kb / 1024, "MiB", before.rss_kb / 1024, "ratio <= 1.10")
        figure(f"soak_{who}_rss_second_half", after.rss_kb / 1024, "MiB",
               result.middle.get(who, after).rss_kb / 1024,
               "end vs halfway through the load (RSS taken under load: an upper bound): growth that goes on")
    figure("soak_lines_lost", result.lost, "lines", result.lines, "0 within ring bounds")
    figure("soak_lines_dropped", result.dropped, "lines", result.lines, "reported by the ring (not lost)")
    figure("soak_docker_working", float(result.docker_working), "bool", None, "1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float,
                        default=float(os.environ.get("BOXPARK_SOAK_SECONDS", DEFAULT_SECONDS)),
                        help="seconds of load, warm-up included (default 600, or BOXPARK_SOAK_SECONDS)")
    args = parser.parse_args(argv or [])
    if os.geteuid() != 0 or not shutil.which("docker") or not shutil.which("unshare"):
        print("soak: needs root, unshare and the docker CLI", file=sys.stderr)
        return
    result = run(args.duration)
    report(result)
    if not result.docker_working:
        print(result.logs, file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
