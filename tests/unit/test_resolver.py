"""The host's resolver for the guest: the extra hosts file, getaddrinfo's outcomes mapped to found, NXDOMAIN,
no data and failure. Only the hosts files written here and the machine's own `localhost` are resolved: no
name leaves the machine."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from boxpark.host import resolver
from boxpark.host.resolver import HostsFile, resolve


def test_a_name_only_in_the_hosts_file_resolves_by_family(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# a comment\n192.0.2.10 Only.Host.Test alias.test  # trailing\n"
                     "2001:db8::10 only.host.test\nnot-an-address junk.test\n192.0.2.11\n")
    file = HostsFile(hosts)
    a = resolve("only.host.test", resolver.TYPE_A, file)
    assert (a.status, a.addresses) == ("found", ["192.0.2.10"])
    aaaa = resolve("ONLY.host.test", resolver.TYPE_AAAA, file)
    assert (aaaa.status, aaaa.addresses) == ("found", ["2001:db8::10"])
    v4_only = resolve("alias.test", resolver.TYPE_AAAA, file)
    assert (v4_only.status, v4_only.addresses) == ("found", [])  # the name exists: no data, not NXDOMAIN
    assert file.lookup("junk.test") is None


def test_the_hosts_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    file = HostsFile(hosts)
    assert file.lookup("later.test") is None  # no file yet: nothing listed
    hosts.write_text("192.0.2.20 later.test\n")
    assert file.lookup("later.test") == ["192.0.2.20"]
    hosts.write_text("192.0.2.21 later.test other.test\n")
    os.utime(hosts, ns=(1, 1))  # a different stamp even within the filesystem's time granularity
    assert file.lookup("later.test") == ["192.0.2.21"] and file.lookup("other.test") == ["192.0.2.21"]


def test_names_the_file_lacks_go_to_the_hosts_own_resolver(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.30 other.test\n")
    local = resolve("localhost", resolver.TYPE_A, HostsFile(hosts))  # the machine's /etc/hosts
    assert local.status == "found" and "127.0.0.1" in local.addresses


@pytest.mark.parametrize("errno, status", [(socket.EAI_NONAME, "nxdomain"),
                                           (getattr(socket, "EAI_NODATA", -5), "nodata"),
                                           (socket.EAI_AGAIN, "failed"), (socket.EAI_FAIL, "failed")])
def test_getaddrinfo_errors_map_to_dns_outcomes(monkeypatch: pytest.MonkeyPatch, errno: int, status: str) -> None:
    # faked: a real NXDOMAIN or SERVFAIL would need a DNS server past this machine, which tests never reach
    def failing(*args: object) -> None:
        raise socket.gaierror(errno, "faked")

    monkeypatch.setattr(socket, "getaddrinfo", failing)
    assert resolve("whatever.test", resolver.TYPE_A).status == status


def test_other_types_and_bad_names_fail_so_the_guest_asks_the_network() -> None:
    assert resolve("localhost", 15).status == "failed"  # MX
    assert resolve("", resolver.TYPE_A).status == "failed"
    assert resolve("a" * 300, resolver.TYPE_A).status == "failed"


def test_reverse_names_give_their_address() -> None:
    assert resolver.reverse_address("10.2.0.192.in-addr.arpa") == "192.0.2.10"
    six = ".".join(reversed("20010db8000000000000000000000010")) + ".ip6.arpa."
    assert resolver.reverse_address(six) == "2001:db8::10"
    for bad in ("2.0.192.in-addr.arpa", "300.2.0.192.in-addr.arpa", "x.2.0.192.in-addr.arpa", "ip6.arpa",
                "1.0.ip6.arpa", "example.test"):
        assert resolver.reverse_address(bad) is None, bad


def test_ptr_from_the_hosts_file_then_the_hosts_resolver(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.10 first.test second.test\n192.0.2.10 third.test\n")
    file = HostsFile(hosts)
    assert resolve("10.2.0.192.in-addr.arpa", resolver.TYPE_PTR, file).names == ["first.test"]
    local = resolve("1.0.0.127.in-addr.arpa", resolver.TYPE_PTR, file)  # the machine's /etc/hosts
    assert local.status == "found" and local.names and local.names[0]
    assert resolve("2.0.192.in-addr.arpa", resolver.TYPE_PTR, file).status == "failed"  # a zone, not an address


def test_ptr_errors_map_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # faked, as above: a real NXDOMAIN for a reverse name would need a DNS server past this machine
    def failing(*args: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "faked")

    monkeypatch.setattr(socket, "getnameinfo", failing)
    assert resolve("10.2.0.192.in-addr.arpa", resolver.TYPE_PTR).status == "nxdomain"
