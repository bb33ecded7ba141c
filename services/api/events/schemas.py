"""Events as the API returns them: CloudEvents 1.0 in structured JSON, exactly as published."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class CloudEvent(BaseModel):
    """A CloudEvent as Nest published it (extension attributes such as `correlationid` kept)."""

    model_config = ConfigDict(extra="allow")

    specversion: str = "1.0"
    id: str
    source: str
    type: str
    subject: str | None = None
    time: datetime | None = None
    datacontenttype: str | None = "application/json"
    correlationid: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class EventPage(BaseModel):
    """A page of the event history, oldest first; `next` is the cursor of the following page."""

    items: list[CloudEvent]
    next: str | None = None
