"""Domain-free ASGI middleware: correlation ids, the body size limit, rate limiting.

Pure ASGI (no BaseHTTPMiddleware) so streaming responses pass through untouched and the cost
per request stays small. The app's order, outermost first: correlation id, body limit, rate
limit, audit (services.api.audit), idempotency (services.api.idempotency), unit of work.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common.logging import correlation_id
from services.api.kit import ratelimit
from services.api.kit.problems import send_problem

log = logging.getLogger(__name__)

HEADER = b"x-correlation-id"
_SAFE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNLIMITED_PATHS = ("/healthz", "/readyz")


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class CorrelationIdMiddleware:
    """Sets the correlation id for logs and events, and echoes it in the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = header(scope, HEADER) or ""
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
        length = header(scope, b"content-length")
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
        authorization = header(scope, b"authorization")
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
