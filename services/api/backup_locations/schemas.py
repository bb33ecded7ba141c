"""Backup locations as the API reads and writes them (camelCase); the secret key is write-only."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from libs.common.contract.backup_location import BackupLocationSpec
from libs.common.contract.base import WireModel
from libs.common.contract.cluster import Labels, validate_labels, validate_name


class BackupLocationCreate(WireModel):
    name: str = Field(description="DNS-1123 label, unique among locations.", examples=["offsite"])
    labels: Labels
    spec: BackupLocationSpec

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return validate_labels(value)


class BackupLocationPatch(WireModel):
    """A JSON merge patch (RFC 7386): `labels` and any part of `spec` (re-checked live)."""

    name: str | None = Field(default=None, description="Cannot be changed; allowed if unchanged.")
    labels: dict[str, str | None] | None = None
    spec: dict[str, Any] | None = None


class BackupLocationSpecRead(WireModel):
    """The spec as stored, without the secret access key."""

    kind: Literal["s3", "local"]
    endpoint_url: str | None = None
    bucket: str | None = None
    prefix: str = ""
    region: str = "us-east-1"
    access_key_id: str | None = None
    path_style: bool = False
    path: str | None = None


class BackupLocationRead(WireModel):
    """A backup location; its secret access key is never shown."""

    id: str
    name: str
    labels: dict[str, str]
    spec: BackupLocationSpecRead
    generation: int
    created_at: datetime
    updated_at: datetime
