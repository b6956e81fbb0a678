"""What each call is: unary, a stream or an upgrade, and which messages answer it — the contract as data.

`CALLS` is the one table the server's dispatch, the client and the CLI's `guest call` derive from; the JSON
Schema carries it too (`x-calls`), for a client in another language. A unary call gets one reply and the
connection takes the next call; a stream or an upgrade owns its connection from its first reply on. An
`Error` may always come instead of the first reply, and on a stream or an upgrade instead of any frame.

Two requests change kind with a flag: `Exec` with `interactive` upgrades, `Launch` with `connect` streams.
The event stream the guest dials to the host (`Resume`, then `EventFrame`s) is not a call and is not here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Mapping

import msgspec

from .messages import (PROTOCOL_VERSION, Accepted, AnyMessage, Attach, Connect, EndOfStream, ErrorCode, EventFrame,
                       Events, Exec, ExecResult, Exit, FileData, Hostname, HostnameReply, HostResolver, Info,
                       InfoReply, Launch, Launched, Listen, ListProcesses, LogBatch, MemoryStats, MemoryStatsReply,
                       Message, Mkdir, Mount, NotifyListen, NotifyMessage, Ok, Output, Poweroff, ProcessList,
                       ProtocolError, ReadFile, Reboot, ResizeDisk, ResizeResult, ResizeTty, ResolveReply,
                       ResolveRequest, SendSignal, SetTime, Signal, Started, Stat, StatReply, Stdin, Swapoff, Swapon,
                       Sync, TakeConnection, TimeSet, Umount, Wait, WriteFile)

__all__ = ["CallKind", "CallSpec", "CALLS", "call_spec", "json_schema"]


class CallKind(enum.Enum):
    UNARY = "unary"  # one reply, then the connection takes the next call
    STREAM = "stream"  # a first reply, then frames from the server until a final one or the end
    UPGRADE = "upgrade"  # a go-ahead, then the call's own traffic both ways (frames, or raw bytes)


Types = tuple[type[Message], ...]


@dataclass(frozen=True, slots=True)
class CallSpec:
    """One call: its kind, its first reply, and what the connection carries after it."""

    kind: CallKind
    replies: Types  # the first answer (or an `Error`)
    frames: Types = ()  # a stream's or an upgrade's frames from the server
    final: Types = ()  # the frames that end a stream (without them it ends with the connection)
    sends: Types = ()  # an upgrade's frames from the client
    raw: bool = False  # an upgrade to raw bytes both ways
    switch: str = ""  # a bool field of the request that, when true, makes the call `switched`
    switched: CallSpec | None = None

    @property
    def owns_connection(self) -> bool:
        return self.kind is not CallKind.UNARY

    def unless(self, field: str, switched: CallSpec) -> CallSpec:
        return replace(self, switch=field, switched=switched)


def _unary(*replies: type[Message]) -> CallSpec:
    return CallSpec(CallKind.UNARY, replies)


def _stream(reply: type[Message], frames: Types, final: Types = ()) -> CallSpec:
    return CallSpec(CallKind.STREAM, (reply,), frames, final)


def _upgrade(reply: type[Message], frames: Types = (), sends: Types = (), raw: bool = False) -> CallSpec:
    return CallSpec(CallKind.UPGRADE, (reply,), frames, sends=sends, raw=raw)


_LOGS = (LogBatch, Exit, EndOfStream)

CALLS: Mapping[type[Message], CallSpec] = MappingProxyType({
    Info: _unary(InfoReply),
    Exec: _unary(ExecResult).unless(
        "interactive", _upgrade(Started, frames=(Output, Exit), sends=(Stdin, ResizeTty, SendSignal))),
    Launch: _unary(Launched).unless("connect", _stream(Launched, _LOGS, final=(Exit, EndOfStream))),
    Attach: _stream(Ok, _LOGS, final=(Exit, EndOfStream)),
    Wait: _unary(Exit),
    Signal: _unary(Ok),
    ListProcesses: _unary(ProcessList),
    ReadFile: _unary(FileData),
    WriteFile: _unary(Ok),
    Mkdir: _unary(Ok),
    Stat: _unary(StatReply),
    Mount: _unary(Ok),
    Umount: _unary(Ok),
    Swapon: _unary(Ok),
    Swapoff: _unary(Ok),
    ResizeDisk: _unary(ResizeResult),
    NotifyListen: _stream(Ok, (NotifyMessage,)),
    Connect: _upgrade(Ok, raw=True),
    Listen: _stream(Ok, (Accepted,)),
    TakeConnection: _upgrade(Ok, raw=True),
    Events: _stream(Ok, (EventFrame,)),
    SetTime: _unary(TimeSet),
    Sync: _unary(Ok),
    Hostname: _unary(HostnameReply),
    MemoryStats: _unary(MemoryStatsReply),
    Reboot: _unary(Ok),
    Poweroff: _unary(Ok),
    HostResolver: _upgrade(Ok, frames=(ResolveRequest,), sends=(ResolveReply,)),
})
"""Every call a client may open with after the handshake, by request type."""


def call_spec(request: Message) -> CallSpec:
    """What `request` is as a call, its flag applied; `ProtocolError(UNSUPPORTED)` if it is not a request."""
    spec = CALLS.get(type(request))
    if spec is None:
        raise ProtocolError(f"{type(request).__name__} is not a call", ErrorCode.UNSUPPORTED)
    if spec.switched is not None and getattr(request, spec.switch):
        return spec.switched
    return spec


def _tags(types: Types) -> list[str]:
    return [str(cls.__struct_config__.tag) for cls in types]


def _describe(spec: CallSpec) -> dict[str, Any]:
    described: dict[str, Any] = {"kind": spec.kind.value, "replies": _tags(spec.replies)}
    for key, types in (("frames", spec.frames), ("final", spec.final), ("sends", spec.sends)):
        if types:
            described[key] = _tags(types)
    if spec.raw:
        described["raw"] = True
    if spec.switched is not None:
        described["when"] = {spec.switch: _describe(spec.switched)}
    return described


def json_schema() -> dict[str, Any]:
    """The JSON Schema of every message, and the call table as `x-calls` (committed as docs/protocol.schema.json;
    a test keeps it fresh)."""
    (schema,), components = msgspec.json.schema_components([AnyMessage])
    calls = {str(cls.__struct_config__.tag): _describe(spec) for cls, spec in CALLS.items()}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Boxpark Guest API",
            "version": PROTOCOL_VERSION, **schema, "$defs": components, "x-calls": calls}
