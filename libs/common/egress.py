"""The egress guard: where Nest may send a request to a URL a user gave it (webhooks, backup
locations' S3 endpoints), so that URL cannot be turned against the host's metadata service.

One rule for every outbound URL: http(s) with a host and a port other than 0, at most 2,048
characters; never a cloud-metadata host name, never a cloud-metadata, link-local, unspecified
or multicast address, checked on the URL's text (`check_url`) and again on every address its
host name resolves to right before use (`check_resolved`). Loopback and private ranges stay
allowed: an appliance on a private network talks to receivers and stores on that network.
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
"""Host names of cloud metadata services (lower case, without a trailing dot)."""

METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
        ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)
"""Addresses of cloud metadata services outside the link-local ranges."""

LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
MAX_URL_LENGTH = 2048

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class EgressRefused(ValueError):
    """The URL, or an address its host resolves to, may not be sent to; the message says why
    (it reads after the name of what was refused: "must be an http:// or https:// URL")."""


def refused_address(address: Address) -> str | None:
    """Why requests may not go to this address, or None."""
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
    """The URL if requests may go to it, judged on its text; raises EgressRefused saying why
    not. A host name is checked again on what it resolves to by `check_resolved`."""
    if len(url) > MAX_URL_LENGTH:
        raise EgressRefused(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise EgressRefused(f"is not a valid URL: {exc}") from None
    if parts.scheme not in {"http", "https"}:
        raise EgressRefused("must be an http:// or https:// URL")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise EgressRefused("must name a host")
    if port == 0:
        raise EgressRefused("must not use port 0")
    if host in METADATA_HOSTS:
        raise EgressRefused("must not point at a cloud metadata service")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return url
    reason = refused_address(address)
    if reason:
        raise EgressRefused(f"host {reason}")
    return url


async def check_resolved(url: str) -> None:
    """Refuse a URL whose host name resolves to a refused address (raises EgressRefused); the
    URL's text is checked first (`check_url`). DNS failures raise OSError: retry later."""
    check_url(url)
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return  # a literal address, judged by check_url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        reason = refused_address(address)
        if reason:
            raise EgressRefused(f"{host} resolves to {address}, which {reason}")
