"""Audit events as the API returns them."""

from __future__ import annotations

from datetime import datetime

from libs.common.contract.base import WireModel


class AuditEventRead(WireModel):
    """One mutating (or sensitive) request: who, what, outcome, when."""

    id: str
    time: datetime
    token_id: str | None
    token_name: str | None
    method: str
    path: str
    resource: str
    resource_id: str | None
    action: str
    status: int
    correlation_id: str | None
