"""sd_notify parsing (pure): the systemd protocol's keys, raw fields, malformed input never raising."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from boxpark.guest.notify import parse_notify
from boxpark.protocol import NotifyMessage, decode_body, encode


def test_ready_with_status_and_mainpid() -> None:
    message = parse_notify(b"READY=1\nSTATUS=Processing requests...\nMAINPID=4711\n", seq=3, pid=9, uid=1, gid=2,
                           time_ns=5)
    assert message.ready and not message.stopping and not message.reloading and not message.watchdog
    assert message.status == "Processing requests..."
    assert message.mainpid == 4711
    assert (message.seq, message.pid, message.uid, message.gid, message.time_ns) == (3, 9, 1, 2, 5)
    assert message.fields == {"READY": "1", "STATUS": "Processing requests...", "MAINPID": "4711"}


def test_each_flag() -> None:
    assert parse_notify(b"RELOADING=1").reloading
    assert parse_notify(b"STOPPING=1").stopping
    assert parse_notify(b"WATCHDOG=1").watchdog
    assert parse_notify(b"READY=1").ready


def test_watchdog_trigger_is_not_a_keepalive() -> None:
    message = parse_notify(b"WATCHDOG=trigger")
    assert not message.watchdog
    assert message.fields == {"WATCHDOG": "trigger"}


def test_numbers() -> None:
    message = parse_notify(b"ERRNO=2\nEXTEND_TIMEOUT_USEC=5000000")
    assert message.errno == 2 and message.extend_timeout_usec == 5_000_000


def test_bad_numbers_stay_raw_only() -> None:
    message = parse_notify(b"MAINPID=0\nERRNO=-1\nEXTEND_TIMEOUT_USEC=soon\nMAINPID=12")
    assert message.mainpid is None  # 0 is no pid; the first MAINPID wins, as in systemd
    assert message.errno is None and message.extend_timeout_usec is None
    assert message.fields == {"MAINPID": "0", "ERRNO": "-1", "EXTEND_TIMEOUT_USEC": "soon"}


def test_flags_need_exactly_one() -> None:
    message = parse_notify(b"READY=0\nSTOPPING=yes\nRELOADING=11")
    assert not (message.ready or message.stopping or message.reloading)
    assert message.fields == {"READY": "0", "STOPPING": "yes", "RELOADING": "11"}


def test_a_later_ready_line_still_counts() -> None:
    assert parse_notify(b"READY=0\nREADY=1").ready


def test_malformed_lines_are_skipped() -> None:
    datagram = b"no equals sign\n=empty key\nbad key=1\nSTATUS=ok\n\xff\xfe=1\nX=\xff\nNUL=a\x00b\n\nREADY=1"
    message = parse_notify(datagram)
    assert message.fields == {"STATUS": "ok", "READY": "1"}
    assert message.ready and message.status == "ok"


def test_empty_values_and_values_with_equals() -> None:
    message = parse_notify(b"STATUS=\nFDNAME=a=b")
    assert message.status == ""
    assert message.fields == {"STATUS": "", "FDNAME": "a=b"}


def test_unknown_keys_are_kept_raw() -> None:
    message = parse_notify(b"FDSTORE=1\nFDNAME=sock\nX_CUSTOM=value")
    assert message.fields == {"FDSTORE": "1", "FDNAME": "sock", "X_CUSTOM": "value"}


def test_utf8_status() -> None:
    assert parse_notify("STATUS=überall ✓".encode()).status == "überall ✓"


@given(st.binary(max_size=512))
def test_any_bytes_parse_and_round_trip_the_wire(datagram: bytes) -> None:
    message = parse_notify(datagram, seq=1)
    assert isinstance(message, NotifyMessage)
    for key, value in message.fields.items():
        assert key and "=" not in key and "\n" not in key and "\n" not in value and "\0" not in value
    assert decode_body(encode(message)[4:]) == message


@given(st.lists(st.tuples(st.from_regex(r"[A-Z_][A-Z0-9_]{0,12}", fullmatch=True),
                          st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\0"),
                                  max_size=20)), max_size=8))
def test_well_formed_lines_all_reach_fields(pairs: list[tuple[str, str]]) -> None:
    datagram = "\n".join(f"{key}={value}" for key, value in pairs).encode()
    message = parse_notify(datagram)
    expected: dict[str, str] = {}
    for key, value in pairs:
        expected.setdefault(key, value)
    assert message.fields == expected
