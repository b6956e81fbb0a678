"""The Docker service's pure parts: the restart policy, the rotating log, dockerd's error line."""

from __future__ import annotations

from pathlib import Path

from boxpark import protocol
from boxpark.host.service import RestartPolicy, RotatingLog, _error_line


def test_the_restart_delay_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(initial=1.0, maximum=30.0, healthy=60.0)
    assert [policy.delay(ready_for=0) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_run_that_stayed_ready_long_enough_starts_the_delay_over() -> None:
    policy = RestartPolicy(initial=0.5, maximum=8.0, healthy=60.0)
    assert [policy.delay(0), policy.delay(5), policy.delay(59.9)] == [0.5, 1, 2]  # short runs keep doubling
    assert policy.delay(60.0) == 0.5  # a healthy run: from the start
    assert policy.delay(0) == 1


def record(seq: int, data: bytes, stream: int = 1) -> protocol.LogRecord:
    return protocol.LogRecord(seq=seq, time_ns=1_700_000_000_000_000_000 + seq, stream=stream, data=data, partial=False)


def test_the_log_rolls_over_at_its_size_and_keeps_its_number_of_files(tmp_path: Path) -> None:
    path = tmp_path / "docker.log"
    log = RotatingLog(path, limit=4096, keep=2)
    line = b"x" * 100
    for seq in range(1, 501):  # ~65 KiB through a 4 KiB log
        log.write_records([record(seq, line + str(seq).encode())])
    log.note("the end")
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["docker.log", "docker.log.1", "docker.log.2"], files
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 4096 + 200, (p.name, p.stat().st_size)  # one record past the limit at most
    newest, older = (tmp_path / "docker.log").read_bytes(), (tmp_path / "docker.log.1").read_bytes()
    assert b"the end" in newest and newest.count(b"x" * 100) < 500
    assert older.rsplit(b"\n", 2)[-2].endswith(b"x" * 100 + b"%d" % last_seq(newest, older))


def last_seq(newest: bytes, older: bytes) -> int:
    """The record written just before the newest file began: one less than its first."""
    first = newest.split(b"\n", 1)[0]
    return int(first.rsplit(b"x", 1)[1]) - 1


def test_no_kept_files_means_the_log_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "docker.log"
    log = RotatingLog(path, limit=4096, keep=0)
    for seq in range(1, 200):
        log.write_records([record(seq, b"y" * 100)])
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["docker.log"] and path.stat().st_size <= 4096 + 200


def test_dockerds_error_line_is_its_message() -> None:
    assert _error_line(b'time="2024-01-01T00:00:00Z" level=info msg="Starting up"') == ""
    assert _error_line(b'time="x" level=fatal msg="failed to start daemon: \\"x\\" is bad" x=1') == \
        'failed to start daemon: "x" is bad'
    plain = (b"unable to configure the Docker daemon with file /etc/docker/daemon.json: the following "
             b"directives don't match any configuration option: frobnicate\n")
    assert _error_line(plain) == plain.decode().strip()
