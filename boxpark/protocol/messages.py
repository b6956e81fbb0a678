"""Every message of the Guest API, its error codes and its limits: the whole contract as `msgspec.Struct`s.

One module, so a reader learns the API in one sitting; what each call answers and whether it owns its
connection is in `calls.CALLS`, next door. Nothing here does I/O or knows a socket.
"""

from __future__ import annotations

import enum
from typing import Literal, Union

import msgspec

__all__ = ["PROTOCOL_VERSION", "MAX_FRAME", "MAX_HANDSHAKE_FRAME", "MAX_FILE_CHUNK", "MAX_RING_RECORDS",
           "MAX_RING_BYTES", "ErrorCode", "ProtocolError", "RemoteError", "Message", "Hello", "Challenge", "Proof",
           "Welcome", "Error", "Ok", "Info", "InfoReply", "Exec", "ExecResult", "Launch", "Launched", "Started",
           "Attach", "Wait", "Signal", "ListProcesses", "ProcessInfo", "ProcessList", "Exit", "LogRecord",
           "LogBatch", "EndOfStream", "Stdin", "Output", "ResizeTty", "SendSignal", "ReadFile", "FileData",
           "WriteFile", "Mkdir", "Stat", "StatReply", "Mount", "Umount", "Swapon", "Swapoff", "ResizeDisk",
           "ResizeResult", "NotifyListen", "NotifyMessage", "Connect", "Listen", "Accepted", "TakeConnection",
           "Events", "Resume", "BootStep", "Ready",
           "ProcessExited", "ClockStepped", "ShuttingDown", "Log", "Event", "EventFrame", "SetTime", "TimeSet",
           "Sync", "Hostname", "HostnameReply", "MemoryStats", "MemoryStatsReply", "Reboot", "Poweroff",
           "HostResolver", "ResolveRequest", "ResolveReply", "Request", "AnyMessage", "REQUEST_TYPES",
           "MESSAGE_TYPES"]

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; `Hello` and `Welcome` carry it and a mismatch is refused."""

MAX_FRAME = 16 * 1024 * 1024
"""The largest frame body either side accepts; a larger length prefix is a protocol error."""

MAX_HANDSHAKE_FRAME = 4096
"""The largest frame body a server accepts before its `Welcome`: `Hello` and `Proof` are far smaller, and an
unauthenticated peer must not make it hold more."""

MAX_FILE_CHUNK = 8 * 1024 * 1024
"""The largest `ReadFile` length and `WriteFile` payload in one call; larger files go in chunks."""

MAX_RING_RECORDS = 1_000_000
MAX_RING_BYTES = 64 * 1024 * 1024
"""The largest log ring a `Launch` may ask for, in records and in bytes of data; a larger one is refused."""


class ErrorCode(enum.IntEnum):
    """Why a call failed. The server maps every failure to one of these at its edge."""

    BAD_FRAME = 1  # the peer sent bytes that are not a valid frame or message: its bug
    UNSUPPORTED = 2  # a known message that is not valid here (wrong state, not a request)
    VERSION_MISMATCH = 3
    UNAUTHENTICATED = 4  # missing or wrong token proof
    INVALID_ARGUMENT = 5  # well-formed, but a value is wrong (empty argv, bad path, ...)
    NOT_FOUND = 6  # a file, binary, process name or socket that does not exist
    ALREADY_EXISTS = 7
    PERMISSION_DENIED = 8  # the OS said EPERM/EACCES, or the call is refused on this server
    TIMEOUT = 9
    UNAVAILABLE = 10  # the target exists but refused (connection refused, process gone)
    FAILED = 11  # the operation ran and failed (a tool exited non-zero, an OS error)
    INTERNAL = 12  # a bug in the server; the message says what it was doing


class ProtocolError(Exception):
    """The peer sent bytes that break the framing or the schema. Reply `BAD_FRAME` (if you can) and close."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_FRAME) -> None:
        super().__init__(message)
        self.code = code


class RemoteError(Exception):
    """The other side answered a call with an `Error`: `code` says why, the text says what to do."""

    def __init__(self, code: ErrorCode | int, message: str) -> None:
        super().__init__(message)
        try:
            self.code = ErrorCode(code)
        except ValueError:
            self.code = ErrorCode.INTERNAL
        self.message = message

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------------------------- base


class Message(msgspec.Struct, tag_field="t", omit_defaults=True, forbid_unknown_fields=False):
    """Base of every message; the `t` field on the wire names the message type."""


