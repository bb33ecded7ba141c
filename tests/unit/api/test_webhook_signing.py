"""Webhook signatures (what receivers verify), target URL rules and retry classification."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from services.api.webhooks.delivery import backoff, classify
from services.api.webhooks.signing import sign, signature, verify_signature
from services.api.webhooks.targets import RefusedTarget, check_url

SECRET = "whsec_test-secret-0123456789"
BODY = b'{"specversion":"1.0","id":"e1","type":"io.nest.cluster.deleted.v1"}'
NOW = 1_800_000_000


class TestSignature:
    def test_header_is_stripe_style_hmac_of_timestamp_dot_body(self) -> None:
        header = sign(SECRET, BODY, NOW)
        expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256)
        assert header == f"t={NOW},v1={expected.hexdigest()}"
        assert signature(SECRET, NOW, BODY) == expected.hexdigest()

    def test_verifies_within_tolerance(self) -> None:
        header = sign(SECRET, BODY, NOW)
        assert verify_signature(SECRET, header, BODY, tolerance=300, now=NOW + 299)
        assert verify_signature(SECRET, header, BODY, tolerance=300, now=NOW - 299)

    def test_refuses_tampering_wrong_secret_and_replays(self) -> None:
        header = sign(SECRET, BODY, NOW)
        assert not verify_signature(SECRET, header, BODY + b" ", now=NOW)
        assert not verify_signature(SECRET + "x", header, BODY, now=NOW)
        assert not verify_signature(SECRET, header, BODY, tolerance=300, now=NOW + 301)
        # Moving the timestamp breaks the MAC, so a replay cannot be refreshed.
        forged = header.replace(f"t={NOW}", f"t={NOW + 1000}")
        assert not verify_signature(SECRET, forged, BODY, now=NOW + 1000)

    @pytest.mark.parametrize(
        "header",
        ["", "garbage", f"t={NOW}", "v1=abc", f"t=soon,v1={'0' * 64}", f"t={NOW},v0=abc"],
    )
    def test_malformed_headers_do_not_verify(self, header: str) -> None:
        assert not verify_signature(SECRET, header, BODY, now=NOW)

    def test_any_of_several_v1_signatures_may_match(self) -> None:
        good = signature(SECRET, NOW, BODY)
        header = f"t={NOW},v1={'0' * 64},v1={good}"
        assert verify_signature(SECRET, header, BODY, now=NOW)


class TestTargets:
    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:8080/hook",
            "http://localhost/hook",
            "https://hooks.example.com/nest?x=1",
            "http://10.1.2.3/h",
            "http://[::1]:9000/",
        ],
    )
    def test_allowed(self, url: str) -> None:
        assert check_url(url) == url

    @pytest.mark.parametrize(
        "url",
        [
            "ftp://example.com/",
            "javascript:alert(1)",
            "http://169.254.169.254/latest",
            "http://169.254.0.1/",
            "http://[fe80::1%25eth0]/",
            "http://[fe80::abcd]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[fd00:ec2::254]/",
            "http://metadata.google.internal./",
            "http://METADATA/",
            "http://0.0.0.0/",
            "http://h:0/",
            "http://h:99999/",
            "https://" + "a" * 2100 + ".com/",
        ],
    )
    def test_refused(self, url: str) -> None:
        with pytest.raises(RefusedTarget):
            check_url(url)


class TestRetryRules:
    @pytest.mark.parametrize(
        ("status", "delivered", "retryable"),
        [
            (200, True, False),
            (204, True, False),
            (301, False, False),
            (400, False, False),
            (401, False, False),
            (404, False, False),
            (408, False, True),
            (429, False, True),
            (500, False, True),
            (503, False, True),
        ],
    )
    def test_classify(self, status: int, delivered: bool, retryable: bool) -> None:
        outcome = classify(status)
        assert (outcome.delivered, outcome.retryable) == (delivered, retryable)

    def test_backoff_doubles_and_is_capped(self) -> None:
        assert [backoff(n, 5.0) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
        assert backoff(30, 5.0) == 3600.0
