"""The host's Guest API client: one async method per call, and one per kind of call for any request.

What a call answers and whether it owns its connection come from the contract's table (`protocol.CALLS`).
Unary calls (`call`) share one connection, one call at a time. A streaming or upgrade call owns its
connection, so each one dials its own: `stream` (and `launch_connect`, `attach`, `notify_listen`, `events`)
returns a `Stream` of frames; `exec_interactive` returns an `Interactive`; `open_raw` (and `connect`) a raw
socket. A failed call raises `RemoteError` carrying the wire `ErrorCode` and the guest's sentence.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, AsyncIterator, Awaitable, Callable, Generic, Iterable, TypeVar

from .. import __version__, protocol
from ..protocol import CallKind, Message, call_spec
from ..transport import Address, Channel, RemoteError, TransportError, dial, open_raw, parse_address

__all__ = ["GuestClient", "RemoteError", "TransportError", "Stream", "Interactive"]

M = TypeVar("M", bound=Message)
Dialer = Callable[[float], Awaitable[socket.socket]]  # a new connection to the guest's API (a backend's dial)


class GuestClient:
    """A connection to one guest's API: `async with await GuestClient.open(address) as client:`."""

    def __init__(self, address: Address, secret: bytes | None, channel: Channel,
                 welcome: protocol.Welcome, timeout: float, dialer: Dialer | None = None) -> None:
        self.address = address  # with a `dialer`, only its name: each new connection comes from the dialer
        self.dialer = dialer
        self.secret = secret
        self.welcome = welcome
        self._channel = channel
        self._timeout = timeout
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, address: Address | str, *, secret: bytes | None = None,
                      timeout: float = 10.0, dialer: Dialer | None = None) -> GuestClient:
        if isinstance(address, str):
            address = parse_address(address)
        channel, welcome = await cls._dial(address, secret, timeout, dialer=dialer)
        return cls(address, secret, channel, welcome, timeout, dialer)

    @staticmethod
    async def _dial(address: Address, secret: bytes | None, timeout: float,
                    then: Message | None = None, dialer: Dialer | None = None) -> tuple[Channel, protocol.Welcome]:
        return await dial(address, secret=secret, timeout=timeout, then=then,
                          hello=protocol.Hello(client=f"boxpark-host {__version__}"),
                          sock=await dialer(timeout) if dialer is not None else None)

    async def __aenter__(self) -> GuestClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._channel.close()

    # ------------------------------------------------------------------------------- plumbing

    async def call(self, request: Message, *expect: type[Message]) -> Any:
        """Send one unary request and return its reply: of a type the call table allows (narrowed to `expect`
        if given); an `Error` raises `RemoteError`."""
        spec = _kind(request, CallKind.UNARY)
        async with self._lock:
            channel = self._channel
            channel.send(request)
            return await channel.recv_expect(*(expect or spec.replies))

    async def stream(self, request: Message) -> Stream[Any]:
        """Open any streaming call on a connection of its own: its first reply is `first`, then its frames."""
        spec = _kind(request, CallKind.STREAM)
        channel, reply = await self._open(request)
        return Stream(channel, reply, spec.final)

    async def open_raw(self, request: Message, *, timeout: float | None = None) -> socket.socket:
        """Make a raw upgrade call (`Connect`) on a connection of its own; return its socket after the go-ahead."""
        _kind(request, CallKind.UPGRADE)
        timeout = timeout or self._timeout
        return await open_raw(self.address, request, secret=self.secret, timeout=timeout,
                              hello=protocol.Hello(client=f"boxpark-host {__version__}"),
                              sock=await self.dialer(timeout) if self.dialer is not None else None)

    async def _open(self, request: Message) -> tuple[Channel, Message]:
        """Dial a fresh connection for a call that will own it; return it with the call's first reply.

        The request goes out right behind the handshake: one round trip for a new connection, not two.
        """
        channel, _ = await self._dial(self.address, self.secret, self._timeout, then=request, dialer=self.dialer)
        try:
            reply = await channel.recv_expect(*call_spec(request).replies)
        except BaseException:
            channel.abort()
            raise
        return channel, reply

    # ------------------------------------------------------------------------------- unary calls

    async def info(self) -> protocol.InfoReply:
        return await self.call(protocol.Info())

    async def exec(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                   stdin: bytes = b"", timeout: float | None = None) -> protocol.ExecResult:
        return await self.call(protocol.Exec(argv=list(argv), env=env, cwd=cwd, stdin=stdin, timeout=timeout))

    async def launch(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
                     cwd: str | None = None, notify_socket: str | None = None, replace: bool = False,
                     **ring: int) -> protocol.Launched:
        """Start a named service without following its logs (see `launch_connect`)."""
        return await self.call(protocol.Launch(name=name, argv=list(argv), env=env, cwd=cwd,
                                               notify_socket=notify_socket, replace=replace, **ring))

    async def wait(self, name: str, timeout: float | None = None) -> protocol.Exit:
        return await self.call(protocol.Wait(name=name, timeout=timeout))

    async def signal(self, name: str, signum: int, group: bool = False) -> None:
        await self.call(protocol.Signal(name=name, signal=int(signum), group=group))

    async def list_processes(self) -> list[protocol.ProcessInfo]:
        return (await self.call(protocol.ListProcesses())).processes  # type: ignore[no-any-return]

    async def read_file(self, path: str, offset: int = 0,
                        length: int = protocol.MAX_FILE_CHUNK) -> protocol.FileData:
        return await self.call(protocol.ReadFile(path=path, offset=offset, length=length))

    async def read_all(self, path: str) -> bytes:
        """A whole file, however large, in chunks."""
        parts: list[bytes] = []
        offset = 0
        while True:
            chunk = await self.read_file(path, offset)
            parts.append(chunk.data)
            offset += len(chunk.data)
            if chunk.eof or not chunk.data:
                return b"".join(parts)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644, append: bool = False,
                         parents: bool = False) -> None:
        if len(data) <= protocol.MAX_FILE_CHUNK:
            await self.call(protocol.WriteFile(path=path, data=data, mode=mode, append=append, parents=parents))
            return
        # Larger than one frame: write the first chunk, append the rest (not atomic, said so in the docs).
        for start in range(0, len(data), protocol.MAX_FILE_CHUNK):
            await self.call(protocol.WriteFile(path=path, data=data[start:start + protocol.MAX_FILE_CHUNK],
                                               mode=mode, append=append or start > 0, parents=parents))

    async def mkdir(self, path: str, *, mode: int = 0o755, parents: bool = False) -> None:
        await self.call(protocol.Mkdir(path=path, mode=mode, parents=parents))

    async def stat(self, path: str, follow: bool = True) -> protocol.StatReply:
        return await self.call(protocol.Stat(path=path, follow=follow))

    async def mount(self, source: str, target: str, fstype: str = "", options: Iterable[str] = (),
                    mkdir: bool = False) -> None:
        await self.call(protocol.Mount(source=source, target=target, fstype=fstype, options=list(options),
                                       mkdir=mkdir))

    async def umount(self, target: str, *, lazy: bool = False, force: bool = False) -> None:
        await self.call(protocol.Umount(target=target, lazy=lazy, force=force))

    async def swapon(self, path: str, priority: int | None = None, discard: bool = False) -> None:
        await self.call(protocol.Swapon(path=path, priority=priority, discard=discard))

    async def swapoff(self, path: str) -> None:
        await self.call(protocol.Swapoff(path=path))

    async def resize_disk(self, device: str, partition: int | None = None) -> protocol.ResizeResult:
        return await self.call(protocol.ResizeDisk(device=device, partition=partition))

    async def set_time(self, time_ns: int, threshold_ns: int = 1_000_000) -> protocol.TimeSet:
        return await self.call(protocol.SetTime(time_ns=time_ns, threshold_ns=threshold_ns))

    async def sync(self) -> None:
        await self.call(protocol.Sync())

    async def hostname(self, name: str | None = None) -> str:
        return (await self.call(protocol.Hostname(name=name))).name  # type: ignore[no-any-return]

    async def memory_stats(self) -> protocol.MemoryStatsReply:
        return await self.call(protocol.MemoryStats(), protocol.MemoryStatsReply)  # type: ignore[no-any-return]

    async def reboot(self) -> None:
        await self.call(protocol.Reboot())

    async def poweroff(self) -> None:
        await self.call(protocol.Poweroff())

    # ----------------------------------------------------------------------------- streaming calls

    async def launch_connect(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
                             cwd: str | None = None, notify_socket: str | None = None, replace: bool = False,
                             **ring: int) -> Stream[protocol.LogBatch | protocol.Exit]:
        """Start a named service and follow its logs: `LogBatch`es, then its `Exit`."""
        request = protocol.Launch(name=name, argv=list(argv), env=env, cwd=cwd, notify_socket=notify_socket,
                                  replace=replace, connect=True, **ring)
        return await self.stream(request)

    async def attach(self, name: str, since: int = 0,
                     follow: bool = True) -> Stream[protocol.LogBatch | protocol.Exit]:
        """Resume a launched process's logs after sequence number `since`."""
        return await self.stream(protocol.Attach(name=name, since=since, follow=follow))

    async def notify_listen(self, path: str, since: int = 0) -> Stream[protocol.NotifyMessage]:
        """Bind (or re-attach to) an sd_notify socket in the guest and follow its messages."""
        return await self.stream(protocol.NotifyListen(path=path, since=since))

    async def events(self, since: int = 0) -> Stream[protocol.EventFrame]:
        return await self.stream(protocol.Events(since=since))

    # ------------------------------------------------------------------------------- upgrade calls

    async def exec_interactive(self, argv: list[str], *, tty: bool = False, rows: int = 24, cols: int = 80,
                               env: dict[str, str] | None = None, cwd: str | None = None,
                               name: str | None = None) -> Interactive:
        """Start a process whose stdin/output travel as frames on its own connection."""
        request = protocol.Exec(argv=list(argv), env=env, cwd=cwd, interactive=True, tty=tty, rows=rows,
                                cols=cols, name=name)
        _kind(request, CallKind.UPGRADE)
        channel, reply = await self._open(request)
        assert isinstance(reply, protocol.Started)
        return Interactive(channel, reply.pid)

    async def host_resolver(self) -> Channel:
        """Offer the host's resolver to the guest's DNS forwarder: `ResolveRequest`s come on the returned
        channel, each answered with a `ResolveReply` (host/resolver.py)."""
        channel, _ = await self._open(protocol.HostResolver())
        return channel

    async def connect(self, *, path: str | None = None, port: int | None = None, host: str = "127.0.0.1",
                      timeout: float = 10.0, udp: bool = False) -> socket.socket:
        """A raw byte stream to a unix socket or TCP port in the guest, as a non-blocking socket.

        With `udp`, a stream of framed datagrams (`relay.frame_datagram`) to a UDP port."""
        return await self.open_raw(protocol.Connect(path=path, port=port, host=host, timeout=timeout, udp=udp),
                                   timeout=max(timeout, self._timeout))


