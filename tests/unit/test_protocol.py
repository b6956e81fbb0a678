"""The contract and its codec: round trips, byte-by-byte feeding, limits, errors, the committed schema."""

from __future__ import annotations

import struct
from pathlib import Path

import msgspec
import pytest

from boxpark import protocol
from boxpark.protocol import FrameDecoder, ProtocolError

SAMPLES: list[protocol.Message] = [
    protocol.Hello(client="test", boot_id="b"),
    protocol.Challenge(nonce=b"\x00" * 32),
    protocol.Proof(hmac=b"\x01" * 32),
    protocol.Welcome(server="s"),
    protocol.Error(code=protocol.ErrorCode.NOT_FOUND, message="no such file"),
    protocol.Exec(argv=["echo", "hi"], env={"A": "1"}, cwd="/", stdin=b"\xff\x00", timeout=1.5),
    protocol.ExecResult(code=0, signal=None, stdout=b"hi\n", stderr=b""),
    protocol.Launch(name="svc", argv=["sleep", "1"], connect=True, notify_socket="/run/n"),
    protocol.LogBatch(service="svc", records=[protocol.LogRecord(1, 2, 1, False, b"line")], dropped=3),
    protocol.Exit(code=None, signal=9),
    protocol.NotifyMessage(seq=1, pid=2, uid=0, gid=0, time_ns=5, fields={"READY": "1"}, ready=True),
    protocol.EventFrame(seq=1, time_ns=1, event=protocol.Ready(
        boot_id="b", boxpark="0", kernel="k", arch="x86_64", timeline=[protocol.BootStep("mounts", 5)],
        monotonic_ns=9)),
    protocol.EventFrame(seq=2, time_ns=1, event=protocol.ClockStepped(source="host", offset_ns=-5)),
    protocol.Mount(source="/dev/vdb", target="/data", fstype="ext4", options=["noatime"]),
    protocol.ResizeResult(filesystem="ext4", old_size=1, new_size=2, partition_grown=True, filesystem_grown=True),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: protocol.Message) -> None:
    decoder = FrameDecoder()
    decoder.feed(protocol.encode(message))
    assert decoder.next_message() == message
    assert decoder.next_message() is None


def test_byte_by_byte_and_many_frames_in_one_feed() -> None:
    stream = b"".join(protocol.encode(m) for m in SAMPLES)
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        decoder.feed(stream[i:i + 1])
        while (message := decoder.next_message()) is not None:
            out.append(message)
    assert out == SAMPLES
    decoder.feed(stream)
    assert [decoder.next_message() for _ in SAMPLES] == SAMPLES


def test_every_message_type_has_a_unique_tag_and_docstring() -> None:
    tags = [cls.__struct_config__.tag for cls in protocol.MESSAGE_TYPES]
    assert len(tags) == len(set(tags))
    for cls in protocol.MESSAGE_TYPES:
        assert cls.__doc__ and cls.__doc__.strip(), cls.__name__
    assert set(protocol.REQUEST_TYPES) <= set(protocol.MESSAGE_TYPES)


def test_oversized_length_is_refused_before_reading_the_body() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", protocol.MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="over the"):
        decoder.next_message()


def test_encode_refuses_an_oversized_message() -> None:
    with pytest.raises(ValueError, match="limit"):
        protocol.encode(protocol.WriteFile(path="/x", data=b"x" * (protocol.MAX_FRAME + 1)))


@pytest.mark.parametrize("body, reason", [
    (b"\xc1", "undecodable"),                                       # msgpack's never-used byte
    (msgspec.msgpack.encode({"t": "no_such_call"}), "invalid"),      # unknown tag
    (msgspec.msgpack.encode({"argv": ["x"]}), "invalid"),            # no tag at all
    (msgspec.msgpack.encode({"t": "exec", "argv": "ls -l"}), "invalid"),  # a shell string is not argv
    (msgspec.msgpack.encode({"t": "exec"}), "invalid"),              # missing required field
    (msgspec.msgpack.encode([1, 2, 3]), "invalid"),
])
def test_bad_bodies_raise_the_protocol_error(body: bytes, reason: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError, match=reason) as info:
        decoder.next_message()
    assert info.value.code == protocol.ErrorCode.BAD_FRAME


