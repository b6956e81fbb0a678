"""`boxpark exec`'s blocking path speaks the contract's frames: each frame it sends is byte for byte what
`protocol.encode` makes of the same message, and it reads every reply `protocol.encode` can make."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from boxpark import protocol
from boxpark.cli import plainexec

ints = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
leaves = st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text() | st.binary()
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(), inner, max_size=20),
                      max_leaves=60)


@given(values)
def test_pack_is_msgspec_msgpack(value: object) -> None:
    assert plainexec.pack(value) == msgspec.msgpack.encode(value)
    assert plainexec.unpack(msgspec.msgpack.encode(value)) == value


@pytest.mark.parametrize("size", [0, 31, 32, 255, 256, 65535, 65536])
def test_lengths_at_every_format_boundary(size: int) -> None:
    for value in ("x" * size, b"x" * size, [0] * size, {str(i): i for i in range(size)}):
        assert plainexec.pack(value) == msgspec.msgpack.encode(value)
        assert plainexec.unpack(msgspec.msgpack.encode(value)) == value


@given(st.binary(max_size=64))
def test_any_bytes_decode_or_are_a_bad_frame(data: bytes) -> None:
    try:
        plainexec.unpack(data)
    except plainexec.GuestError as exc:
        assert exc.code == protocol.ErrorCode.BAD_FRAME


@pytest.mark.parametrize("message, fields", [
    (protocol.Hello(client="boxpark-exec 0.1.0"), {"client": "boxpark-exec 0.1.0"}),
    (protocol.Exec(argv=["true"], env={"PATH": "/bin", "TERM": "xterm"}, cwd="/root", interactive=True),
     {"argv": ["true"], "env": {"PATH": "/bin", "TERM": "xterm"}, "cwd": "/root", "interactive": True}),
    (protocol.Exec(argv=["sh", "-c", "échø $0"], env={}, cwd="/", interactive=True, rows=50, cols=200),
     {"argv": ["sh", "-c", "échø $0"], "env": {}, "cwd": "/", "interactive": True, "rows": 50, "cols": 200}),
    (protocol.Stdin(eof=True), {"eof": True}),
    (protocol.Proof(hmac=bytes(range(32))), {"hmac": bytes(range(32))}),
])
def test_each_frame_sent_is_the_contracts(message: protocol.Message, fields: dict[str, object]) -> None:
    assert plainexec.frame(message.__struct_config__.tag, **fields) == protocol.encode(message)  # type: ignore[arg-type]


@pytest.mark.parametrize("message", [
    protocol.Welcome(server="boxpark-guest 0.1.0", boot_id="b" * 36),
    protocol.Challenge(nonce=bytes(range(32))),
    protocol.Started(pid=4242),
    protocol.Output(fd=1, data=b"out\n"),
    protocol.Output(fd=2, data=bytes(range(256)) * 1024),
    protocol.Exit(code=0),
    protocol.Exit(code=None, signal=9),
    protocol.Error(code=protocol.ErrorCode.NOT_FOUND, message="cannot start 'nope': no such program"),
])
def test_each_reply_read_is_the_contracts(message: protocol.Message) -> None:
    body = protocol.encode(message)[4:]
    assert plainexec.unpack(body) == msgspec.to_builtins(message, builtin_types=(bytes,))


def test_the_constants_are_the_contracts() -> None:
    assert plainexec.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION
    assert plainexec.MAX_FRAME == protocol.MAX_FRAME
    assert plainexec.ERROR_NAMES == {code.value: code.name for code in protocol.ErrorCode}
    assert plainexec.proof(b"secret", b"nonce") == protocol.proof(b"secret", b"nonce")
