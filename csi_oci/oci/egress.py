"""Where the driver may connect: the egress policy for registries, mirrors, realms, redirects.

A pod author names the registry, and that registry names token realms and
redirect targets, so every address the driver connects to is chosen by the
attacker. From a node, some addresses are worth more than any registry: the
cloud metadata service (169.254.169.254, fd00:ec2::254) hands out the node's
cloud credentials, and link-local addresses reach node-local agents. So:

  * every connection's *peer address* is checked after DNS resolution, on
    the socket itself (a name that resolves, or re-resolves, to a refused
    address is refused too), against a deny list (link-local and cloud
    metadata by default, more from `[egress] deny`) with exceptions
    (`[egress] allow`);
  * redirects may only go to http(s), never from https down to http
    (checked by the session, csi_oci.oci.registry);
  * token realms are held to the same rules, and credentials go to a realm
    only on the registry's own host or one configured for it.

Requests through an HTTP(S) proxy from the environment connect to the proxy,
so only the proxy's address is checked: the proxy is the operator's.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

import grpc
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from csi_oci.errors import CsiOciError, RegistryError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Refused unless allowed: link-local (IPv4 and IPv6: 169.254.169.254 is the
# metadata service of AWS, GCP, Azure, OpenStack...), AWS's IPv6 metadata
# address, Alibaba Cloud's metadata address and Azure's wire server.
DEFAULT_DENY = (
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
    "168.63.129.16/32",
)


class EgressRefused(RegistryError):
    """A connection or redirect the egress policy does not allow; never retried."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "egress_refused"


def parse_networks(values: object, where: str) -> tuple[IPNetwork, ...]:
    if not isinstance(values, list | tuple):
        raise ValueError(f"{where} must be an array of addresses or CIDR ranges")
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(str(value), strict=False))
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not an address or CIDR range") from None
    return tuple(out)


@dataclass(frozen=True)
class EgressPolicy:
    """Addresses the driver must not connect to (`deny`), with exceptions (`allow`)."""

    deny: tuple[IPNetwork, ...] = parse_networks(DEFAULT_DENY, "default deny list")
    allow: tuple[IPNetwork, ...] = ()

    def refuses(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
        except ValueError:
            return True  # not an address we can judge: fail closed
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
        if any(ip in net for net in self.allow):
            return False
        return any(ip in net for net in self.deny)

    def check_peer(self, sock: socket.socket, host: str) -> None:
        peer = sock.getpeername()[0]
        if self.refuses(peer):
            raise EgressRefused(
                f"refusing to connect to {host} ({peer}): link-local and cloud metadata "
                "addresses are never registries, mirrors or token services (allow it under "
                "[egress] in --registry-config if this one really is)"
            )


def check_redirect(from_url: str, to_url: str) -> None:
    """A redirect stays on http(s) and never goes from https to http."""
    target = urlsplit(to_url)
    if target.scheme not in ("http", "https") or not target.netloc:
        raise EgressRefused(f"refusing a redirect to {_safe(to_url)!r}: not an http(s) URL")
    if urlsplit(from_url).scheme == "https" and target.scheme == "http":
        raise EgressRefused(
            f"refusing a redirect from {urlsplit(from_url).netloc} to plain-http "
            f"{target.netloc}: https is never downgraded"
        )


def _safe(url: str) -> str:
    """A URL for a message: no query string (presigned URLs carry credentials there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"[:200] if parts.netloc else url[:60]


class _Guarded:
    """Mixed into urllib3's connections: the peer is checked before any byte is sent."""

    egress: ClassVar[EgressPolicy]
    host: str

    def _new_conn(self) -> socket.socket:
        # ignore: a mixin's super() is urllib3's HTTP(S)Connection, which mypy cannot see.
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        try:
            self.egress.check_peer(sock, self.host)
        except CsiOciError:
            sock.close()
            raise
        return sock


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connections obey `policy` (one class pair per policy)."""

    def __init__(self, policy: EgressPolicy, **kwargs: Any) -> None:
        self._policy = policy
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        http_conn = type(
            "GuardedHTTPConnection", (_Guarded, HTTPConnection), {"egress": self._policy}
        )
        https_conn = type(
            "GuardedHTTPSConnection", (_Guarded, HTTPSConnection), {"egress": self._policy}
        )
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type(
                "GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}
            ),
        }


__all__ = [
    "DEFAULT_DENY",
    "EgressPolicy",
    "EgressRefused",
    "GuardedAdapter",
    "check_redirect",
    "parse_networks",
]
