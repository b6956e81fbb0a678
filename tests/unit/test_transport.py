"""Address parsing, the secret file and the token proof (pure logic; the live handshake is integration)."""

from __future__ import annotations

import os

import pytest

from boxpark.transport import Address, TransportError, parse_address, proof, read_secret, write_secret


@pytest.mark.parametrize("text, expected", [
    ("unix:/run/boxpark/api.sock", Address("unix", path="/run/boxpark/api.sock")),
    ("vsock:3:1024", Address("vsock", cid=3, port=1024)),
    ("tcp:127.0.0.1:8080", Address("tcp", host="127.0.0.1", port=8080)),
    ("tcp:[::1]:22", Address("tcp", host="::1", port=22)),
    ("tcp:localhost:1", Address("tcp", host="localhost", port=1)),
])
def test_parse_and_print_round_trip(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text, fragment", [
    ("", "expected"), ("unix:", "expected"), ("/tmp/x", "expected"), ("http://x", "unknown kind"),
    ("vsock:3", "CID:PORT"), ("vsock:a:1", "numbers"), ("tcp:host", "HOST:PORT"), ("tcp:h:70000", "out of range"),
    ("tcp::1:22", "HOST:PORT"),
])
def test_bad_addresses_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(TransportError, match=fragment):
        parse_address(text)


def test_only_tcp_needs_a_secret() -> None:
    assert parse_address("tcp:127.0.0.1:1").needs_secret
    assert not parse_address("unix:/x").needs_secret
    assert not parse_address("vsock:3:1").needs_secret


def test_secret_file_round_trip_and_permissions(tmp_path) -> None:
    path = str(tmp_path / "secret")
    secret = write_secret(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_secret(path) == secret
    os.chmod(path, 0o644)
    with pytest.raises(TransportError, match="readable by others"):
        read_secret(path)
    with pytest.raises(TransportError, match="cannot read"):
        read_secret(str(tmp_path / "missing"))


def test_proof_depends_on_secret_and_nonce() -> None:
    assert proof(b"s" * 32, b"n1") == proof(b"s" * 32, b"n1")
    assert proof(b"s" * 32, b"n1") != proof(b"s" * 32, b"n2")
    assert proof(b"s" * 32, b"n1") != proof(b"t" * 32, b"n1")
    assert b"s" * 32 not in proof(b"s" * 32, b"n1")
