"""Process calls of the Guest API: exec (unary or interactive), launch, attach, wait, signal, list.

Every child is spawned and reaped by the one `Supervisor` (pidfds; see `supervisor`). A child always gets
a new session and process group, so a timeout or a hang-up reaches its descendants too. Names are one
namespace shared by launched services (kept, with their logs, after they exit, until replaced) and named
interactive processes (addressable only while they run).

Only a launched service outlives its connection: when a unary exec's client goes away (the connection's
EOF) its process group is killed, as on its timeout; an interactive one's gets SIGHUP, as on a terminal
hang-up. What a client names is bounded here: a unary exec's captured output (`OUTPUT_CAP`), a service's
ring (`protocol.MAX_RING_RECORDS`, `MAX_RING_BYTES`: refused above them, never clamped), and timeouts
(finite, not negative).

Output is collected until every writer has closed the pipe, but at most `EXIT_GRACE` seconds after the
main process exits: a daemon left behind holding the pipe does not hold up the call. What it writes later
is read and dropped (never EPIPE: we do not kill what we did not collect).

Replace semantics: `Launch` of a name whose process still runs is ALREADY_EXISTS; one whose process has
exited is ALREADY_EXISTS too unless `replace=True`, which discards the old process's log ring (so a host
that still wants those logs reads them first; an automatic replace would lose them silently).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import math
import os
import signal as signals
import termios
import time
from typing import Any, Callable, Literal

from .. import protocol
from ..protocol import ErrorCode, Exit, Message
from ..transport import Channel
from . import cgroups, logs, tty
from .errors import GuestError, from_oserror
from .supervisor import Child, Supervisor

EXIT_GRACE = 1.0
"""Seconds after the main process exits during which its output is still collected."""

OUTPUT_CAP = protocol.MAX_FRAME - 64 * 1024
"""Bytes of stdout plus stderr a unary exec returns; the rest is read and discarded (`truncated`)."""

CLOSE_LINGER = 2.0
"""After an interactive process's Exit, how long the server waits for the host to close the connection."""

STDIN_HIGH_WATER = 1024 * 1024
"""An interactive process's unwritten stdin past which the server stops reading the connection."""

PIPE_SIZE = 1024 * 1024
"""Pipe capacity asked for a service's stdout/stderr, so that bursts do not stall it while the loop is busy."""

_CLOSED = -1


