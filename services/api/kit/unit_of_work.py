"""One unit of work per request, committed once the endpoint has answered (Polar's way).

`SessionDep` gives an endpoint the request's `Session` (created on first use, connection taken
on first query). `UnitOfWorkMiddleware` holds the response until the endpoint is done: a
success (< 400) commits the unit of work, with whatever the success hooks add to it (the audit
row), and only then is the response sent; an error rolls it back. Work that must follow the
commit (waking the outbox relay) runs after it, so a client never sees a response for a change
that is not stored, and a change costs one commit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.kit.db import Database, IntegrityError, Session
from services.api.kit.problems import send_problem

log = logging.getLogger(__name__)

STATE_KEY = "nest_session"
SuccessHook = Callable[[Session, Scope, Message], Awaitable[None]]
"""Adds to the unit of work of a successful request (its response start message given)."""


def request_session(scope: Scope, db: Database) -> Session:
    state: dict[str, Any] = scope.setdefault("state", {})
    session: Session | None = state.get(STATE_KEY)
    if session is None:
        session = state[STATE_KEY] = db.session()
    return session


async def get_session(request: Request) -> Session:
    """The request's unit of work (committed by UnitOfWorkMiddleware)."""
    return request_session(request.scope, request.app.state.db)


SessionDep = Annotated[Session, Depends(get_session)]


class UnitOfWorkMiddleware:
    """Commits the request's unit of work before its response leaves; rolls back on errors."""

    def __init__(self, app: ASGIApp, on_success: list[SuccessHook] | None = None) -> None:
        self.app = app
        self.on_success = on_success if on_success is not None else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        body: list[bytes] = []
        settled = False

        async def settle_then_send(message: Message) -> None:
            nonlocal held, settled
            if settled:
                await send(message)
                return
            if message["type"] == "http.response.start":
                if scope.get("state", {}).get(STATE_KEY) is None:
                    settled = True  # no unit of work (e.g. a stream): nothing to wait for
                    await send(message)
                    return
                held = message
                return
            if held is None:
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            settled = True
            start = held
            session: Session | None = scope.get("state", {}).get(STATE_KEY)
            if session is not None:
                failure = await self._settle(session, scope, start)
                if failure is not None:
                    status, title, detail, kind = failure
                    await send_problem(
                        send, status, title, detail, kind=kind, instance=scope["path"]
                    )
                    return
            await send(start)
            await send({"type": "http.response.body", "body": b"".join(body)})

        try:
            await self.app(scope, receive, settle_then_send)
            if held is not None and not settled:
                # A response that never finished its body: nothing is committed.
                settled = True
        finally:
            session = scope.get("state", {}).get(STATE_KEY)
            if session is not None:
                await session.close()

    async def _settle(
        self, session: Session, scope: Scope, start: Message
    ) -> tuple[int, str, str, str] | None:
        """Commit (success) or roll back (error); a problem to send instead if commit failed."""
        if start["status"] >= 400:
            await session.rollback()
            return None
        try:
            for hook in self.on_success:
                await hook(session, scope, start)
            await session.commit()
        except IntegrityError:
            await session.rollback()
            return (
                409,
                "Conflict",
                "a concurrent change conflicts with this one; retry",
                "conflict",
            )
        except Exception:
            log.exception("committing %s %s failed", scope["method"], scope["path"])
            await session.rollback()
            return (
                503,
                "Service Unavailable",
                "the change could not be stored; retry shortly",
                "unavailable",
            )
        return None
