"""The frame codec: a 4-byte big-endian length, then a msgpack body that decodes into one tagged message.

Sans-IO: bytes go in through `FrameDecoder.feed`, messages come out of `FrameDecoder.next_message`, and
`encode` turns a message back into frame bytes. Any input either decodes or raises `ProtocolError`, nothing
else; that is the invariant the fuzz tests hold it to.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from .messages import MAX_FRAME, AnyMessage, Error, ErrorCode, Message, ProtocolError

__all__ = ["HEADER", "encode", "decode_body", "FrameDecoder", "error"]

HEADER = struct.Struct(">I")

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> bytes:
    """One frame: the 4-byte big-endian body length, then the msgpack body."""
    body = _encoder.encode(message)
    if len(body) > MAX_FRAME:
        raise ValueError(f"{type(message).__name__} encodes to {len(body)} bytes, over the {MAX_FRAME} limit")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes | memoryview) -> Message:
    """Decode one frame body, or raise `ProtocolError` saying why it is not a message."""
    try:
        message: Message = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable frame body: {exc}") from None
    return message


class FrameDecoder:
    """Turns a byte stream into messages: `feed(data)`, then `next_message()` until it returns None.

    After a `ProtocolError` the stream is out of step and the connection should be closed. `detach()`
    hands back the bytes buffered past the last frame, for a connection that upgrades to raw bytes.
    """

    __slots__ = ("_buffer", "_max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    def set_max_frame(self, max_frame: int) -> None:
        """Change the frame limit from the next frame on (a server raises it once the peer is authenticated)."""
        self._max_frame = max_frame

    def next_message(self) -> Message | None:
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        (length,) = HEADER.unpack_from(buffer)
        if length > self._max_frame:
            raise ProtocolError(f"frame of {length} bytes is over the {self._max_frame} byte limit")
        end = 4 + length
        if len(buffer) < end:
            return None
        body = bytes(buffer[4:end])
        del buffer[:end]
        return decode_body(body)

    def wanted(self) -> int:
        """How many more bytes complete the frame in progress (at least 1 when nothing is buffered)."""
        if len(self._buffer) < 4:
            return 4 - len(self._buffer)
        (length,) = HEADER.unpack_from(self._buffer)
        return max(1, 4 + length - len(self._buffer))

    def detach(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def error(code: ErrorCode, message: str) -> Error:
    """Shorthand for an `Error` reply."""
    return Error(code=code, message=message)
