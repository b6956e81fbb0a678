"""The handshake, and the client side of an upgrade call, as sans-IO state machines (h11's `Connection` is the model).

Each object takes what the peer sent and hands back the bytes to send; it never touches a socket, a clock or
a task, so `transport` drives the same objects from asyncio and from a thread. Whatever the peer sends
either advances it or raises `ProtocolError` (the peer broke the protocol; its `code` says how) or
`RemoteError` (the peer answered with an `Error`) — nothing else, the invariant the fuzz tests hold them to.

The handshake (DESIGN.md §3): the client sends `Hello`; a server that asks for a proof answers `Challenge`
and the client sends `Proof`, an HMAC of the nonce keyed with the machine's secret (the secret never crosses
the wire); the server answers `Welcome`, or an `Error` and closes. A client may send its first request right
behind the handshake, saving a round trip on every new connection: behind `Hello` when it has no secret (no
proof can be asked of it), else behind its `Proof`, or on `Welcome` when none was asked — never before a
`Proof`, which the server would take the request for.
"""

from __future__ import annotations

import os
from _operator import _compare_digest  # hmac.compare_digest itself, without hmac's import of OpenSSL

from .calls import CallKind, call_spec
from .codec import FrameDecoder, encode
from .messages import (PROTOCOL_VERSION, Challenge, Error, ErrorCode, Hello, Message, Proof, ProtocolError,
                       RemoteError, Welcome)

__all__ = ["proof", "ClientHandshake", "ServerHandshake", "RawCall"]


def proof(secret: bytes, nonce: bytes) -> bytes:
    """The token proof: HMAC-SHA256 of the server's nonce, keyed with the machine's secret."""
    # imported here, not at the top: hashlib loads OpenSSL (8 ms of the guest's boot on a loaded 2-core
    # host), which a machine without a secret (the sandbox) never needs, and one with a secret not before Ready
    import hashlib
    import hmac

    return hmac.new(secret, b"boxpark-proof-v1\0" + nonce, hashlib.sha256).digest()


class ClientHandshake:
    """The dialing side: `data_to_send()`, then `receive(message)` for each server message until `welcome`.

    `then` is the first request, sent as early as the handshake allows (see the module's docstring); its
    reply follows the `Welcome`. An `Error` from the server raises `RemoteError`: the connection was refused.
    """

    __slots__ = ("welcome", "_secret", "_then", "_out", "_challenged")

    def __init__(self, *, hello: Hello | None = None, secret: bytes | None = None,
                 then: Message | None = None) -> None:
        self.welcome: Welcome | None = None
        self._secret = secret
        self._then = then
        self._out = encode(hello or Hello())
        self._challenged = False
        if then is not None and not secret:
            self._send_then()

    @property
    def done(self) -> bool:
        return self.welcome is not None

    def data_to_send(self) -> bytes:
        data, self._out = self._out, b""
        return data

    def receive(self, message: Message) -> None:
        if self.welcome is not None:
            raise ProtocolError(f"{type(message).__name__} is not part of the handshake, which is over",
                                ErrorCode.UNSUPPORTED)
        if isinstance(message, Error):
            raise RemoteError(message.code, message.message)
        if isinstance(message, Challenge) and not self._challenged:
            if not self._secret:
                raise ProtocolError("the server asks for a token proof and no secret was given",
                                    ErrorCode.UNAUTHENTICATED)
            self._challenged = True
            self._out += encode(Proof(hmac=proof(self._secret, message.nonce)))
            self._send_then()
        elif isinstance(message, Welcome):
            if message.version != PROTOCOL_VERSION:
                raise ProtocolError(f"the server speaks protocol {message.version}, this side {PROTOCOL_VERSION}",
                                    ErrorCode.VERSION_MISMATCH)
            self.welcome = message
            self._send_then()  # a server that asked for no proof although we hold a secret
        else:
            raise ProtocolError(f"expected Welcome or Challenge, got {type(message).__name__}")

    def _send_then(self) -> None:
        if self._then is not None:
            self._out += encode(self._then)
            self._then = None