# ------------------------------------------------------------------------------------- handshake


class Hello(Message, tag="hello"):
    """First frame from the dialing side: its protocol version and who it is."""

    version: int = PROTOCOL_VERSION
    client: str = ""  # free text for logs, e.g. "boxpark-agent 0.1.0"
    boot_id: str = ""  # set by the guest when it dials the host's event stream


class Challenge(Message, tag="challenge"):
    """On tcp the listening side answers `Hello` with a fresh random nonce to be signed."""

    nonce: bytes


class Proof(Message, tag="proof"):
    """HMAC-SHA256 over the nonce with the machine's secret; the secret itself never crosses the wire."""

    hmac: bytes


class Welcome(Message, tag="welcome"):
    """The handshake succeeded; calls may follow."""

    version: int = PROTOCOL_VERSION
    server: str = ""
    boot_id: str = ""


# ------------------------------------------------------------------------------------ replies


class Error(Message, tag="error"):
    """A call failed; `code` says whose fault and what to do, `message` is a sentence for a person."""

    code: ErrorCode
    message: str


class Ok(Message, tag="ok"):
    """A call succeeded with nothing more to say (or an upgrade call's go-ahead)."""


# ------------------------------------------------------------------------------------------ info


class Info(Message, tag="info"):
    """Ask what the guest is: versions, boot id, uptime."""


class InfoReply(Message, tag="info_reply"):
    """What the guest is."""

    protocol: int
    boxpark: str
    kernel: str
    arch: str
    hostname: str
    boot_id: str
    uptime: float
    pid: int
    pid1: bool  # the server runs as the machine's init (machine-wide calls allowed)


# ------------------------------------------------------------------------------------- processes


class Exec(Message, tag="exec"):
    """Run argv (a list; never a shell string) and wait for it.

    Unary (default): stdin is fed from `stdin`, output is captured, the reply is `ExecResult`; past
    `timeout` seconds, or when the client closes the connection first, the child's whole process group is
    killed. With `interactive` the call upgrades:
    after `Started` the connection carries `Stdin`/`ResizeTty`/`SendSignal` to the guest and `Output`
    then one `Exit` back; with `tty` the process runs on a pseudo-terminal and gets SIGHUP when the
    connection closes.
    """

    argv: list[str]
    env: dict[str, str] | None = None  # None: the server's environment
    cwd: str | None = None
    stdin: bytes = b""
    timeout: float | None = None  # seconds, finite and not negative; None: no limit
    interactive: bool = False
    tty: bool = False
    rows: int = 24
    cols: int = 80
    name: str | None = None  # interactive only: addressable by name while it runs


class ExecResult(Message, tag="exec_result"):
    """The outcome of a unary `Exec`: the exit code (or the signal that ended it) and captured output."""

    code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    truncated: bool = False  # output past the frame limit was cut


class Launch(Message, tag="launch"):
    """Start a named long-running process (a service) that outlives this connection.

    Its stdout/stderr go into a ring of log records kept by the guest. With `connect` the call streams:
    after `Launched` come `LogBatch`es and finally `Exit`. `notify_socket` sets NOTIFY_SOCKET in its
    environment (pair with `NotifyListen`). A ring bound under 1 or over MAX_RING_RECORDS / MAX_RING_BYTES
    is refused (INVALID_ARGUMENT naming the limit), never clamped.
    """

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    connect: bool = False
    notify_socket: str | None = None
    ring_records: int = 100_000  # per-process log ring bound, in records ...
    ring_bytes: int = 16 * 1024 * 1024  # ... and in bytes; past either, the oldest go (counted)
    replace: bool = False  # a finished process of the same name may be replaced


class Launched(Message, tag="launched"):
    """The process started; `pid` is its pid in the guest."""

    name: str
    pid: int


class Started(Message, tag="started"):
    """An interactive `Exec` started; the connection now carries its frames."""

    pid: int


class Attach(Message, tag="attach"):
    """Stream a launched process's logs from sequence number `since` (exclusive), then its `Exit`.

    `follow=False` ends the stream (with `EndOfStream`) once the records present now are sent.
    """

    name: str
    since: int = 0
    follow: bool = True


class Wait(Message, tag="wait"):
    """Wait for a launched process to exit; the reply is `Exit`, or `Error(TIMEOUT)`."""

    name: str
    timeout: float | None = None  # seconds, finite and not negative; None: no limit


class Signal(Message, tag="signal"):
    """Send a signal to a launched or interactive process by name (to its process group with `group`)."""

    name: str
    signal: int
    group: bool = False


