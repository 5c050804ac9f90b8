"""SSRF guard for the fetch stage: connect only to public addresses, unless allow-listed.

Written by hand because img2dataset (and urllib3) have none. The check sits in the
connection itself: the host is resolved once, every address is checked, and the socket is
opened to a checked address, so a redirect or a DNS answer that changes between check and
connect (DNS rebinding) cannot reach a private network or the cloud metadata service.
"""

from __future__ import annotations

import ipaddress
import socket

from urllib3 import connection as urllib3_connection
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddress(Exception):
    """The URL's host resolves to an address we refuse to connect to."""


def why_blocked(ip: IPAddress) -> str | None:
    """The kind of non-public address `ip` is, or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):  # IPv4 inside IPv6 (mapped, 6to4, Teredo) is judged as IPv4
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return why_blocked(embedded)
    for kind in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:  # e.g. 100.64.0.0/10 shared address space, documentation ranges
        return "non-global"
    return None


class AddressGuard:
    """Resolves hosts and refuses non-public addresses, except for allow-listed HOST:PORT."""

    def __init__(self, allow: list[str]):
        self.allow = set()
        for entry in allow:  # HOST:PORT, IPv6 hosts with or without brackets
            host, _, port = entry.rpartition(":")
            self.allow.add((host.strip("[]").lower(), int(port)))

    def resolve(self, host: str, port: int) -> list[str]:
        """Addresses to connect to. Raises BlockedAddress, or socket.gaierror."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if (host.strip("[]").lower(), port) in self.allow:
            return addresses
        for address in addresses:
            kind = why_blocked(ipaddress.ip_address(address.split("%", 1)[0]))
            if kind:  # refuse the whole host: a mixed answer is how rebinding attacks start
                raise BlockedAddress(f"{host}:{port} resolves to {kind} address {address}")
        return addresses


class _GuardedMixin:
    guard: AddressGuard

    def _new_conn(self) -> socket.socket:
        try:
            addresses = self.guard.resolve(self._dns_host, self.port)
        except socket.gaierror as err:
            raise NameResolutionError(self.host, self, err) from err
        last_error: OSError | None = None
        for address in addresses:
            try:
                return urllib3_connection.connection.create_connection(
                    (address, self.port), self.timeout, source_address=self.source_address,
                    socket_options=self.socket_options)
            except TimeoutError as err:
                raise ConnectTimeoutError(self, f"connect to {self.host} timed out") from err
            except OSError as err:
                last_error = err
        raise NewConnectionError(self, f"failed to connect to {self.host}: {last_error}")


def guarded_pool_classes(guard: AddressGuard, http: type[HTTPConnection] = HTTPConnection,
                         https: type[HTTPSConnection] = HTTPSConnection) -> dict[str, type]:
    """urllib3 pool classes for http and https whose connections (of the classes given) go through `guard`."""
    http_conn = type("GuardedHTTPConnection", (_GuardedMixin, http), {"guard": guard})
    https_conn = type("GuardedHTTPSConnection", (_GuardedMixin, https), {"guard": guard})
    return {
        "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }
