"""The one clock of every service: aware UTC datetimes, passed in where code needs the time so a
test can hand it a clock of its own."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
"""Answers the current time as an aware UTC datetime."""


def utcnow() -> datetime:
    """The current time, aware, in UTC (the default `Clock`)."""
    return datetime.now(UTC)