class ListProcesses(Message, tag="list_processes"):
    """List the named processes the guest's supervisor knows, running or exited."""


class ProcessInfo(msgspec.Struct, omit_defaults=True):
    """One supervised process."""

    name: str
    pid: int
    argv: list[str]
    kind: Literal["service", "interactive"]
    running: bool
    code: int | None = None
    signal: int | None = None
    started_ns: int = 0  # CLOCK_REALTIME of the guest
    last_seq: int = 0  # the newest log record's sequence number


class ProcessList(Message, tag="process_list"):
    """The reply to `ListProcesses`."""

    processes: list[ProcessInfo]


class Exit(Message, tag="exit"):
    """A process ended: by `code`, or by `signal` (then `code` is None)."""

    code: int | None
    signal: int | None = None


class LogRecord(msgspec.Struct, array_like=True, gc=False):
    """One line (or a piece of an over-long line, `partial=True`) from a process's stdout or stderr.

    `seq` counts every record of the process from 1, across both streams; `time_ns` is the guest's
    CLOCK_REALTIME when the line was read.
    """

    seq: int
    time_ns: int
    stream: int  # 1 stdout, 2 stderr
    partial: bool
    data: bytes


class LogBatch(Message, tag="log_batch"):
    """Log records of one process in order. `dropped` records were lost from the ring before the first."""

    service: str
    records: list[LogRecord]
    dropped: int = 0


class EndOfStream(Message, tag="end_of_stream"):
    """A finite stream (e.g. `Attach` without follow) has no more frames."""


class Stdin(Message, tag="stdin"):
    """Bytes for an interactive process's stdin; `eof` closes it (half-close)."""

    data: bytes = b""
    eof: bool = False


class Output(Message, tag="output"):
    """Bytes an interactive process wrote: `fd` 1 or 2 (a tty has only 1)."""

    fd: int
    data: bytes


class ResizeTty(Message, tag="resize_tty"):
    """The host terminal changed size; applied to the interactive process's pty (it gets SIGWINCH)."""

    rows: int
    cols: int


class SendSignal(Message, tag="send_signal"):
    """In an interactive stream: signal the process (e.g. SIGINT for a Ctrl-C the host intercepted)."""

    signal: int


# ----------------------------------------------------------------------------------------- files


class ReadFile(Message, tag="read_file"):
    """Read up to `length` bytes (at most MAX_FILE_CHUNK) from `offset`; the reply is `FileData`."""

    path: str
    offset: int = 0
    length: int = MAX_FILE_CHUNK


class FileData(Message, tag="file_data"):
    """Bytes read; `eof` when the file ends within them."""

    data: bytes
    eof: bool


class WriteFile(Message, tag="write_file"):
    """Write `data` to `path` (create, truncate unless `append`), atomically by rename unless appending."""

    path: str
    data: bytes
    mode: int = 0o644
    append: bool = False
    parents: bool = False  # create missing parent directories


class Mkdir(Message, tag="mkdir"):
    """Create a directory; `parents` like `mkdir -p` (then an existing directory is fine)."""

    path: str
    mode: int = 0o755
    parents: bool = False


class Stat(Message, tag="stat"):
    """Describe a path (without following a final symlink when `follow` is False)."""

    path: str
    follow: bool = True


class StatReply(Message, tag="stat_reply"):
    """What `Stat` found."""

    kind: Literal["file", "dir", "symlink", "socket", "fifo", "block", "char", "other"]
    mode: int  # permission bits only
    size: int
    uid: int
    gid: int
    mtime_ns: int


# --------------------------------------------------------------------------------------- storage


class Mount(Message, tag="mount"):
    """mount(2): `options` as mount(8) takes them (`ro`, `nosuid`, `bind`, fs-specific `key=value`, ...)."""

    source: str
    target: str
    fstype: str = ""
    options: list[str] = []
    mkdir: bool = False  # create the target directory (and parents) first


class Umount(Message, tag="umount"):
    """umount2(2); `lazy` is MNT_DETACH."""

    target: str
    lazy: bool = False
    force: bool = False


class Swapon(Message, tag="swapon"):
    """Enable swap on a device or file (machine-wide: refused unless the server is the guest's init)."""

    path: str
    priority: int | None = None
    # give freed swap pages back to the disk (SWAP_FLAG_DISCARD), as a sparse disk image needs to shrink
    discard: bool = False


