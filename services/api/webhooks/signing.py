"""Webhook signatures: `Nest-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>`.

The MAC is computed over `<t>.<body>` (the exact request body bytes) with the webhook's secret, as
Stripe does. A receiver recomputes it, compares in constant time, and refuses a timestamp outside
its tolerance (replays). `verify_signature` has no Nest imports: receivers may copy it as is.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "Nest-Signature"
SCHEME = "v1"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of `<timestamp>.<body>`."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The Nest-Signature header value for this body."""
    ts = int(time.time()) if timestamp is None else timestamp
    return f"t={ts},{SCHEME}={signature(secret, ts, body)}"


def verify_signature(
    secret: str, header: str, body: bytes, tolerance: float = 300.0, now: float | None = None
) -> bool:
    """True if `header` (a Nest-Signature value) signs `body` with `secret` within `tolerance`
    seconds of `now`. Several v1 entries are allowed (any one may match)."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == SCHEME and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    message = str(timestamp).encode() + b"." + body
    expected = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)
