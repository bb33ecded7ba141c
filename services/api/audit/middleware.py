"""Audit middleware: every mutating request (and credential read) leaves an audit entry.

A successful request's entry is written by `record_in_transaction`, a unit-of-work success hook,
in the same transaction as the change it records (atomic, and no second commit). Requests that
wrote nothing they could commit (errors: 4xx, 5xx) are recorded by `AuditMiddleware` after
their response, in a transaction of their own.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common.logging import correlation_id
from services.api.audit import service as audit
from services.api.kit.db import Session

log = logging.getLogger(__name__)

RECORDED = "nest_audited"


def _location(message: Message) -> str | None:
    for key, value in message.get("headers", []):
        if key.lower() == b"location":
            return str(value.decode("latin-1"))
    return None


async def record_in_transaction(session: Session, scope: Scope, start: Message) -> None:
    """Unit-of-work success hook: add the request's audit entry to its transaction."""
    target = audit.target_of(scope["method"], scope["path"], _location(start))
    if target is None:
        return
    state = scope.setdefault("state", {})
    principal = state.get("principal")
    await audit.add(
        session,
        method=scope["method"],
        path=scope["path"],
        target=target,
        status=int(start["status"]),
        token_id=getattr(principal, "token_id", None),
        token_name=getattr(principal, "name", None),
        correlation_id=correlation_id.get(),
    )
    session.after_commit(lambda: state.__setitem__(RECORDED, True))


class AuditMiddleware:
    """Records every mutating request (and credential reads) after its response is sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            scope["method"] == "GET" and not scope["path"].endswith(audit.SENSITIVE_READS)
        ):
            await self.app(scope, receive, send)
            return
        outcome: dict[str, Any] = {"status": 500, "location": None}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                for key, value in message.get("headers", []):
                    if key.lower() == b"location":
                        outcome["location"] = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            target = audit.target_of(scope["method"], scope["path"], outcome["location"])
            if target is not None and not scope.get("state", {}).get(RECORDED):
                principal = scope.get("state", {}).get("principal")
                await audit.record(
                    scope["app"].state.db,
                    method=scope["method"],
                    path=scope["path"],
                    target=target,
                    status=int(outcome["status"]),
                    token_id=getattr(principal, "token_id", None),
                    token_name=getattr(principal, "name", None),
                    correlation_id=correlation_id.get(),
                )