class _Named:
    """A named process: a launched service (with its log ring) or a named interactive process."""

    __slots__ = ("name", "kind", "child", "argv", "started_ns", "ring", "done")

    def __init__(self, name: str, kind: Literal["service", "interactive"], child: Child,
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
        """Unary: run to the end and reply `ExecResult`. Interactive: `Started`, then the stream."""
        _check_argv(message.argv)
        _check_timeout(message.timeout)
        if message.interactive:
            return await self._interactive(channel, message)
        if message.name is not None:
            raise GuestError(ErrorCode.INVALID_ARGUMENT, "only an interactive exec takes a name")
        if message.tty:
            raise GuestError(ErrorCode.INVALID_ARGUMENT, "a tty needs an interactive exec")
        return await self._run(channel, message)

    async def _run(self, channel: Channel, message: protocol.Exec) -> protocol.ExecResult:
        loop = asyncio.get_running_loop()
        fds = _Fds()
        capture = _Capture(OUTPUT_CAP)
        eof = _Countdown(2)
        readers: list[logs.OutputReader] = []
        try:
            stdin = fds.pipe_to_child() if message.stdin else _devnull()
            # the readers are set up before the spawn: less to do while the child starts
            out = fds.pipe_from_child()
            readers.append(logs.OutputReader(fds.take(), capture.stdout, eof.tick))
            err = fds.pipe_from_child()
            readers.append(logs.OutputReader(fds.take(), capture.stderr, eof.tick))
            child = self._spawn(message.argv, message.env, message.cwd, stdin=stdin, stdout=out, stderr=err)
        except BaseException:
            for reader in readers:
                reader.close()
            fds.close_all()
            raise
        fds.close_child_ends()
        writer = _Writer(fds.ours[0], on_eof=None) if message.stdin else None
        if writer is not None:
            writer.write(message.stdin)
            writer.write_eof()
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = child.send_signal(signals.SIGKILL, group=True)  # False: it had just exited

        timer = loop.call_later(message.timeout, expire) if message.timeout is not None else None
        # Nobody is left to read the result of a call whose client went away: end it like a timeout.
        hang_up = loop.create_task(channel.wait_eof())
        hang_up.add_done_callback(lambda done: done.cancelled() or child.send_signal(signals.SIGKILL, group=True))
        try:
            code, signum = await child.exited
            await _collect(readers, eof.done)
        finally:
            hang_up.cancel()
            if timer is not None:
                timer.cancel()
            if writer is not None:
                writer.close()
            for reader in readers:
                reader.discard_rest()
            if child.running:  # the call was cancelled (server closing): leave nothing behind
                child.send_signal(signals.SIGKILL, group=True)
        stdout, stderr = capture.result()
        return protocol.ExecResult(code=code, signal=signum, stdout=stdout, stderr=stderr, timed_out=timed_out,
                                   truncated=capture.truncated)

    async def _interactive(self, channel: Channel, message: protocol.Exec) -> None:
        name = message.name
        if name is not None:
            self._check_free(name)
        fds = _Fds()
        master = _CLOSED
        try:
            if message.tty:
                master, slave = tty.open_pty(message.rows, message.cols)
                fds.ours.append(master)
                fds.child_ends.append(slave)
                child = self._spawn(message.argv, message.env, message.cwd, stdin=slave, stdout=slave,
                                    stderr=slave, preexec_fn=tty.take_controlling_terminal)
                outputs = [(master, 1)]
                stdin_fd = master
            else:
                stdin = fds.pipe_to_child()
                out = fds.pipe_from_child()
                err = fds.pipe_from_child()
                child = self._spawn(message.argv, message.env, message.cwd, stdin=stdin, stdout=out, stderr=err)
                outputs = [(fds.ours[1], 1), (fds.ours[2], 2)]
                stdin_fd = fds.ours[0]
        except BaseException:
            fds.close_all()
            raise
        fds.close_child_ends()
        if name is not None:
            self._register(_Named(name, "interactive", child, None), forget_at_exit=True)
        session = _Session(channel, child, outputs, stdin_fd, master)
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
        fds = _Fds()
        group = None
        try:
            out = fds.pipe_from_child(PIPE_SIZE)
            err = fds.pipe_from_child(PIPE_SIZE)
            group = cgroups.make(message.name)
            extra = {"preexec_fn": lambda: cgroups.enter(group)} if group else {}
            child = self._spawn(message.argv, env, message.cwd, stdout=out, stderr=err, **extra)
        except BaseException:
            fds.close_all()
            if group is not None:
                os.rmdir(group)
            raise
        fds.close_child_ends()
        if group is not None:  # what the service leaves behind goes with it
            child.exited.add_done_callback(lambda _: cgroups.kill(group))
        ring = logs.LogRing(message.ring_records, message.ring_bytes)
        named = _Named(message.name, "service", child, ring)
        self._register(named, forget_at_exit=False)
        _ServiceOutput(named, fds.ours[0], fds.ours[1], self.events)
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

    def _spawn(self, argv: list[str], env: Any, cwd: str | None, **fds: Any) -> Child:
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


# ------------------------------------------------------------------------------------ services


class _ServiceOutput:
    """Feeds a service's two pipes into its ring; when both are done (or EXIT_GRACE after the exit) it
    closes the ring with the `Exit`, completes `done` and emits `ProcessExited`."""

    def __init__(self, named: _Named, out: int, err: int, events: Any) -> None:
        assert named.ring is not None
        self.named = named
        self.ring = named.ring
        self.events = events
        self.open = 2
        self.finished = False
        self.streams: list[tuple[logs.OutputReader, Callable[[], None]]] = []
        for fd, number in ((out, 1), (err, 2)):
            splitter = logs.LineSplitter(number)
            eof = self._eof_of(splitter)
            self.streams.append((logs.OutputReader(fd, self._feeder(splitter), eof), eof))
        self._grace: asyncio.TimerHandle | None = None
        named.child.exited.add_done_callback(self._exited)

    def _feeder(self, splitter: logs.LineSplitter) -> Callable[[bytes], None]:
        ring = self.ring

        def feed(data: bytes) -> None:
            records, nbytes = splitter.feed(data, ring.next_seq, time.time_ns())
            if records:
                ring.append(records, nbytes)

        return feed

    def _eof_of(self, splitter: logs.LineSplitter) -> Callable[[], None]:
        def eof() -> None:  # the stream's last unterminated line goes in whole
            self.ring.append(splitter.close(self.ring.next_seq, time.time_ns()))
            self.open -= 1
            if self.open == 0 and not self.named.child.running:
                self._finish()

        return eof

    def _exited(self, future: asyncio.Future[tuple[int | None, int | None]]) -> None:
        if self.open == 0:
            self._finish()
        elif not self.finished:
            self._grace = asyncio.get_running_loop().call_later(EXIT_GRACE, self._give_up)

    def _give_up(self) -> None:
        for reader, eof in self.streams:
            reader.drain()  # calls eof itself if it meets the end
            if reader.open:
                reader.discard_rest()
                eof()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._grace is not None:
            self._grace.cancel()
        # The readers' callbacks point back here: breaking that cycle frees the ring the moment a replace
        # drops it, not at some later full collection.
        self.streams = []
        named, child = self.named, self.named.child
        exit = Exit(code=child.code, signal=child.signal)
        self.ring.finish(exit)
        if not named.done.done():
            named.done.set_result(exit)
        self.events.emit(protocol.ProcessExited(name=named.name, pid=child.pid, code=child.code,
                                                signal=child.signal))


# --------------------------------------------------------------------------------- interactive


class _Session:
    """One interactive process on its connection: frames in to stdin/resize/signal, output out, one Exit."""

    def __init__(self, channel: Channel, child: Child, outputs: list[tuple[int, int]], stdin: int,
                 master: int) -> None:
        self.channel = channel
        self.child = child
        self.master = master
        self.outputs = outputs
        self.stdin = _Writer(stdin, on_eof=self._veof if master != _CLOSED else None,
                             owns_fd=master == _CLOSED)
        self._fds = [fd for fd, _ in outputs]
        self.ended = False  # the Exit has been sent

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        pumps = [loop.create_task(self._pump(fd, number)) for fd, number in self.outputs]
        commands = loop.create_task(self._commands())
        try:
            code, signum = await self.child.exited
            done, pending = await asyncio.wait(pumps, timeout=EXIT_GRACE)
            for task in pending:
                task.cancel()
            for task in done:
                task.result()
            for fd, number in self.outputs:  # whatever is buffered now, after the grace
                self._send_buffered(fd, number)
            self.channel.send(Exit(code=code, signal=signum))
            await self.channel.drain()
            # Half-close and let the host close first: a host still writing (stdin, a resize) when the
            # connection is torn down would get EPIPE and could lose the unread Exit with it.
            self.ended = True
            self.channel.write_eof()
            await asyncio.wait([commands], timeout=CLOSE_LINGER)
        finally:  # no await here: this also runs when the server cancels the call on its way out
            for task in pumps:
                task.cancel()
            commands.cancel()

    async def _pump(self, fd: int, number: int) -> None:
        loop = asyncio.get_running_loop()
        channel = self.channel
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(fd, _set_none, ready)
                try:
                    await ready
                finally:
                    if fd in self._fds:  # else close() unregistered it, and the number may be reused
                        loop.remove_reader(fd)
                continue
            except OSError as exc:  # EIO: every holder of the pty's slave is gone
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                return
            channel.send(protocol.Output(fd=number, data=data))
            await channel.drain()

    def _send_buffered(self, fd: int, number: int) -> None:
        for _ in range(16):  # bounded: a writer left behind may never stop
            try:
                data = os.read(fd, 65536)
            except OSError:
                return
            if not data:
                return
            self.channel.send(protocol.Output(fd=number, data=data))

    async def _commands(self) -> None:
        channel, child = self.channel, self.child
        while True:
            try:
                message = await channel.recv()
            except protocol.ProtocolError as exc:
                channel.send(protocol.error(exc.code, str(exc)))
                message = None
            if message is None:
                if not self.ended:
                    self.hang_up()
                return
            if self.ended:
                continue  # the host had not seen the Exit yet
            if isinstance(message, protocol.Stdin):
                if message.data:
                    self.stdin.write(message.data)
                if message.eof:
                    self.stdin.write_eof()
                await self.stdin.drain(STDIN_HIGH_WATER)
            elif isinstance(message, protocol.ResizeTty):
                if self.master != _CLOSED:
                    tty.resize(self.master, message.rows, message.cols)
            elif isinstance(message, protocol.SendSignal):
                self._signal(message.signal)
            else:
                channel.send(protocol.error(ErrorCode.UNSUPPORTED, f"{type(message).__name__} is not valid "
                                            f"in an interactive session (Stdin, ResizeTty, SendSignal)"))

    def _signal(self, signum: int) -> None:
        if not 0 < signum < signals.NSIG:
            self.channel.send(protocol.error(ErrorCode.INVALID_ARGUMENT, f"{signum} is not a signal number"))
            return
        group = tty.foreground_group(self.master) if self.master != _CLOSED else None
        if group is not None and self.child.running:
            try:
                os.killpg(group, signum)
            except ProcessLookupError:
                pass
            return
        self.child.send_signal(signum)

    def _veof(self) -> bytes:
        try:
            return termios.tcgetattr(self.master)[6][termios.VEOF]  # type: ignore[no-any-return]
        except (OSError, termios.error):
            return b"\x04"

    def hang_up(self) -> None:
        """The connection is gone: the process (and its group) gets SIGHUP, as on a terminal hang-up."""
        self.child.send_signal(signals.SIGHUP, group=True)
        self.stdin.close()

    def close(self) -> None:
        """Close the pty master (a hang-up); pipes someone still holds are read to their end and dropped.

        Either way the fds leave `_fds` first, so that a pump still waiting on one does not touch it."""
        loop = asyncio.get_running_loop()
        self.stdin.close()
        fds, self._fds = self._fds, []
        for fd in fds:
            if fd == self.master:
                loop.remove_reader(fd)
                os.close(fd)
            else:
                logs.OutputReader(fd, _ignore, _nothing).discard_rest()
        if self.child.running:  # the connection went away (or the server is closing)
            self.child.send_signal(signals.SIGHUP, group=True)


def _ignore(data: bytes) -> None:
    pass


def _nothing() -> None:
    pass


def _set_none(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# ------------------------------------------------------------------------------- small pieces


class _Fds:
    """The pipe ends of one spawn: ours (non-blocking, kept) and the child's (closed once it has them)."""

    def __init__(self) -> None:
        self.ours: list[int] = []
        self.child_ends: list[int] = []

    def pipe_to_child(self) -> int:
        read, write = os.pipe2(os.O_CLOEXEC)
        self.child_ends.append(read)
        os.set_blocking(write, False)
        self.ours.append(write)
        return read

    def pipe_from_child(self, size: int = 0) -> int:
        read, write = os.pipe2(os.O_CLOEXEC)
        self.child_ends.append(write)
        os.set_blocking(read, False)
        self.ours.append(read)
        if size:
            try:
                fcntl.fcntl(read, fcntl.F_SETPIPE_SZ, size)
            except OSError:  # over /proc/sys/fs/pipe-max-size for an unprivileged server: keep the default
                pass
        return write

    def take(self) -> int:
        """Hand our newest end over to its new owner (who closes it)."""
        return self.ours.pop()

    def close_child_ends(self) -> None:
        for fd in self.child_ends:
            os.close(fd)
        self.child_ends = []

    def close_all(self) -> None:
        self.close_child_ends()
        for fd in self.ours:
            os.close(fd)
        self.ours = []


_DEVNULL = -1


def _devnull() -> int:
    """One /dev/null kept open for every exec without stdin (the child gets a copy)."""
    global _DEVNULL
    if _DEVNULL < 0:
        _DEVNULL = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _DEVNULL


class _Capture:
    """A unary exec's stdout and stderr, within one shared byte budget; past it, data is read and dropped."""

    __slots__ = ("room", "truncated", "_out", "_err")

    def __init__(self, cap: int) -> None:
        self.room = cap
        self.truncated = False
        self._out: list[bytes] = []
        self._err: list[bytes] = []

    def stdout(self, data: bytes) -> None:
        self._keep(self._out, data)

    def stderr(self, data: bytes) -> None:
        self._keep(self._err, data)

    def _keep(self, into: list[bytes], data: bytes) -> None:
        if len(data) > self.room:
            data = data[:self.room]
            self.truncated = True
        if data:
            into.append(data)
            self.room -= len(data)

    def result(self) -> tuple[bytes, bytes]:
        return b"".join(self._out), b"".join(self._err)


class _Countdown:
    """Completes `done` after `tick()` was called `n` times."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def tick(self) -> None:
        self.left -= 1
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)


async def _collect(readers: list[logs.OutputReader], eof: asyncio.Future[None]) -> None:
    """After the exit: wait for the pipes' EOF at most EXIT_GRACE, then take what is buffered and stop."""
    if not eof.done():
        try:
            await asyncio.wait_for(asyncio.shield(eof), EXIT_GRACE)
        except asyncio.TimeoutError:
            pass
    for reader in readers:
        reader.drain()


class _Writer:
    """Writes to a child's stdin (a pipe, or a pty master) without blocking the loop; buffers the rest.

    `write_eof()` closes a pipe once the buffer is written (or, on a pty, writes its EOF character).
    """

    def __init__(self, fd: int, on_eof: Callable[[], bytes] | None, owns_fd: bool = True) -> None:
        self.fd = fd
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._eof = False
        self._on_eof = on_eof
        self._owns_fd = owns_fd
        self._watching = False
        self._drained: list[asyncio.Future[None]] = []

    def write(self, data: bytes) -> None:
        if self.fd == _CLOSED or (self._eof and self._on_eof is None):
            return
        self._buffer += data
        self._flush()

    def write_eof(self) -> None:
        if self._on_eof is not None:  # a terminal: the EOF character, as a person would type it
            self.write(self._on_eof())
            return
        self._eof = True
        self._flush()

    async def drain(self, high_water: int) -> None:
        while len(self._buffer) > high_water and self.fd != _CLOSED:
            future = self._loop.create_future()
            self._drained.append(future)
            await future

    def _flush(self) -> None:
        while self._buffer and self.fd != _CLOSED:
            try:
                written = os.write(self.fd, self._buffer)
            except BlockingIOError:
                if not self._watching:
                    self._loop.add_writer(self.fd, self._flush)
                    self._watching = True
                return
            except OSError:  # EPIPE: the child closed its stdin; what it did not read is dropped
                self._buffer.clear()
                self.close()
                return
            del self._buffer[:written]
        if self._watching:
            self._loop.remove_writer(self.fd)
            self._watching = False
        self._wake()
        if self._eof and self._on_eof is None:
            self.close()

    def _wake(self) -> None:
        drained, self._drained = self._drained, []
        for future in drained:
            if not future.done():
                future.set_result(None)

    def close(self) -> None:
        if self.fd != _CLOSED:
            if self._watching:
                self._loop.remove_writer(self.fd)
                self._watching = False
            if self._owns_fd:
                os.close(self.fd)
            self.fd = _CLOSED
        self._buffer.clear()
        self._wake()


# ------------------------------------------------------------------------------------ checks


def _check_argv(argv: list[str]) -> None:
    if not argv:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, "argv is empty: give the program and its arguments as a list")
    if not argv[0]:
        raise GuestError(ErrorCode.INVALID_ARGUMENT, "argv[0] is empty: name the program to run")


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


def _describe(child: Child) -> str:
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
