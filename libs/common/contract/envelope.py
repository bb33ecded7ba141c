"""The CloudEvents 1.0 envelope (structured JSON) that every intent and event travels in."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SPECVERSION = "1.0"


def new_event_id() -> str:
    """A unique, time-ordered-enough id for an envelope (also the Nats-Msg-Id)."""
    return uuid.uuid4().hex


class Envelope(BaseModel):
    """A CloudEvent in structured JSON mode, plus Nest's `correlationid` extension."""

    model_config = ConfigDict(extra="allow")

    specversion: str = SPECVERSION
    id: str = Field(default_factory=new_event_id, min_length=1)
    source: str = Field(min_length=1, description="/nest/<service>")
    type: str = Field(min_length=1, description="io.nest.<domain>.<name>.v1")
    subject: str | None = Field(default=None, description="The resource id.")
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    datacontenttype: str = "application/json"
    correlationid: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        return cls.model_validate_json(raw)
