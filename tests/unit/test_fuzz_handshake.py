"""Fuzzing the handshake and raw-call machines with the codec's invariant: whatever the peer sends either
advances them or raises ProtocolError or RemoteError (the peer broke the protocol, or said no) — nothing else."""

from __future__ import annotations

import struct

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from boxpark import protocol
from boxpark.protocol import (ClientHandshake, ErrorCode, FrameDecoder, ProtocolError, RawCall, RemoteError,
                              ServerHandshake)

SECRET = b"k" * 32
TAGS = [cls.__struct_config__.tag for cls in protocol.MESSAGE_TYPES]

# Messages that matter to a handshake, with the values a peer controls drawn freely.
handshake_messages = st.one_of(
    st.builds(protocol.Hello, version=st.integers(-2, 3), client=st.text(max_size=8), boot_id=st.text(max_size=8)),
    st.builds(protocol.Challenge, nonce=st.binary(max_size=40)),
    st.builds(protocol.Proof, hmac=st.binary(max_size=40)),
    st.builds(protocol.Welcome, version=st.integers(-2, 3)),
    st.builds(protocol.Error, code=st.sampled_from(list(ErrorCode)), message=st.text(max_size=20)),
    st.just(protocol.Ok()), st.just(protocol.Info()), st.just(protocol.Started(pid=1)),
    st.just(protocol.Connect(port=1)),
)


def any_body() -> st.SearchStrategy[bytes]:
    """A frame of a known tag with arbitrary fields: it decodes to a message, or the codec refuses it."""
    values = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=8)
    fields = st.dictionaries(st.sampled_from(["version", "nonce", "hmac", "code", "message", "client"]), values,
                             max_size=3)
    return st.builds(lambda tag, f: msgspec.msgpack.encode({"t": tag, **f}), st.sampled_from(TAGS), fields)


frames = st.one_of(handshake_messages.map(protocol.encode), any_body().map(lambda b: struct.pack(">I", len(b)) + b),
                   st.binary(max_size=24))


def feed_server(server: ServerHandshake, data: bytes) -> None:
    decoder = FrameDecoder(protocol.MAX_HANDSHAKE_FRAME)
    decoder.feed(data)
    try:
        while not server.done and (message := decoder.next_message()) is not None:
            server.receive(message)
            server.data_to_send()
    except ProtocolError:
        pass  # the allowed outcome; anything else propagates and fails the test


@settings(max_examples=400, deadline=None)
@given(st.lists(frames, max_size=4), st.booleans())
def test_the_server_side_advances_or_refuses(stream: list[bytes], asks_proof: bool) -> None:
    server = ServerHandshake(protocol.Welcome(), secret=SECRET if asks_proof else None, nonce=b"n" * 32)
    feed_server(server, b"".join(stream))
    if server.done:
        assert isinstance(server.hello, protocol.Hello) and server.hello.version == protocol.PROTOCOL_VERSION


@settings(max_examples=300, deadline=None)
@given(st.lists(handshake_messages, max_size=4), st.sampled_from([None, SECRET]), st.booleans())
def test_the_client_side_advances_or_refuses(answers: list[protocol.Message], secret: bytes | None,
                                              then: bool) -> None:
    client = ClientHandshake(secret=secret, then=protocol.Info() if then else None)
    client.data_to_send()
    try:
        for answer in answers:
            client.receive(answer)
            client.data_to_send()
    except (ProtocolError, RemoteError):
        pass
    if client.done:
        assert client.welcome is not None and client.welcome.version == protocol.PROTOCOL_VERSION


@settings(max_examples=400, deadline=None)
@given(st.lists(frames, max_size=5), st.integers(1, 17), st.sampled_from([None, SECRET]), st.booleans())
def test_a_raw_call_advances_or_refuses_in_any_chunking(stream: list[bytes], chunk: int, secret: bytes | None,
                                                       as_asked: bool) -> None:
    call = RawCall(protocol.Connect(port=1), secret=secret)
    data = b"".join(stream)
    try:
        while data and not call.done:
            call.data_to_send()
            size = min(chunk, call.wanted()) if as_asked else chunk
            call.receive_data(data[:size])
            data = data[size:]
    except (ProtocolError, RemoteError):
        return
    if call.done:
        assert isinstance(call.reply, protocol.Ok) and call.handshake.done


@settings(max_examples=200, deadline=None)
@given(st.builds(protocol.Hello, client=st.text(max_size=20), boot_id=st.text(max_size=20)),
       st.sampled_from([None, SECRET]), st.sampled_from([None, SECRET]), st.binary(min_size=1, max_size=40))
def test_two_honest_sides_always_complete(hello: protocol.Hello, client_secret: bytes | None,
                                          server_secret: bytes | None, nonce: bytes) -> None:
    if server_secret and not client_secret:
        return  # refused by design: tested in test_protocol_handshake
    client = ClientHandshake(hello=hello, secret=client_secret, then=protocol.Sync())
    server = ServerHandshake(protocol.Welcome(), secret=server_secret, nonce=nonce)
    decoder = FrameDecoder(protocol.MAX_HANDSHAKE_FRAME)
    for _ in range(3):
        decoder.feed(client.data_to_send())
        while not server.done and (message := decoder.next_message()) is not None:
            server.receive(message)
        replies = FrameDecoder()
        replies.feed(server.data_to_send())
        while (message := replies.next_message()) is not None:
            client.receive(message)
    decoder.feed(client.data_to_send())
    assert client.done and server.done and server.hello == hello
    assert decoder.next_message() == protocol.Sync()