class Swapoff(Message, tag="swapoff"):
    """Disable swap on a device or file (machine-wide, like `Swapon`)."""

    path: str


class ResizeDisk(Message, tag="resize_disk"):
    """Grow partition `partition` of `device` (if given) to fill it, then its ext4/xfs filesystem."""

    device: str
    partition: int | None = None


class ResizeResult(Message, tag="resize_result"):
    """What `ResizeDisk` did; `reboot_required` when the kernel could not take the new table live."""

    filesystem: str
    old_size: int  # bytes of the filesystem's block device before and after
    new_size: int
    partition_grown: bool
    filesystem_grown: bool
    reboot_required: bool = False


# --------------------------------------------------------------------------- notify, connect, events


class NotifyListen(Message, tag="notify_listen"):
    """Bind (or re-attach to) an sd_notify datagram socket at `path` and stream its messages after `since`.

    The socket lives as long as the server, so a host that reconnects loses nothing the ring still holds.
    """

    path: str
    since: int = 0


class NotifyMessage(Message, tag="notify"):
    """One sd_notify datagram, parsed per the systemd protocol; the sender's credentials via SO_PASSCRED."""

    seq: int
    pid: int
    uid: int
    gid: int
    time_ns: int
    fields: dict[str, str]
    ready: bool = False
    reloading: bool = False
    stopping: bool = False
    watchdog: bool = False
    status: str | None = None
    mainpid: int | None = None
    errno: int | None = None
    extend_timeout_usec: int | None = None


class Connect(Message, tag="connect"):
    """Open a stream to a unix socket `path` or a TCP `port` in the guest; after `Ok`, raw bytes both ways.

    With `udp`, `port` is a UDP port and the stream carries datagrams, each a 2-byte big-endian length and
    its bytes, both ways (a published UDP port: one stream per host-side peer).
    """

    path: str | None = None
    port: int | None = None
    host: str = "127.0.0.1"
    timeout: float = 10.0
    udp: bool = False


class Listen(Message, tag="listen"):
    """Bind a unix socket at `path` in the guest (mode `mode`) and say `Accepted` for each connection to it.

    The reverse of `Connect`: the host takes each accepted connection with `TakeConnection`, so every stream
    still starts from the host. The socket goes away with the stream; a second `Listen` on the same path
    takes it over from the first.
    """

    path: str
    mode: int = 0o666


class Accepted(Message, tag="accepted"):
    """On a `Listen` stream: a connection to its socket is waiting to be taken by `TakeConnection(id)`."""

    id: int


class TakeConnection(Message, tag="take_connection"):
    """Take a connection a `Listen` stream announced; after `Ok`, raw bytes both ways with it."""

    id: int


class Events(Message, tag="events"):
    """Stream the guest's events with sequence number greater than `since` (host-dialed event stream)."""

    since: int = 0


class Resume(Message, tag="resume"):
    """On the event stream the guest dialed: the host has seen every event up to `since`."""

    since: int = 0


class BootStep(msgspec.Struct, array_like=True):
    """One timed step of the guest's boot."""

    name: str
    duration_ns: int
    error: str | None = None


class Ready(msgspec.Struct, tag="ready", tag_field="t", omit_defaults=True):
    """The guest finished booting: its timeline, versions and boot id."""

    boot_id: str
    boxpark: str
    kernel: str
    arch: str
    timeline: list[BootStep]
    monotonic_ns: int  # CLOCK_MONOTONIC when Ready was sent: the kernel's share of the boot
    api: str = ""  # the address the Guest API listens on, as the guest sees it


class ProcessExited(msgspec.Struct, tag="process_exited", tag_field="t", omit_defaults=True):
    """A supervised process ended."""

    name: str
    pid: int
    code: int | None
    signal: int | None = None


class ClockStepped(msgspec.Struct, tag="clock_stepped", tag_field="t", omit_defaults=True):
    """The guest's clock was set: by how much, and from which source ("rtc", "rtc-refine", "host")."""

    source: str
    offset_ns: int


class ShuttingDown(msgspec.Struct, tag="shutting_down", tag_field="t", omit_defaults=True):
    """The guest is powering off or rebooting."""

    reason: str
    reboot: bool = False


class Log(msgspec.Struct, tag="log", tag_field="t", omit_defaults=True):
    """A warning or error from the guest's init worth showing on the host."""

    level: str
    message: str


Event = Union[Ready, ProcessExited, ClockStepped, ShuttingDown, Log]


