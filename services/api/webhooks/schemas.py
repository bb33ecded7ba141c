"""Webhook subscriptions and their deliveries as the API reads and writes them (camelCase)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from libs.common.contract.base import WireModel
from libs.common.contract.cluster import Labels, validate_labels, validate_name
from services.api.events.filters import parse_pattern
from services.api.webhooks.targets import check_url

DeliveryStatus = Literal["pending", "delivered", "failed"]


def _patterns(values: list[str]) -> list[str]:
    if not values:
        raise ValueError("must name at least one event type or prefix ('*' for every event)")
    for value in values:
        parse_pattern(value)
    return list(dict.fromkeys(values))


class WebhookSpecBase(WireModel):
    url: str = Field(
        description="http(s) URL that receives the events (not link-local or metadata).",
        examples=["https://hooks.example.com/nest"],
    )
    event_types: list[str] = Field(
        default_factory=lambda: ["*"],
        max_length=100,
        description="Types (exact, or a prefix ending in `.` or `*`) to deliver; default: all.",
    )
    enabled: bool = Field(default=True, description="A disabled webhook keeps its queue.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("event_types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        return _patterns(value)


class WebhookSpecWrite(WebhookSpecBase):
    secret: str | None = Field(
        default=None,
        min_length=16,
        max_length=256,
        description="HMAC key for Nest-Signature (write-only); generated if absent.",
        json_schema_extra={"writeOnly": True},
    )


class WebhookCreate(WireModel):
    name: str = Field(description="DNS-1123 label, unique among webhooks.", examples=["audit-sink"])
    labels: Labels
    spec: WebhookSpecWrite

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return validate_labels(value)


class WebhookPatch(WireModel):
    """A JSON merge patch (RFC 7386): `labels` and any part of `spec` (`secret` rotates it)."""

    name: str | None = Field(default=None, description="Cannot be changed; allowed if unchanged.")
    labels: dict[str, str | None] | None = None
    spec: dict[str, Any] | None = None


class WebhookStatus(WireModel):
    last_delivery_at: datetime | None = None
    last_outcome: Literal["delivered", "retrying", "failed"] | None = None
    consecutive_failures: int = 0


class WebhookRead(WireModel):
    """A webhook; its secret is never shown again after creation."""

    id: str
    name: str
    labels: dict[str, str]
    spec: WebhookSpecBase
    generation: int
    created_at: datetime
    updated_at: datetime
    status: WebhookStatus


class WebhookCreated(WebhookRead):
    secret: str = Field(description="The signing secret. Shown only in this response.")


class DeliveryRead(WireModel):
    """One event owed to a webhook, and how its delivery went."""

    id: str
    webhook_id: str
    event_id: str
    event_type: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    response_code: int | None = None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None = None
