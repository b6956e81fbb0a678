"""The Guest API server: accepts connections, dispatches each call to the module of its concern.

Handlers are registered by request type, one for each call of `protocol.CALLS` (checked when the server is
made). This is the only place that turns exceptions into wire errors (`_reply_for`): handlers raise
`GuestError` or let an `OSError` through, and a bug becomes an INTERNAL reply with a log line — never a dead
server. A connection is a sequence of unary calls, or ends with one streaming or upgrade call (the table
says which): the handler of a unary call returns its reply, one that owns the connection returns None once
it is done with it (or an `Error` if it refused before taking it over). A unary exec is the one unary call
that takes long and is no handler's coroutine: a connection runs it with callbacks (`_Connection`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from types import ModuleType
from typing import Any, Awaitable, Callable, Collection

from .. import __version__, protocol
from ..protocol import ErrorCode, Message
from ..transport import Address, Channel, serve
from . import clock as clock_
from . import events, files, memory, processes, system
from .errors import GuestError, from_oserror

log = logging.getLogger("boxpark.guest")

Handler = Callable[[Channel, Any], Awaitable["Message | None"]]


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class GuestServer:
    """The state behind every connection: the supervisor, notify sockets, the event log, the options.

    `machine_wide` allows the calls whose effect is global to the whole machine even inside namespaces
    (swap, clock, hostname, reboot/poweroff); it defaults to "this server is PID 1", and a sandboxed init
    turns it off for swap. `on_power` is how PID 1 learns that a client asked for reboot or poweroff.
    """

    def __init__(self, *, pid1: bool | None = None, machine_wide: bool | None = None,
                 on_power: Callable[[bool], None] | None = None, event_log: events.EventLog | None = None,
                 allow_swap: bool = True, clock: clock_.Clock | None = None) -> None:
        self.pid1 = os.getpid() == 1 if pid1 is None else pid1
        self.machine_wide = self.pid1 if machine_wide is None else machine_wide
        self.allow_swap = allow_swap
        self.on_power = on_power
        self.boot_id = boot_id()
        self.events = event_log or events.EventLog(self.boot_id)
        self.clock = clock or clock_.Clock(emit=self.events.emit)
        self.processes = processes.Processes(self.events)
        self._notify: Any = None  # the NotifyHub, made on first use (its import is not on the boot path)
        self._listeners: Any = None  # the Listen sockets, made on first use likewise
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.Task[Any]] = set()
        # Quick unary calls run synchronously, straight from the connection's data callback when it is idle.
        self._sync: dict[type[Message], Callable[[Any], Message]] = {
            protocol.Info: self._info,
            protocol.ReadFile: files.read_file,
            protocol.WriteFile: files.write_file,
            protocol.Mkdir: files.mkdir,
            protocol.Stat: files.stat,
            protocol.Mount: lambda message: _storage().mount(message),
            protocol.Umount: lambda message: _storage().umount(message),
            protocol.Swapon: self._machine_wide(lambda message: _storage().swapon(message), swap=True),
            protocol.Swapoff: self._machine_wide(lambda message: _storage().swapoff(message), swap=True),
            protocol.SetTime: self._machine_wide(self.clock.set_from_host),
            protocol.Hostname: self._hostname,
            protocol.MemoryStats: memory.memory_stats,
            protocol.Reboot: self._machine_wide(self._power),
            protocol.Poweroff: self._machine_wide(self._power),
        }
        self._handlers: dict[type[Message], Handler] = {
            **{kind: _sync(function) for kind, function in self._sync.items()},
            protocol.Exec: self.processes.exec,
            protocol.Launch: self.processes.launch,
            protocol.Attach: self.processes.attach,
            protocol.Wait: self.processes.wait,
            protocol.Signal: self.processes.signal,
            protocol.ListProcesses: self.processes.list,
            protocol.ResizeDisk: _threaded(lambda message: _storage().resize_disk(message)),
            protocol.NotifyListen: self._notify_listen,
            protocol.Connect: lambda channel, message: _proxy().connect(channel, message),
            protocol.Listen: lambda channel, message: self.listeners.listen(channel, message),
            protocol.TakeConnection: lambda channel, message: self.listeners.take(channel, message),
            protocol.Events: self.events.stream,
            protocol.Sync: _threaded(system.sync),
            protocol.HostResolver: lambda channel, message: _dns().LINK.serve(channel, message),
        }
        _check_registry(self._handlers, self._sync)

    def welcome(self) -> protocol.Welcome:
        return protocol.Welcome(server=f"boxpark-guest {__version__}", boot_id=self.boot_id)

    async def listen(self, address: Address, *, secret: bytes | None = None, sock: socket.socket | None = None,
                     peers: Collection[str] | None = None) -> asyncio.AbstractServer:
        """Serve the API on `address` (several addresses may be served at once); on tcp, `peers` are the only
        source addresses served (any other connection is closed before a byte of it is read)."""
        server = await serve(address, self.handle, secret=secret, welcome=self.welcome, sock=sock, peers=peers)
        self._servers.append(server)
        return server

    async def close(self) -> None:
        """Stop accepting, end open connections and notify sockets (launched processes keep running)."""
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=2)
        if self._notify is not None:
            self._notify.close()
        if self._listeners is not None:
            self._listeners.close()

    async def handle(self, channel: Channel) -> None:
        """One connection, after its handshake."""
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        connection = _Connection(self, channel)
        channel.set_fast_path(connection.fast)
        try:
            while True:
                try:
                    message = await channel.recv()
                except protocol.ProtocolError as exc:
                    await connection.settle()
                    channel.send(protocol.error(exc.code, str(exc)))
                    return
                if message is None:
                    if connection.exec is not None:  # nobody is left to read its result: end it
                        connection.exec.kill()
                        await connection.settle()
                    return
                await connection.settle()  # replies keep the order of the calls
                if isinstance(message, protocol.Exec) and not message.interactive:
                    connection.start_exec(message)
                    continue
                handler = self._handlers.get(type(message))
                if handler is None:
                    channel.send(protocol.error(ErrorCode.UNSUPPORTED,
                                                f"{type(message).__name__} is not a call this server takes here"))
                    continue
                reply = await self._call(handler, channel, message)
                if reply is None:
                    return  # a call that owned the connection is done with it
                channel.send(reply)
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._connections.discard(task)
            if connection.exec is not None:  # the server is closing: leave nothing behind
                connection.exec.kill()

    @property
    def notify(self) -> Any:
        if self._notify is None:
            from .notify import NotifyHub

            self._notify = NotifyHub()
        return self._notify

    @property
    def listeners(self) -> Any:
        if self._listeners is None:
            from .listen import Listeners

            self._listeners = Listeners()
        return self._listeners

    async def _notify_listen(self, channel: Channel, message: protocol.NotifyListen) -> None:
        return await self.notify.listen(channel, message)

    def _fast(self, channel: Channel, message: Message) -> bool:
        function = self._sync.get(type(message))
        if function is None:
            return False
        try:
            reply: Message | None = function(message)
        except Exception as exc:
            reply = _reply_for(exc, message)
        checked = _as_specified(reply, message)
        if checked is not None:  # always, for a unary call
            channel.send(checked)
        return True

    async def _call(self, handler: Handler, channel: Channel, message: Message) -> Message | None:
        try:
            reply = await handler(channel, message)
        except Exception as exc:  # the one edge where every failure becomes a reply
            return _reply_for(exc, message)
        return _as_specified(reply, message)

    # -------------------------------------------------------------- calls that belong to the server

    def _info(self, message: protocol.Info) -> protocol.InfoReply:
        uname = os.uname()
        return protocol.InfoReply(protocol=protocol.PROTOCOL_VERSION, boxpark=__version__, kernel=uname.release,
                                  arch=uname.machine, hostname=uname.nodename, boot_id=self.boot_id,
                                  uptime=time.clock_gettime(time.CLOCK_BOOTTIME), pid=os.getpid(),
                                  pid1=self.pid1)

    def _hostname(self, message: protocol.Hostname) -> protocol.HostnameReply:
        if message.name is not None:
            self._check_machine_wide(message)
            system.set_hostname(message.name)
        return protocol.HostnameReply(name=socket.gethostname())

    def _power(self, message: protocol.Reboot | protocol.Poweroff) -> Message:
        if not self.pid1 or self.on_power is None:
            raise GuestError(ErrorCode.PERMISSION_DENIED,
                             f"{type(message).__name__.lower()} is refused: this server is not the guest's init")
        reboot = isinstance(message, protocol.Reboot)
        asyncio.get_running_loop().call_soon(self.on_power, reboot)
        return protocol.Ok()

    def _check_machine_wide(self, message: Message, swap: bool = False) -> None:
        name = type(message).__name__.lower()
        if not self.machine_wide:
            raise GuestError(ErrorCode.PERMISSION_DENIED,
                             f"{name} changes the whole machine and is refused: this server is not the "
                             f"guest's init (PID 1)")
        if swap and not self.allow_swap:
            raise GuestError(ErrorCode.PERMISSION_DENIED,
                             f"{name} is refused here: swap is global to the host in a sandbox (VM backends only)")

    def _machine_wide(self, function: Callable[[Any], Message], swap: bool = False) -> Callable[[Any], Message]:
        def guarded(message: Message) -> Message:
            self._check_machine_wide(message, swap)
            return function(message)

        return guarded


# Imported on a call's first use, not on the boot path (storage brings mount options, resize and swap; the
# proxy its relay).


class _Connection:
    """One connection's unary exec in flight (at most one, so that replies keep the order of the calls).

    A unary exec is no task: it starts from the connection's data callback when the connection is idle (or
    from its task), and its reply is sent from the callback that sees the process's end (`capture.Unary`).
    Meanwhile the connection's task waits in `recv()`, which is how the call learns that its client went away
    (the connection's EOF: the exec is killed, as on its timeout); a call behind it waits for its reply.
    """

    __slots__ = ("server", "channel", "exec", "_settled")

    def __init__(self, server: GuestServer, channel: Channel) -> None:
        self.server = server
        self.channel = channel
        self.exec: Any = None  # the capture.Unary in flight
        self._settled: asyncio.Future[None] | None = None

    def fast(self, message: Message) -> bool:
        """Answer (or start) `message` right as it arrives; False: it goes to the connection's task."""
        if self.exec is not None:
            return False  # behind the exec in flight
        if isinstance(message, protocol.Exec) and not message.interactive:
            self.start_exec(message)
            return True
        return self.server._fast(self.channel, message)

    def start_exec(self, message: protocol.Exec) -> None:
        try:
            self.exec = self.server.processes.start_exec(message, self._done)
        except Exception as exc:
            self.channel.send(_reply_for(exc, message))

    def _done(self, result: protocol.ExecResult) -> None:
        self.exec = None
        self.channel.send(result)
        if self._settled is not None and not self._settled.done():
            self._settled.set_result(None)

    async def settle(self) -> None:
        """Wait until the exec in flight has replied; end it if the client goes away meanwhile."""
        if self.exec is None:
            return
        self._settled = asyncio.get_running_loop().create_future()
        gone = asyncio.ensure_future(self.channel.wait_eof())
        gone.add_done_callback(lambda done: done.cancelled() or self.exec is None or self.exec.kill())
        try:
            await self._settled
        finally:
            gone.cancel()
            self._settled = None


def _storage() -> ModuleType:
    from . import storage

    return storage


def _proxy() -> ModuleType:
    from . import proxy

    return proxy


def _dns() -> ModuleType:
    from . import dns

    return dns


def _check_registry(handlers: dict[type[Message], Handler],
                    sync: dict[type[Message], Callable[[Any], Message]]) -> None:
    """The server takes exactly the contract's calls, and answers on the fast path only unary ones."""
    if handlers.keys() != protocol.CALLS.keys():
        names = sorted(t.__name__ for t in handlers.keys() ^ protocol.CALLS.keys())
        raise TypeError(f"the server's handlers and protocol.CALLS differ in {', '.join(names)}")
    for kind in sync:
        spec = protocol.CALLS[kind]
        if spec.owns_connection or spec.switched is not None:
            raise TypeError(f"{kind.__name__} is not always unary and cannot be answered on the fast path")


def _as_specified(reply: Message | None, message: Message) -> Message | None:
    """`reply` if the call table allows it: a unary call's reply or an `Error`; None or an `Error` from a call
    that owned the connection. Anything else is a bug in its handler, answered as one."""
    spec = protocol.call_spec(message)
    allowed = reply is None if spec.owns_connection else isinstance(reply, spec.replies)
    if allowed or isinstance(reply, protocol.Error):
        return reply
    name = type(message).__name__
    what = "no reply" if reply is None else type(reply).__name__
    log.error("internal error in %s: its handler returned %s", name, what)
    return protocol.error(ErrorCode.INTERNAL, f"internal error in {name}: the server answered it with {what}")


def _sync(function: Callable[[Any], Message]) -> Handler:
    """A handler for a quick call that needs no channel (file metadata, mount): run it on the loop."""

    async def handler(channel: Channel, message: Any) -> Message:
        return function(message)

    return handler


def _threaded(function: Callable[[Any], Message]) -> Handler:
    """A handler for a call that may block for long (resize, sync): run it in a worker thread."""

    async def handler(channel: Channel, message: Any) -> Message:
        return await asyncio.to_thread(function, message)

    return handler


def _reply_for(exc: Exception, message: Message) -> protocol.Error:
    """The one mapping from an exception to a wire error."""
    name = type(message).__name__
    if isinstance(exc, GuestError):
        return protocol.error(exc.code, exc.message)
    if isinstance(exc, OSError):
        mapped = from_oserror(exc, name.lower())
        return protocol.error(mapped.code, mapped.message)
    if isinstance(exc, protocol.ProtocolError):
        return protocol.error(exc.code, str(exc))
    log.exception("internal error in %s", name)
    return protocol.error(ErrorCode.INTERNAL, f"internal error in {name}: {type(exc).__name__}: {exc}")


async def run_forever(listen: list[tuple[Address, bytes | None]], *, events_to: Address | None = None,
                      events_secret: bytes | None = None, server: GuestServer | None = None) -> None:
    """Serve until SIGTERM/SIGINT (the `boxpark guest serve` command), then close cleanly."""
    server = server or GuestServer()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        # Started under nohup: every child would inherit the ignored SIGHUP, and a shell cannot even trap it
        # (POSIX), so a hang-up (sessions.py) would reach nobody. A caught signal is back to its default in
        # a child after exec: catch it, and do nothing with it.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
    for address, secret in listen:
        await server.listen(address, secret=secret)
        log.info("serving the Guest API on %s", address)
    dialer = None
    if events_to is not None:
        dialer = loop.create_task(events.stream_to_host(server.events, events_to, events_secret))
    await stop.wait()
    if dialer is not None:
        dialer.cancel()
    await server.close()
    await server.processes.stop_all(grace=5.0)
