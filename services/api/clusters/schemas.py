"""The Cluster resource as the API reads and writes it (camelCase JSON)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field, field_validator

from libs.common.contract.base import WireModel
from libs.common.contract.cluster import (
    ClusterEndpoint,
    ClusterSpec,
    Condition,
    Labels,
    Phase,
    validate_labels,
    validate_name,
)


class ClusterCreate(WireModel):
    """A new cluster. Only `name` is required; every spec field has a default."""

    name: str = Field(description="DNS-1123 label, unique among clusters.", examples=["demo"])
    labels: Labels
    spec: ClusterSpec = Field(default_factory=ClusterSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return validate_labels(value)


class ClusterPatch(WireModel):
    """A JSON merge patch (RFC 7386) of a cluster: `labels` and any part of `spec`."""

    name: str | None = Field(default=None, description="Cannot be changed; allowed if unchanged.")
    labels: dict[str, str | None] | None = None
    spec: dict[str, Any] | None = Field(
        default=None, description="Merged into the current spec, then validated as a whole."
    )


class ClusterStatus(WireModel):
    """What the provisioner last reported."""

    phase: Phase = "Pending"
    observed_generation: int = 0
    reason: str = ""
    message: str = ""
    conditions: list[Condition] = Field(default_factory=list)
    endpoint: ClusterEndpoint | None = None


class ClusterRead(WireModel):
    """A cluster with its metadata and observed status."""

    id: str
    name: str
    labels: dict[str, str]
    spec: ClusterSpec
    generation: int
    resource_version: str = Field(
        description="Changes with every write of labels or spec; also sent as the ETag."
    )
    created_at: datetime
    updated_at: datetime
    status: ClusterStatus
