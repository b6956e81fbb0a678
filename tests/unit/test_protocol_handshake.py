"""The handshake and raw-call state machines without I/O: the two sides against each other, byte by byte."""

from __future__ import annotations

import pytest

from boxpark import protocol
from boxpark.protocol import (ClientHandshake, ErrorCode, FrameDecoder, ProtocolError, RawCall, RemoteError,
                              ServerHandshake)

SECRET = b"k" * 32
WELCOME = protocol.Welcome(server="test", boot_id="b")


def run(client: ClientHandshake, server: ServerHandshake, frames_before_welcome: int) -> FrameDecoder:
    """Carry bytes between the two machines until both are done; return the server's decoder (holding what
    the client sent behind the handshake), checking the client never sent more frames than the guard takes."""
    decoder = FrameDecoder(protocol.MAX_HANDSHAKE_FRAME)
    taken = 0
    while not (client.done and server.done):
        decoder.feed(client.data_to_send())
        while not server.done and (message := decoder.next_message()) is not None:
            taken += 1
            server.receive(message)
        answer = FrameDecoder()
        answer.feed(server.data_to_send())
        while (message := answer.next_message()) is not None:
            client.receive(message)
    decoder.feed(client.data_to_send())
    assert taken == frames_before_welcome
    return decoder


@pytest.mark.parametrize("client_secret, server_secret", [(None, None), (SECRET, SECRET), (SECRET, None)],
                         ids=["unix", "tcp", "secret-but-no-proof-asked"])
def test_both_sides_complete_and_the_first_request_follows(client_secret: bytes | None,
                                                           server_secret: bytes | None) -> None:
    request = protocol.Info()
    client = ClientHandshake(hello=protocol.Hello(client="c"), secret=client_secret, then=request)
    server = ServerHandshake(WELCOME, secret=server_secret)
    decoder = run(client, server, ServerHandshake.frames(proof=server_secret is not None))
    assert client.welcome == WELCOME and server.hello == protocol.Hello(client="c")
    decoder.set_max_frame(protocol.MAX_FRAME)  # what the listener does at Welcome
    assert decoder.next_message() == request  # sent once, and only after anything the guard counts
    assert decoder.next_message() is None


def test_a_wrong_secret_is_refused_and_the_client_hears_why() -> None:
    client = ClientHandshake(secret=b"w" * 32)
    server = ServerHandshake(WELCOME, secret=SECRET)
    server.receive(protocol.Hello())
    client.receive(protocol.Challenge(nonce=b"n" * 32))
    with pytest.raises(ProtocolError, match="wrong or missing token proof") as refused:
        server.receive(protocol.Proof(hmac=protocol.proof(b"w" * 32, b"n" * 32)))
    assert refused.value.code == ErrorCode.UNAUTHENTICATED
    with pytest.raises(RemoteError) as heard:
        client.receive(protocol.error(refused.value.code, str(refused.value)))
    assert heard.value.code == ErrorCode.UNAUTHENTICATED


@pytest.mark.parametrize("first, code, text", [
    (None, ErrorCode.BAD_FRAME, "expected Hello first, got nothing"),
    (protocol.Info(), ErrorCode.BAD_FRAME, "expected Hello first, got Info"),
    (protocol.Hello(version=99), ErrorCode.VERSION_MISMATCH, "protocol 99 is not supported"),
])
def test_the_server_refuses_a_bad_start(first: protocol.Message | None, code: ErrorCode, text: str) -> None:
    server = ServerHandshake(WELCOME)
    with pytest.raises(ProtocolError, match=text) as info:
        server.receive(first)
    assert info.value.code == code and not server.done and server.data_to_send() == b""


def test_the_server_takes_nothing_more_once_done() -> None:
    server = ServerHandshake(WELCOME)
    server.receive(protocol.Hello())
    with pytest.raises(ProtocolError) as info:
        server.receive(protocol.Hello())
    assert info.value.code == ErrorCode.UNSUPPORTED


@pytest.mark.parametrize("answer, code", [
    (protocol.Challenge(nonce=b"n"), ErrorCode.UNAUTHENTICATED),  # no secret to prove
    (protocol.Welcome(version=2), ErrorCode.VERSION_MISMATCH),
    (protocol.Ok(), ErrorCode.BAD_FRAME),
])
def test_the_client_refuses_a_bad_answer(answer: protocol.Message, code: ErrorCode) -> None:
    client = ClientHandshake()
    with pytest.raises(ProtocolError) as info:
        client.receive(answer)
    assert info.value.code == code and not client.done


def server_answers(*messages: protocol.Message) -> bytes:
    return b"".join(protocol.encode(m) for m in messages)


def test_a_raw_call_read_as_it_asks_never_takes_a_byte_of_the_raw_stream() -> None:
    call = RawCall(protocol.Connect(path="/run/docker.sock"))
    sent = FrameDecoder()
    sent.feed(call.data_to_send())
    assert sent.next_message() == protocol.Hello()
    assert sent.next_message() == protocol.Connect(path="/run/docker.sock")  # behind the Hello: no secret
    wire = server_answers(WELCOME, protocol.Ok()) + b"HTTP/1.1 200 OK\r\n"
    while not call.done:
        wanted = call.wanted()
        assert wanted > 0
        call.receive_data(wire[:wanted])
        wire = wire[wanted:]
    assert call.reply == protocol.Ok() and call.wanted() == 0
    assert wire == b"HTTP/1.1 200 OK\r\n" and call.trailing_data == b""


def test_a_raw_call_fed_too_much_keeps_the_rest() -> None:
    call = RawCall(protocol.Connect(port=80), secret=SECRET)
    call.data_to_send()
    call.receive_data(server_answers(protocol.Challenge(nonce=b"n" * 32)))
    sent = FrameDecoder()
    sent.feed(call.data_to_send())
    assert sent.next_message() == protocol.Proof(hmac=protocol.proof(SECRET, b"n" * 32))
    assert sent.next_message() == protocol.Connect(port=80)
    call.receive_data(server_answers(WELCOME, protocol.Ok()) + b"raw")
    assert call.done and call.trailing_data == b"raw"


def test_a_raw_call_tells_a_refusal_from_a_failed_call() -> None:
    refused = RawCall(protocol.Connect(port=80))
    with pytest.raises(RemoteError):
        refused.receive_data(server_answers(protocol.error(ErrorCode.UNAUTHENTICATED, "no")))
    assert not refused.handshake.done

    failed = RawCall(protocol.Connect(port=80))
    with pytest.raises(RemoteError) as info:
        failed.receive_data(server_answers(WELCOME, protocol.error(ErrorCode.UNAVAILABLE, "refused")))
    assert failed.handshake.done and info.value.code == ErrorCode.UNAVAILABLE

    confused = RawCall(protocol.Connect(port=80))
    with pytest.raises(ProtocolError, match="answered InfoReply instead of Ok"):
        confused.receive_data(server_answers(WELCOME, protocol.InfoReply(
            protocol=1, boxpark="0", kernel="k", arch="a", hostname="h", boot_id="b", uptime=0.0, pid=1, pid1=True)))


def test_a_raw_call_is_only_for_an_upgrade() -> None:
    with pytest.raises(ValueError, match="unary"):
        RawCall(protocol.Info())
    RawCall(protocol.Exec(argv=["sh"], interactive=True))  # an upgrade, though to frames
