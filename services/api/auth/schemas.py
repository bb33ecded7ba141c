"""API tokens as the API reads and writes them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field, field_validator

from libs.common.contract.base import WireModel
from libs.common.contract.cluster import Labels, validate_labels


class Scope(StrEnum):
    """What a token may do; each scope includes the ones before it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Scope).index(self)

    def allows(self, required: Scope) -> bool:
        return self.rank >= required.rank


class TokenSpec(WireModel):
    scope: Scope = Field(default=Scope.VIEWER, description="viewer, operator or admin.")
    expires_in_days: int = Field(
        default=365, ge=1, le=3650, description="Lifetime in days from creation (max 10 years)."
    )


class TokenCreate(WireModel):
    name: str = Field(min_length=1, max_length=63, examples=["ci-pipeline"])
    labels: Labels
    spec: TokenSpec = Field(default_factory=TokenSpec)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return validate_labels(value)


class TokenStatus(WireModel):
    expires_at: datetime
    revoked_at: datetime | None = None
    active: bool
    prefix: str = Field(description="The first characters of the token, to tell tokens apart.")


class TokenRead(WireModel):
    id: str
    name: str
    labels: dict[str, str]
    spec: TokenSpec
    created_at: datetime
    updated_at: datetime
    created_by: str | None = None
    status: TokenStatus


class TokenCreated(TokenRead):
    token: str = Field(description="The secret. Shown only in this response; store it now.")
