"""Which host address a published port listens on, and where in the guest its connections go."""

from __future__ import annotations

from boxpark.host.ports import Binding, Listen, bindings_of, listen_for


def test_bindings_of_lists_only_published_ports() -> None:
    container = {"Id": "c0ffee" * 10, "Names": ["/web"], "Ports": [
        {"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 18080, "Type": "tcp"},
        {"IP": "::", "PrivatePort": 80, "PublicPort": 18080, "Type": "tcp"},
        {"PrivatePort": 443, "Type": "tcp"},  # exposed, not published
        {"IP": "127.0.0.1", "PrivatePort": 53, "PublicPort": 5353, "Type": "udp"},
        {"IP": "0.0.0.0", "PrivatePort": 9, "PublicPort": 9999, "Type": "sctp"},
    ]}
    assert bindings_of(container) == [Binding("tcp", "0.0.0.0", 18080, "web"), Binding("tcp", "::", 18080, "web"),
                                      Binding("udp", "127.0.0.1", 5353, "web")]
    assert bindings_of({"Id": "abcdef0123456789", "Ports": None}) == []


def test_wildcards_listen_on_loopback_unless_all_interfaces_are_allowed() -> None:
    pair = [Binding("tcp", "0.0.0.0", 8080, "w"), Binding("tcp", "::", 8080, "w")]
    assert [listen_for(b, pair, False) for b in pair] == [Listen("tcp", "127.0.0.1", 8080, "127.0.0.1"),
                                                          Listen("tcp", "::1", 8080, "127.0.0.1")]
    assert [listen_for(b, pair, True) for b in pair] == [Listen("tcp", "0.0.0.0", 8080, "127.0.0.1"),
                                                         Listen("tcp", "::", 8080, "127.0.0.1")]


def test_an_ipv6_only_binding_goes_to_the_guests_ipv6_loopback() -> None:
    only = [Binding("udp", "::", 53, "dns")]
    assert listen_for(only[0], only, False) == Listen("udp", "::1", 53, "::1")


def test_explicit_addresses() -> None:
    local = Binding("tcp", "127.0.0.1", 5432, "db")
    assert listen_for(local, [local], True) == Listen("tcp", "127.0.0.1", 5432, "127.0.0.1")
    guest_ip = Binding("tcp", "10.0.2.15", 8000, "app")  # one of the guest's addresses, not the host's
    assert listen_for(guest_ip, [guest_ip], False) == Listen("tcp", "127.0.0.1", 8000, "10.0.2.15")
    odd = Binding("tcp", "not-an-ip", 8000, "app")
    assert listen_for(odd, [odd], False) == Listen("tcp", "127.0.0.1", 8000, "127.0.0.1")
