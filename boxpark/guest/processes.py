"""Process calls of the Guest API: exec (unary or interactive), launch, attach, wait, signal, list.

Every child is spawned and reaped by the one `Supervisor` (pidfds; see `supervisor`). A child always gets
a new session and process group, so a timeout or a hang-up reaches its descendants too. Names are one
namespace shared by launched services (kept, with their logs, after they exit, until replaced) and named
interactive processes (addressable only while they run). This module holds the names and the checks;
each kind of call runs in the module of its concern: a unary exec in `capture`, an interactive one in
`sessions`, a service's output in `services`, and the pipes between them and us in `pipes`.

Only a launched service outlives its connection: when a unary exec's client goes away (the connection's
EOF) its process group is killed, as on its timeout; an interactive one's gets SIGHUP, as on a terminal
hang-up. What a client names is bounded here: a unary exec's captured output (`capture.OUTPUT_CAP`), a
service's ring (`protocol.MAX_RING_RECORDS`, `MAX_RING_BYTES`: refused above them, never clamped), and
timeouts (finite, not negative).

Replace semantics: `Launch` of a name whose process still runs is ALREADY_EXISTS; one whose process has
exited is ALREADY_EXISTS too unless `replace=True`, which discards the old process's log ring (so a host
that still wants those logs reads them first; an automatic replace would lose them silently).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal as signals
import time
from typing import Any, Callable, Literal

from .. import protocol
from ..protocol import ErrorCode, Exit, Message
from ..transport import Channel
from . import capture, cgroups, logs, tty
from .errors import GuestError, from_oserror
from .pipes import CLOSED, EXIT_GRACE, Pipes
from .services import PIPE_SIZE, ServiceOutput
from .sessions import Session
from .supervisor import Process, Supervisor


class _Named:
    """A named process: a launched service (with its log ring) or a named interactive process."""

    __slots__ = ("name", "kind", "child", "argv", "started_ns", "ring", "done")

    def __init__(self, name: str, kind: Literal["service", "interactive"], child: Process,
                 ring: logs.LogRing | None) -> None:
        self.name = name
        self.kind = kind
        self.child = child
        self.argv = child.argv
        self.started_ns = time.time_ns()
        self.ring = ring
        self.done: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()

    def info(self) -> protocol.ProcessInfo:
        child = self.child
        return protocol.ProcessInfo(name=self.name, pid=child.pid, argv=self.argv, kind=self.kind,
                                    running=child.running, code=child.code, signal=child.signal,
                                    started_ns=self.started_ns,
                                    last_seq=self.ring.last_seq if self.ring is not None else 0)


class Processes:
    """The process calls, over one `Supervisor`; `events` receives `ProcessExited` for launched services."""

    def __init__(self, events: Any) -> None:
        self.events = events
        self.supervisor = Supervisor()
        self._named: dict[str, _Named] = {}

    # ------------------------------------------------------------------------------------- exec

    async def exec(self, channel: Channel, message: protocol.Exec) -> Message | None:
        """Interactive: `Started`, then the stream. (The server runs a unary exec itself: `start_exec`.)"""
        if not message.interactive:
            raise GuestError(ErrorCode.INTERNAL, "a unary exec is started with start_exec, not as a task")
        _check_argv(message.argv)
        _check_timeout(message.timeout)
        return await self._interactive(channel, message)

    def start_exec(self, message: protocol.Exec,
                   finish: Callable[[protocol.ExecResult], None]) -> capture.Unary:
        """Start a unary exec that calls `finish(result)` at its end (the server's way: no task per call);
        raise `GuestError` if it cannot start."""
        _check_argv(message.argv)
        _check_timeout(message.timeout)
        _check_unary(message)
        return capture.Unary(message, self._spawn, finish)

    async def _interactive(self, channel: Channel, message: protocol.Exec) -> None:
        name = message.name
        if name is not None:
            self._check_free(name)
        pipes = Pipes()
        master = CLOSED
        try:
            if message.tty:
                master, slave = tty.open_pty(message.rows, message.cols)
                pipes.ours.append(master)
                pipes.child_ends.append(slave)
                child = self._spawn(message.argv, message.env, message.cwd, stdin=slave, stdout=slave,
                                    stderr=slave, preexec_fn=tty.take_controlling_terminal)
                outputs = [(master, 1)]
                stdin_fd = master
            else:
                stdin = pipes.to_child()
                out = pipes.from_child()
                err = pipes.from_child()
                child = self._spawn(message.argv, message.env, message.cwd, stdin=stdin, stdout=out, stderr=err)
                outputs = [(pipes.ours[1], 1), (pipes.ours[2], 2)]
                stdin_fd = pipes.ours[0]
        except BaseException:
            pipes.close_all()
            raise
        pipes.close_child_ends()
        if name is not None:
            self._register(_Named(name, "interactive", child, None), forget_at_exit=True)
        session = Session(channel, child, outputs, stdin_fd, master)
        channel.send(protocol.Started(pid=child.pid))
        try:
            if message.stdin:
                session.stdin.write(message.stdin)
            await session.run()
        finally:
            session.close()
        return None

    # ------------------------------------------------------------------------------ services

    async def launch(self, channel: Channel, message: protocol.Launch) -> Message | None:
        """Start a named service that outlives this connection; with `connect`, follow its logs."""
        _check_name(message.name)
        _check_argv(message.argv)
        _check_ring(message.ring_records, message.ring_bytes)
        old = self._named.get(message.name)
        if old is not None:
            if old.kind != "service" or old.child.running:
                raise GuestError(ErrorCode.ALREADY_EXISTS, f"a process named {message.name!r} is running "
                                 f"(pid {old.child.pid})")
            if not message.replace:
                raise GuestError(ErrorCode.ALREADY_EXISTS,
                                 f"{message.name!r} has exited ({_describe(old.child)}); launch it with replace "
                                 f"to start it again (its logs will be discarded)")
            await old.done  # its output is being collected: at most EXIT_GRACE after its exit
            if self._named.get(message.name) is not old:
                raise GuestError(ErrorCode.ALREADY_EXISTS, f"{message.name!r} was launched again meanwhile")
        env = dict(os.environ if message.env is None else message.env)
        if message.notify_socket:
            env["NOTIFY_SOCKET"] = message.notify_socket
        pipes = Pipes()
        group = None
        try:
            out = pipes.from_child(PIPE_SIZE)
            err = pipes.from_child(PIPE_SIZE)
            group = cgroups.make(message.name)
            extra = {"preexec_fn": lambda: cgroups.enter(group)} if group else {}
            child = self._spawn(message.argv, env, message.cwd, stdout=out, stderr=err, **extra)
        except BaseException:
            pipes.close_all()
            if group is not None:
                os.rmdir(group)
            raise
        pipes.close_child_ends()
        if group is not None:  # what the service leaves behind goes with it
            child.exited.add_done_callback(lambda _: cgroups.kill(group))
        ring = logs.LogRing(message.ring_records, message.ring_bytes)
        named = _Named(message.name, "service", child, ring)
        self._register(named, forget_at_exit=False)
        ServiceOutput(named.name, child, ring, named.done, pipes.ours[0], pipes.ours[1], self.events)
        if not message.connect:
            return protocol.Launched(name=message.name, pid=child.pid)
        channel.send(protocol.Launched(name=message.name, pid=child.pid))
        await logs.follow(channel, ring, message.name, 0, True)
        return None

    async def attach(self, channel: Channel, message: protocol.Attach) -> None:
        """`Ok`, then the service's records after `since`, then its `Exit` (or `EndOfStream`)."""
        named = self._lookup(message.name)
        if named.ring is None:
            raise GuestError(ErrorCode.INVALID_ARGUMENT, f"{message.name!r} is interactive: it has no log to attach to")
        if message.since < 0:
            raise GuestError(ErrorCode.INVALID_ARGUMENT, f"since must not be negative (got {message.since})")
        channel.send(protocol.Ok())
        await logs.follow(channel, named.ring, message.name, message.since, message.follow)
        return None

    async def wait(self, channel: Channel, message: protocol.Wait) -> Exit:
        """The service's `Exit` once it has one; TIMEOUT after `timeout`; the call ends if the client goes."""
        _check_timeout(message.timeout)
        named = self._lookup(message.name)
        gone = asyncio.ensure_future(channel.wait_eof())
        try:
            await asyncio.wait([named.done, gone], timeout=message.timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if named.done.done():
            return named.done.result()
        if gone.done() and not gone.cancelled():
            raise GuestError(ErrorCode.UNAVAILABLE, "the client closed the connection during the wait")
        raise GuestError(ErrorCode.TIMEOUT, f"{message.name!r} is still running after {message.timeout} s")

    async def signal(self, channel: Channel, message: protocol.Signal) -> protocol.Ok:
        named = self._lookup(message.name)
        if not 0 <= message.signal < signals.NSIG:
            raise GuestError(ErrorCode.INVALID_ARGUMENT, f"{message.signal} is not a signal number")
        if not named.child.send_signal(message.signal, group=message.group):
            raise GuestError(ErrorCode.UNAVAILABLE, f"{message.name!r} is not running ({_describe(named.child)})")
        return protocol.Ok()

    async def list(self, channel: Channel, message: protocol.ListProcesses) -> protocol.ProcessList:
        return protocol.ProcessList(processes=[named.info() for named in self._named.values()])

    async def stop_all(self, grace: float) -> None:
        """SIGTERM every running child (and its group), SIGKILL after `grace`, wait until all are reaped and
        the services' output is in."""
        await self.supervisor.stop_all(grace)
        pending = [named.done for named in self._named.values() if not named.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=EXIT_GRACE + 1.0)

    # ------------------------------------------------------------------------------ helpers

    def _spawn(self, argv: list[str], env: Any, cwd: str | None, **fds: Any) -> Process:
        try:
            return self.supervisor.spawn(argv, env=env, cwd=cwd, **fds)
        except OSError as exc:
            raise _spawn_error(exc, argv, cwd) from None
        except ValueError as exc:  # a NUL byte in argv, env or cwd
            raise GuestError(ErrorCode.INVALID_ARGUMENT, f"cannot start {argv[0]!r}: {exc}") from None

    def _check_free(self, name: str) -> None:
        _check_name(name)
        old = self._named.get(name)
        if old is not None and (old.child.running or old.kind == "service"):
            raise GuestError(ErrorCode.ALREADY_EXISTS, f"the name {name!r} is taken by a {old.kind} "
                             f"({'running' if old.child.running else _describe(old.child)})")

    def _register(self, named: _Named, forget_at_exit: bool) -> None:
        self._named[named.name] = named
        if forget_at_exit:
            def exited(future: asyncio.Future[tuple[int | None, int | None]]) -> None:
                code, signum = future.result()
                if not named.done.done():
                    named.done.set_result(Exit(code=code, signal=signum))
                if self._named.get(named.name) is named:
                    del self._named[named.name]

            named.child.exited.add_done_callback(exited)

    def _lookup(self, name: str) -> _Named:
        named = self._named.get(name)
        if named is None:
            raise GuestError(ErrorCode.NOT_FOUND, f"no process named {name!r}")
        return named


# ------------------------------------------------------------------------------------ checks


def _check_argv(argv: list[str]) -> None:
    if not argv:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, "argv is empty: give the program and its arguments as a list")
    if not argv[0]:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, "argv[0] is empty: name the program to run")