class EventFrame(Message, tag="event"):
    """One guest event, numbered from 1 within a boot."""

    seq: int
    time_ns: int
    event: Event


# ---------------------------------------------------------------------------------------- system


class SetTime(Message, tag="set_time"):
    """Set CLOCK_REALTIME (machine-wide) when off by more than `threshold_ns`: step it, or slew it (adjtime) for
    a small offset after the boot's first set. Reply: `TimeSet`."""

    time_ns: int
    threshold_ns: int = 1_000_000


class TimeSet(Message, tag="time_set"):
    """The clock's offset before `SetTime`, and whether it was stepped."""

    offset_ns: int
    stepped: bool


class Sync(Message, tag="sync"):
    """Flush the guest's filesystems (sync(2))."""


class Hostname(Message, tag="hostname"):
    """Set the hostname (machine-wide) if `name` is given; the reply is `HostnameReply`."""

    name: str | None = None


class HostnameReply(Message, tag="hostname_reply"):
    """The hostname now."""

    name: str


class MemoryStats(Message, tag="memory_stats"):
    """The guest's memory figures, from /proc/meminfo: what the host's balloon policy and `status` read."""


class MemoryStatsReply(Message, tag="memory_stats_reply"):
    """/proc/meminfo's figures in bytes (`available` is MemAvailable: what can be had without swapping)."""

    total: int  # MemTotal: shrinks as a (traditional) balloon inflates
    free: int
    available: int
    cached: int  # Cached: the page cache, shmem (tmpfs) included
    shmem: int  # Shmem: cache that reclaim cannot drop without swap
    swap_total: int
    swap_free: int


class Reboot(Message, tag="reboot"):
    """Stop services cleanly and reboot (only when the server is the guest's init)."""


class Poweroff(Message, tag="poweroff"):
    """Stop services cleanly and power off (only when the server is the guest's init)."""


# --------------------------------------------------------------------------------------- host resolver


class HostResolver(Message, tag="host_resolver"):
    """The host offers its resolver to the guest's DNS forwarder: after `Ok`, the guest sends `ResolveRequest`s
    and the host answers each with a `ResolveReply` of the same id, in any order, until either side closes.

    The host opens it (no guest ever dials the host); a newer one replaces an older one.
    """


class ResolveRequest(Message, tag="resolve_request"):
    """Resolve `name` (no trailing dot) for DNS type `type` (1 A, 28 AAAA, 12 PTR of an `in-addr.arpa` or
    `ip6.arpa` name) as the host itself would."""

    id: int
    name: str
    type: int


class ResolveReply(Message, tag="resolve_reply"):
    """`found` with `addresses` (of the type asked; possibly none: the name has only others) or, for PTR,
    `names`; `nxdomain` (no such name), `nodata` (the name has no address) or `failed` (no answer: the guest
    asks the network)."""

    id: int
    status: Literal["found", "nxdomain", "nodata", "failed"]
    addresses: list[str] = []
    names: list[str] = []


# --------------------------------------------------------------------------------------- the union

Request = Union[
    Info, Exec, Launch, Attach, Wait, Signal, ListProcesses, ReadFile, WriteFile, Mkdir, Stat, Mount,
    Umount, Swapon, Swapoff, ResizeDisk, NotifyListen, Connect, Listen, TakeConnection, Events, SetTime, Sync,
    Hostname, MemoryStats, Reboot, Poweroff, HostResolver,
]
"""Every call a client may open with after the handshake."""

AnyMessage = Union[
    Hello, Challenge, Proof, Welcome, Error, Ok, Info, InfoReply, Exec, ExecResult, Launch, Launched,
    Started, Attach, Wait, Signal, ListProcesses, ProcessList, Exit, LogBatch, EndOfStream, Stdin, Output,
    ResizeTty, SendSignal, ReadFile, FileData, WriteFile, Mkdir, Stat, StatReply, Mount, Umount, Swapon,
    Swapoff, ResizeDisk, ResizeResult, NotifyListen, NotifyMessage, Connect, Listen, Accepted, TakeConnection,
    Events, Resume, EventFrame, SetTime, TimeSet, Sync, Hostname, HostnameReply, MemoryStats, MemoryStatsReply,
    Reboot, Poweroff, HostResolver, ResolveRequest, ResolveReply,
]

REQUEST_TYPES: tuple[type[Message], ...] = Request.__args__  # type: ignore[attr-defined]
MESSAGE_TYPES: tuple[type[Message], ...] = AnyMessage.__args__  # type: ignore[attr-defined]
