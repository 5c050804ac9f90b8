"""The SSRF guard (pipeline.netguard): which addresses are refused, and the HOST:PORT allow-list."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from pipeline.netguard import AddressGuard, BlockedAddress, why_blocked

BLOCKED = [
    "127.0.0.1", "127.255.255.254",  # loopback
    "10.0.0.1", "10.255.255.255",  # 10/8
    "172.16.0.1", "172.31.255.254",  # 172.16/12
    "192.168.0.1", "192.168.255.255",  # 192.168/16
    "169.254.169.254",  # cloud metadata service (link-local)
    "100.64.0.1",  # carrier-grade NAT shared space
    "0.0.0.0",  # unspecified
    "224.0.0.1",  # multicast
    "240.0.0.1",  # reserved
    "::1", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "::",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped IPv6
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "172.32.0.1", "192.169.0.1", "100.128.0.1", "2606:4700:4700::1111",
          "2001:4860:4860::8888", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", BLOCKED)
def test_non_public_addresses_are_blocked(address: str) -> None:
    assert why_blocked(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert why_blocked(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("10.0.0.1", "private"), ("fc00::1", "private"),
    ("100.64.0.1", "non-global"),
])
def test_why_blocked_names_the_kind(address: str, kind: str) -> None:
    assert why_blocked(ipaddress.ip_address(address)) == kind


def test_6to4_address_embedding_a_private_ipv4_is_blocked() -> None:
    assert why_blocked(ipaddress.ip_address("2002:a00:1::")) is not None


# --- AddressGuard.resolve (real resolver: localhost and literal addresses need no network) --------

@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_loopback_host_is_refused_without_allow_list(host: str) -> None:
    with pytest.raises(BlockedAddress, match="loopback"):
        AddressGuard([]).resolve(host, 8080)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_allow_listed_host_and_port_resolves(host: str) -> None:
    addresses = AddressGuard([f"{host}:8080"]).resolve(host, 8080)
    assert "127.0.0.1" in addresses or "::1" in addresses


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_allow_list_port_must_match_exactly(host: str) -> None:
    guard = AddressGuard([f"{host}:8080"])
    for port in (80, 8081, 808):
        with pytest.raises(BlockedAddress):
            guard.resolve(host, port)


def test_allow_list_host_is_case_insensitive() -> None:
    assert AddressGuard(["LocalHost:8080"]).resolve("LOCALHOST", 8080)


def test_allow_listing_one_host_does_not_open_another() -> None:
    with pytest.raises(BlockedAddress):
        AddressGuard(["localhost:8080"]).resolve("127.0.0.1", 8080)


def test_public_literal_address_resolves_to_itself() -> None:
    assert AddressGuard([]).resolve("8.8.8.8", 443) == ["8.8.8.8"]


def test_unresolvable_host_raises_gaierror() -> None:
    with pytest.raises(socket.gaierror):
        AddressGuard([]).resolve("no-such-host.invalid", 80)