def _kind(request: Message, kind: CallKind) -> protocol.CallSpec:
    spec = call_spec(request)
    if spec.kind is not kind:
        raise ValueError(f"{type(request).__name__} here is a {spec.kind.value} call, not {kind.value}")
    return spec


class Stream(Generic[M]):
    """The frames of a streaming call: `async for frame in stream`; ends after a final frame or EOF."""

    def __init__(self, channel: Channel, first: Message, final: tuple[type[Message], ...]) -> None:
        self.channel = channel
        self.first = first
        self._final = final
        self._done = False

    def __aiter__(self) -> AsyncIterator[M]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[M]:
        try:
            while not self._done:
                message = await self.channel.recv()
                if message is None:
                    return
                if isinstance(message, protocol.Error):
                    raise RemoteError(message.code, message.message)
                if isinstance(message, self._final):
                    self._done = True
                yield message  # type: ignore[misc]
        finally:
            if self._done:
                self.close()

    def close(self) -> None:
        self.channel.close()

    async def __aenter__(self) -> Stream[M]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Interactive:
    """A running interactive process: write stdin, resize, signal; read `Output`s until its `Exit`."""

    def __init__(self, channel: Channel, pid: int) -> None:
        self.channel = channel
        self.pid = pid
        self.exit: protocol.Exit | None = None

    def write(self, data: bytes) -> None:
        self.channel.send(protocol.Stdin(data=data))

    def close_stdin(self) -> None:
        self.channel.send(protocol.Stdin(eof=True))

    def resize(self, rows: int, cols: int) -> None:
        self.channel.send(protocol.ResizeTty(rows=rows, cols=cols))

    def send_signal(self, signum: int) -> None:
        self.channel.send(protocol.SendSignal(signal=int(signum)))

    async def drain(self) -> None:
        await self.channel.drain()

    async def output(self) -> AsyncIterator[protocol.Output]:
        """Each `Output` frame until the process exits (then `self.exit` is set)."""
        while True:
            message = await self.channel.recv()
            if message is None:
                return
            if isinstance(message, protocol.Output):
                yield message
            elif isinstance(message, protocol.Exit):
                self.exit = message
                return
            elif isinstance(message, protocol.Error):
                raise RemoteError(message.code, message.message)

    async def communicate(self, stdin: bytes = b"") -> tuple[bytes, bytes, protocol.Exit]:
        """Send all of `stdin`, close it, collect output until exit."""
        if stdin:
            self.write(stdin)
        self.close_stdin()
        out: list[bytes] = []
        err: list[bytes] = []
        async for chunk in self.output():
            (err if chunk.fd == 2 else out).append(chunk.data)
        if self.exit is None:
            raise TransportError("the guest closed the connection before the process's exit status")
        return b"".join(out), b"".join(err), self.exit

    def close(self) -> None:
        self.channel.close()