class ServerHandshake:
    """The listening side: `receive(message)` for each client message (None: the end of its stream), sending
    `data_to_send()` after each, until `done`; then `hello` says who dialed.

    With a `secret` it asks for a proof. A peer that breaks the handshake raises `ProtocolError`: reply
    `Error(exc.code, str(exc))` and close.
    """

    __slots__ = ("hello", "done", "_welcome", "_secret", "_nonce", "_out")

    def __init__(self, welcome: Welcome, *, secret: bytes | None = None, nonce: bytes | None = None) -> None:
        self.hello: Hello | None = None
        self.done = False
        self._welcome = welcome
        self._secret = secret or None
        self._nonce = None if self._secret is None else nonce or os.urandom(32)
        self._out = b""

    @staticmethod
    def frames(proof: bool) -> int:
        """How many frames a client sends before `Welcome` (`Hello`, and `Proof` when one is asked for): a
        listener decodes no more until then."""
        return 2 if proof else 1

    def data_to_send(self) -> bytes:
        data, self._out = self._out, b""
        return data

    def receive(self, message: Message | None) -> None:
        if self.done:
            raise ProtocolError("the handshake is over", ErrorCode.UNSUPPORTED)
        if self.hello is None:
            if not isinstance(message, Hello):
                what = "nothing" if message is None else type(message).__name__
                raise ProtocolError(f"expected Hello first, got {what}")
            if message.version != PROTOCOL_VERSION:
                raise ProtocolError(f"protocol {message.version} is not supported; this side speaks "
                                    f"{PROTOCOL_VERSION}", ErrorCode.VERSION_MISMATCH)
            self.hello = message
            if self._secret is not None and self._nonce is not None:
                self._out += encode(Challenge(nonce=self._nonce))
                return
        elif (not isinstance(message, Proof) or self._secret is None or self._nonce is None
              or not _compare_digest(message.hmac, proof(self._secret, self._nonce))):
            raise ProtocolError("wrong or missing token proof", ErrorCode.UNAUTHENTICATED)
        self.done = True
        self._out += encode(self._welcome)


class RawCall:
    """The client side of one upgrade call (e.g. `Connect`) on a connection of its own, handshake included.

    `data_to_send()`; read at most `wanted()` bytes and `receive_data` them; repeat until `done` (then
    `reply` is the go-ahead and the connection carries the call's own traffic). Reading no more than
    `wanted()` never takes a byte of that traffic; bytes fed past the reply are kept in `trailing_data`.
    """

    __slots__ = ("handshake", "reply", "_replies", "_decoder")

    def __init__(self, request: Message, *, hello: Hello | None = None, secret: bytes | None = None) -> None:
        spec = call_spec(request)
        if spec.kind is not CallKind.UPGRADE:
            raise ValueError(f"{type(request).__name__} is a {spec.kind.value} call, not an upgrade")
        self._replies = spec.replies
        self.handshake = ClientHandshake(hello=hello, secret=secret, then=request)
        self.reply: Message | None = None
        self._decoder = FrameDecoder()

    @property
    def done(self) -> bool:
        return self.reply is not None

    def data_to_send(self) -> bytes:
        return self.handshake.data_to_send()

    def wanted(self) -> int:
        return 0 if self.reply is not None else self._decoder.wanted()

    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)
        while self.reply is None and (message := self._decoder.next_message()) is not None:
            if not self.handshake.done:
                self.handshake.receive(message)
            elif isinstance(message, Error):
                raise RemoteError(message.code, message.message)
            elif isinstance(message, self._replies):
                self.reply = message
            else:
                expected = " or ".join(t.__name__ for t in self._replies)
                raise ProtocolError(f"the server answered {type(message).__name__} instead of {expected}")

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the reply (the start of the upgraded traffic); taken once."""
        return self._decoder.detach() if self.reply is not None else b""
