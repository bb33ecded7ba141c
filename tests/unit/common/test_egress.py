"""The egress guard: one rule for every outbound URL (webhooks, backup locations' endpoints)."""

from __future__ import annotations

import pytest

from libs.common.egress import EgressRefused, check_resolved, check_url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/", "http:// or https://"),
        ("http:///nohost", "must name a host"),
        ("http://example.com:0/", "port 0"),
        ("http://metadata.google.internal/", "cloud metadata service"),
        ("http://METADATA./", "cloud metadata service"),
        ("http://169.254.169.254/latest/meta-data", "cloud metadata address"),
        ("http://[fd00:ec2::254]/", "cloud metadata address"),
        ("http://100.100.100.200/", "cloud metadata address"),
        ("http://169.254.1.1/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[::ffff:169.254.169.254]/", "cloud metadata address"),
        ("http://0.0.0.0/", "not a unicast address"),
        ("http://224.0.0.1/", "not a unicast address"),
        ("http://example.com/" + "a" * 2100, "at most 2048"),
    ],
)
def test_refused(url: str, why: str) -> None:
    with pytest.raises(EgressRefused, match=why):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9000", "https://localhost/hook", "http://10.0.0.5:8080", "http://[::1]/"],
)
def test_loopback_and_private_networks_are_allowed(url: str) -> None:
    assert check_url(url) == url


async def test_a_host_name_is_judged_by_what_it_resolves_to() -> None:
    await check_resolved("http://localhost:9000/")  # 127.0.0.1 / ::1: allowed
    with pytest.raises(EgressRefused, match="cloud metadata service"):
        await check_resolved("http://metadata/")
