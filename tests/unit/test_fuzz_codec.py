"""Fuzzing the codec with the one invariant: any input decodes, or raises ProtocolError — nothing else."""

from __future__ import annotations

import struct

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from boxpark import protocol
from boxpark.protocol import FrameDecoder, ProtocolError

TAGS = [cls.__struct_config__.tag for cls in protocol.MESSAGE_TYPES]

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _drain(decoder: FrameDecoder) -> None:
    try:
        while decoder.next_message() is not None:
            pass
    except ProtocolError:
        pass  # the allowed outcome; anything else propagates and fails the test


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 17))
def test_random_bytes_in_any_chunking(data: bytes, chunk: int) -> None:
    decoder = FrameDecoder(max_frame=1024)
    for i in range(0, len(data), chunk):
        decoder.feed(data[i:i + chunk])
        _drain(decoder)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(TAGS), st.dictionaries(st.sampled_from(
    ["argv", "name", "path", "data", "code", "message", "seq", "records", "event", "env", "timeout", "x"]),
    msgpack_values, max_size=5))
def test_well_framed_bodies_with_wrong_fields(tag: str, fields: dict) -> None:
    body = msgspec.msgpack.encode({"t": tag, **fields})
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(body)) + body)
    _drain(decoder)


@settings(max_examples=200, deadline=None)
@given(msgpack_values)
def test_any_msgpack_value_as_body(value: object) -> None:
    body = msgspec.msgpack.encode(value)
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(body)) + body)
    _drain(decoder)
