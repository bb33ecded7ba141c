"""ASGI middleware: correlation ids, rate limiting, idempotency keys and the audit log.

Pure ASGI (no BaseHTTPMiddleware) so streaming responses pass through untouched and the cost
per request stays small. Order, outermost first: correlation id, body limit, rate limit,
audit, idempotency.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common.logging import correlation_id
from services.api import ratelimit
from services.api.audit import service as audit
from services.api.idempotency import service as idempotency
from services.api.problems import PROBLEM_JSON

log = logging.getLogger(__name__)

HEADER = b"x-correlation-id"
_SAFE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNLIMITED_PATHS = ("/healthz", "/readyz")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def send_problem(
    send: Send,
    status: int,
    title: str,
    detail: str,
    *,
    kind: str,
    instance: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    errors: list[dict[str, str]] | None = None,
) -> None:
    problem: dict[str, Any] = {
        "type": f"https://nest.io/problems/{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if cid := correlation_id.get():
        problem["correlationId"] = cid
    if errors:
        problem["errors"] = errors
    body = json.dumps(problem).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class CorrelationIdMiddleware:
    """Sets the correlation id for logs and events, and echoes it in the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, HEADER) or ""
        cid = given if _SAFE.match(given) else uuid.uuid4().hex
        token = correlation_id.set(cid)

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"].append((HEADER, cid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            correlation_id.reset(token)


class BodyLimitMiddleware:
    """413 problem for request bodies over the limit, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, scope: Scope, send: Send) -> None:
        await send_problem(
            send,
            413,
            "Content Too Large",
            f"request bodies are limited to {self.max_bytes} bytes",
            kind="too-large",
            instance=scope["path"],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._too_large(scope, send)
                return
            await self.app(scope, receive, send)
            return
        # Chunked: read up to the limit before the app sees anything, then replay.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class RateLimitMiddleware:
    """429 with Retry-After once a credential (or an anonymous client address) exceeds its rate."""

    def __init__(self, app: ASGIApp, limiter: ratelimit.RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        authorization = _header(scope, b"authorization")
        if authorization:
            key = hashlib.sha256(authorization.encode()).hexdigest()
        else:
            client = scope.get("client")
            key = f"anonymous:{client[0] if client else '-'}"
        wait = self.limiter.check(key)
        if wait > 0:
            await send_problem(
                send,
                429,
                "Too Many Requests",
                f"rate limit of {self.limiter.rate:g} requests/s exceeded; retry later",
                kind="rate-limited",
                instance=scope["path"],
                headers=[(b"retry-after", ratelimit.retry_after_header(wait).encode())],
            )
            return
        await self.app(scope, receive, send)


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
            if target is not None:
                principal = scope.get("state", {}).get("principal")
                await audit.record(
                    scope["app"].state.sessions,
                    method=scope["method"],
                    path=scope["path"],
                    target=target,
                    status=int(outcome["status"]),
                    token_id=getattr(principal, "token_id", None),
                    token_name=getattr(principal, "name", None),
                    correlation_id=correlation_id.get(),
                )


class IdempotencyMiddleware:
    """Honours Idempotency-Key on POST: replay the first response, refuse a different request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = _header(scope, b"idempotency-key") if scope["type"] == "http" else None
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
        sessions = scope["app"].state.sessions
        authorization = _header(scope, b"authorization")
        path = scope["path"]
        try:
            stored = await idempotency.begin(
                sessions,
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
                    sessions,
                    authorization=authorization,
                    key=key,
                    status=int(response["status"]),
                    body=b"".join(response["body"]),
                    headers=response["headers"],
                )
            except Exception:
                log.exception("could not store the idempotent response")
