"""Backup policies as the API reads and writes them (camelCase JSON)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field, field_validator

from libs.common.contract.backup_policy import BackupPolicySpec
from libs.common.contract.base import WireModel
from libs.common.contract.cluster import Labels, validate_labels, validate_name


class BackupPolicyCreate(WireModel):
    """A new policy: a schedule, what to back up, where to, how long to keep it."""

    name: str = Field(description="DNS-1123 label, unique among policies.", examples=["nightly"])
    labels: Labels
    spec: BackupPolicySpec

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return validate_labels(value)


class BackupPolicyPatch(WireModel):
    """A JSON merge patch (RFC 7386) of a policy: `labels` and any part of `spec`."""

    name: str | None = Field(default=None, description="Cannot be changed; allowed if unchanged.")
    labels: dict[str, str | None] | None = None
    spec: dict[str, Any] | None = Field(
        default=None, description="Merged into the current spec, then validated as a whole."
    )


class BackupPolicyRead(WireModel):
    """A backup policy with its metadata."""

    id: str
    name: str
    labels: dict[str, str]
    spec: BackupPolicySpec
    generation: int
    resource_version: str = Field(
        description="Changes with every write of labels or spec; also sent as the ETag."
    )
    created_at: datetime
    updated_at: datetime
