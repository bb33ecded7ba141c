"""The API's clock: aware UTC timestamps (one place, so tests and storage agree on the zone)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
