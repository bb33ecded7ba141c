"""Idempotency-Key on POST: replay the first response, refuse the key with another request."""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.idempotency import service as idempotency
from services.api.kit.middleware import header
from services.api.kit.problems import send_problem

log = logging.getLogger(__name__)


class IdempotencyMiddleware:
    """Honours Idempotency-Key on POST: replay the first response, refuse a different request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = header(scope, b"idempotency-key") if scope["type"] == "http" else None
        if key is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        db = scope["app"].state.db
        authorization = header(scope, b"authorization")
        path = scope["path"]
        try:
            stored = await idempotency.begin(
                db,
                authorization=authorization,
                key=key,
                method="POST",
                path=path,
                body_hash=idempotency.request_hash("POST", path, body),
            )
        except idempotency.KeyInvalid:
            await send_problem(
                send,
                422,
                "Unprocessable Content",
                "Idempotency-Key must be 1-255 printable ASCII characters",
                kind="validation",
                instance=path,
                errors=[{"field": "Idempotency-Key", "message": "1-255 printable ASCII"}],
            )
            return
        except idempotency.KeyReused:
            await send_problem(
                send,
                422,
                "Unprocessable Content",
                "this Idempotency-Key was already used with a different request",
                kind="idempotency-key-reused",
                instance=path,
                errors=[{"field": "Idempotency-Key", "message": "used with another request"}],
            )
            return
        except idempotency.KeyInFlight:
            await send_problem(
                send,
                409,
                "Conflict",
                "a request with this Idempotency-Key is still being processed; retry later",
                kind="idempotency-key-in-flight",
                instance=path,
                headers=[(b"retry-after", b"1")],
            )
            return
        if stored is not None:
            headers = [(k.encode(), v.encode()) for k, v in stored.headers.items()]
            headers += [
                (b"content-length", str(len(stored.body)).encode()),
                (b"idempotent-replayed", b"true"),
            ]
            await send({"type": "http.response.start", "status": stored.status, "headers": headers})
            await send({"type": "http.response.body", "body": stored.body})
            return

        delivered = False

        async def replay_body() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        # After the body, pass receive through so a client disconnect is still seen.

        response: dict[str, Any] = {"status": 500, "headers": {}, "body": []}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["headers"] = {
                    k.decode("latin-1").lower(): v.decode("latin-1")
                    for k, v in message.get("headers", [])
                }
            elif message["type"] == "http.response.body":
                response["body"].append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_body, capture)
        finally:
            try:
                await idempotency.finish(
                    db,
                    authorization=authorization,
                    key=key,
                    status=int(response["status"]),
                    body=b"".join(response["body"]),
                    headers=response["headers"],
                )
            except Exception:
                log.exception("could not store the idempotent response")
