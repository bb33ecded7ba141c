"""Where a webhook may send: http(s) URLs, never link-local or cloud-metadata addresses.

Checked when a webhook is written (a 422 naming `spec.url`) and again before each delivery on
the addresses the host name resolves to. Loopback and private ranges stay allowed: an appliance
on a private network delivers to receivers on that network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.com",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("fd00:ec2::254"),
        ipaddress.ip_address("100.100.100.200"),
    }
)
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
MAX_URL_LENGTH = 2048


class RefusedTarget(ValueError):
    """The URL or the address it resolves to may not receive webhooks."""


def refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why this address is refused, or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "is a cloud metadata address"
    if any(address in network for network in LINK_LOCAL):
        return "is a link-local address"
    if address.is_unspecified or address.is_multicast:
        return "is not a unicast address"
    return None


def check_url(url: str) -> str:
    """The URL if a webhook may point at it; raises RefusedTarget saying why not."""
    if len(url) > MAX_URL_LENGTH:
        raise RefusedTarget(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RefusedTarget(f"is not a valid URL: {exc}") from None
    if parts.scheme not in {"http", "https"}:
        raise RefusedTarget("must be an http:// or https:// URL")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise RefusedTarget("must name a host")
    if port == 0:
        raise RefusedTarget("must not use port 0")
    if host in METADATA_HOSTS:
        raise RefusedTarget("must not point at a cloud metadata service")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return url
    reason = refused_address(address)
    if reason:
        raise RefusedTarget(f"host {reason}")
    return url


async def check_resolved(url: str) -> None:
    """Refuse a host name that resolves to a forbidden address (raises RefusedTarget).

    DNS failures raise OSError (a retryable delivery error)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
    )
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        reason = refused_address(address)
        if reason:
            raise RefusedTarget(f"{host} resolves to {address}, which {reason}")