def _check_unary(message: protocol.Exec) -> None:
    if message.name is not None:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, "only an interactive exec takes a name")
    if message.tty:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, "a tty needs an interactive exec")


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
        raise GuestError(ErrorCode.INVALID_ARGUMENT, f"timeout must be a finite number of seconds, 0 or more "
                         f"(got {timeout}); leave it out for no limit")


def _check_ring(records: int, nbytes: int) -> None:
    for field, value, limit in (("ring_records", records, protocol.MAX_RING_RECORDS),
                                ("ring_bytes", nbytes, protocol.MAX_RING_BYTES)):
        if not 1 <= value <= limit:
            raise GuestError(ErrorCode.INVALID_ARGUMENT,
                             f"{field} must be from 1 to this server's limit of {limit} (got {value})")


def _check_name(name: str) -> None:
    if not name or len(name) > 255 or any(c in name for c in "\0/\n"):
        raise GuestError(ErrorCode.INVALID_ARGUMENT,
                         f"{name!r} is not a valid process name (1 to 255 characters, no '/', newline or NUL)")


def _describe(child: Process) -> str:
    if child.running:
        return "running"
    if child.signal is not None:
        try:
            return f"killed by {signals.Signals(child.signal).name}"
        except ValueError:
            return f"killed by signal {child.signal}"
    return f"exit code {child.code}"


def _spawn_error(exc: OSError, argv: list[str], cwd: str | None) -> GuestError:
    """A sentence naming what could not be started and why: the program or the working directory."""
    if cwd and exc.filename == cwd:
        what = f"the working directory {cwd!r}"
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            return GuestError(ErrorCode.NOT_FOUND, f"cannot start {argv[0]!r}: {what} does not exist "
                              f"or is not a directory")
    else:
        what = f"the program {argv[0]!r}"
        if isinstance(exc, FileNotFoundError):
            return GuestError(ErrorCode.NOT_FOUND, f"cannot start {argv[0]!r}: no such program "
                              f"(not found{'' if '/' in argv[0] else ' on PATH'})")
    if isinstance(exc, PermissionError):
        return GuestError(ErrorCode.PERMISSION_DENIED, f"cannot start {argv[0]!r}: permission denied on {what}")
    return from_oserror(exc, f"cannot start {argv[0]!r} ({what})")