def test_truncated_frame_waits_for_more() -> None:
    frame = protocol.encode(protocol.Info())
    decoder = FrameDecoder()
    decoder.feed(frame[:-1])
    assert decoder.next_message() is None
    assert decoder.wanted() == 1
    decoder.feed(frame[-1:])
    assert decoder.next_message() == protocol.Info()


def test_detach_returns_bytes_past_the_last_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(protocol.encode(protocol.Ok()) + b"raw bytes")
    assert decoder.next_message() == protocol.Ok()
    assert decoder.detach() == b"raw bytes"


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    body = msgspec.msgpack.encode({"t": "info", "added_in_v2": 1})
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(body)) + body)
    assert decoder.next_message() == protocol.Info()


def test_committed_schema_is_fresh() -> None:
    from boxpark import schema

    committed = Path(__file__).resolve().parents[2] / "docs" / "protocol.schema.json"
    assert committed.read_text() == schema.render(), "run: python -m boxpark.schema"


def test_schema_command_writes_its_argument_and_takes_help_as_a_flag(tmp_path, monkeypatch, capsys) -> None:
    from boxpark import schema

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        schema.main(["--help"])
    assert exit_.value.code == 0 and "JSON Schema" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [], "--help must not be taken for a file name"
    assert schema.main([str(tmp_path / "s.json")]) == 0
    assert (tmp_path / "s.json").read_text() == schema.render()
    assert schema.main([str(tmp_path / "missing" / "s.json")]) == 1
    assert "cannot write" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- the call table


def test_the_call_table_has_every_request_and_only_requests() -> None:
    assert set(protocol.CALLS) == set(protocol.REQUEST_TYPES)
    requests = set(protocol.REQUEST_TYPES)
    for request, spec in protocol.CALLS.items():
        for variant in (spec, spec.switched):
            if variant is None:
                continue
            answers = variant.replies + variant.frames + variant.final + variant.sends
            assert variant.replies and not requests & set(answers), request.__name__
            assert set(answers) <= set(protocol.MESSAGE_TYPES) and protocol.Error not in answers, request.__name__
            assert set(variant.final) <= set(variant.frames), request.__name__
            assert variant.kind is protocol.CallKind.UPGRADE or not (variant.sends or variant.raw), request.__name__
            assert variant.kind is not protocol.CallKind.UNARY or not variant.frames, request.__name__
        if spec.switched is not None:
            assert {f.name: f.type for f in msgspec.structs.fields(request)}[spec.switch] is bool, request.__name__


@pytest.mark.parametrize("request_, kind, replies", [
    (protocol.Exec(argv=["true"]), protocol.CallKind.UNARY, (protocol.ExecResult,)),
    (protocol.Exec(argv=["sh"], interactive=True), protocol.CallKind.UPGRADE, (protocol.Started,)),
    (protocol.Launch(name="s", argv=["x"]), protocol.CallKind.UNARY, (protocol.Launched,)),
    (protocol.Launch(name="s", argv=["x"], connect=True), protocol.CallKind.STREAM, (protocol.Launched,)),
    (protocol.Connect(path="/run/docker.sock"), protocol.CallKind.UPGRADE, (protocol.Ok,)),
    (protocol.Events(), protocol.CallKind.STREAM, (protocol.Ok,)),
], ids=lambda v: v.__class__.__name__ if isinstance(v, protocol.Message) else None)
def test_call_spec_applies_the_flag_that_changes_a_calls_kind(request_: protocol.Message, kind: protocol.CallKind,
                                                              replies: tuple[type, ...]) -> None:
    spec = protocol.call_spec(request_)
    assert spec.kind is kind and spec.replies == replies
    assert spec.owns_connection is (kind is not protocol.CallKind.UNARY)


def test_call_spec_refuses_a_message_that_is_not_a_call() -> None:
    with pytest.raises(ProtocolError, match="Ok is not a call") as info:
        protocol.call_spec(protocol.Ok())
    assert info.value.code == protocol.ErrorCode.UNSUPPORTED


def test_the_schema_carries_the_call_table() -> None:
    calls = protocol.json_schema()["x-calls"]
    assert set(calls) == {cls.__struct_config__.tag for cls in protocol.REQUEST_TYPES}
    assert calls["connect"] == {"kind": "upgrade", "replies": ["ok"], "raw": True}
    assert calls["exec"]["when"]["interactive"]["kind"] == "upgrade"
