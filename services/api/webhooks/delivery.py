"""The webhook delivery worker: drains the deliveries table with retries and bounded concurrency.

The table is the durable queue. Each replica claims due rows with a lease (a guarded UPDATE), so
one replica at a time attempts a delivery; a replica that dies mid-attempt loses its lease and
another retries (at-least-once). No DB session is held during an HTTP request, and each webhook
gets at most `webhook_concurrency` requests in flight, so a receiver that hangs or is down only
delays its own deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.secrets import SealedSecretError, Sealer, sealer_from_settings
from libs.common.settings import Settings
from services.api.models import utcnow
from services.api.webhooks import repository, signing
from services.api.webhooks.service import secret_context
from services.api.webhooks.targets import RefusedTarget, check_resolved

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/cloudevents+json"
USER_AGENT = "Nest-Webhooks/1"
MAX_BACKOFF_SECONDS = 3600.0
MAX_IN_FLIGHT = 256
RETRYABLE_STATUS = frozenset({408, 429})


@dataclass(frozen=True)
class Outcome:
    """What one attempt achieved."""

    delivered: bool
    retryable: bool
    response_code: int | None = None
    error: str | None = None
    retry_after: float | None = None


def classify(status: int, retry_after: float | None = None) -> Outcome:
    """2xx delivered; 408, 429 and 5xx are retried; any other answer is final."""
    if 200 <= status < 300:
        return Outcome(delivered=True, retryable=False, response_code=status)
    retryable = status in RETRYABLE_STATUS or status >= 500
    return Outcome(
        delivered=False,
        retryable=retryable,
        response_code=status,
        error=f"receiver answered HTTP {status}",
        retry_after=retry_after,
    )


def backoff(attempts: int, base: float) -> float:
    """Wait after the `attempts`-th failed try: base, 2·base, 4·base, … at most an hour."""
    return float(min(base * 2.0 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max((parsedate_to_datetime(value) - utcnow()).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


class DeliveryWorker:
    """Claims due deliveries and attempts them; woken after an event commits, polls otherwise."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        *,
        owner: str | None = None,
        sealer: Sealer | None = None,
    ) -> None:
        self.sessions = sessions
        self.sealer = sealer or sealer_from_settings(settings)
        self.max_attempts = settings.webhook_max_attempts
        self.base_backoff = settings.webhook_backoff_seconds
        self.timeout = settings.webhook_timeout_seconds
        self.per_webhook = settings.webhook_concurrency
        self.poll_seconds = settings.webhook_poll_seconds
        self.lease = timedelta(seconds=self.timeout * 2 + 10)
        self.owner = owner or f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.attempted = 0

    def notify(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=32)
        async with httpx.AsyncClient(
            timeout=self.timeout, follow_redirects=False, trust_env=False, limits=limits
        ) as client:
            try:
                while True:
                    self._wake.clear()
                    try:
                        pause = await self.dispatch(client)
                    except Exception:
                        log.exception("webhook dispatch failed; retrying")
                        pause = self.poll_seconds
                    if pause > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), pause)
            finally:
                # Unfinished attempts keep their lease until it expires, then are retried.
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def dispatch(self, client: httpx.AsyncClient) -> float:
        """Claim what is due and start it; returns how long to sleep before looking again."""
        free = MAX_IN_FLIGHT - len(self._tasks)
        now = utcnow()
        full = {w for w, n in self._in_flight.items() if n >= self.per_webhook}
        async with self.sessions() as session:
            candidates = (
                await repository.due(session, now, limit=free * 2, skip_webhooks=full)
                if free > 0
                else []
            )
            picked: list[str] = []
            planned = dict(self._in_flight)
            for delivery_id, webhook_id in candidates:
                if len(picked) >= free or planned.get(webhook_id, 0) >= self.per_webhook:
                    continue
                planned[webhook_id] = planned.get(webhook_id, 0) + 1
                picked.append(delivery_id)
            owners = dict(candidates)
            won = await repository.claim(session, picked, self.owner, now, now + self.lease)
            next_due = await repository.next_due_at(session)
            await session.commit()
        for delivery_id in won:
            webhook_id = owners[delivery_id]
            self._in_flight[webhook_id] = self._in_flight.get(webhook_id, 0) + 1
            task = asyncio.create_task(self._attempt(client, delivery_id, webhook_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if won and len(won) == len(picked) and len(candidates) > len(picked):
            return 0.0
        if next_due is None:
            return self.poll_seconds
        return min(max((next_due - utcnow()).total_seconds(), 0.01), self.poll_seconds)

    async def _attempt(self, client: httpx.AsyncClient, delivery_id: str, webhook_id: str) -> None:
        try:
            async with self.sessions() as session:
                job = await repository.job(session, delivery_id, self.owner)
            if job is None:
                return
            secret = self._secret(job)
            if secret is None:
                outcome = Outcome(
                    delivered=False,
                    retryable=False,
                    error="the webhook's signing secret does not open: NEST_SECRETS_KEY changed",
                )
            else:
                outcome = await self.send(client, job.url, secret, job.envelope, delivery_id)
            await self._record(job, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook attempt failed unexpectedly", extra={"webhookId": webhook_id})
        finally:
            left = self._in_flight.get(webhook_id, 1) - 1
            if left > 0:
                self._in_flight[webhook_id] = left
            else:
                self._in_flight.pop(webhook_id, None)
            self.attempted += 1
            self._wake.set()

    def _secret(self, job: repository.Job) -> str | None:
        """The signing secret in clear, for this attempt only (never kept, never logged)."""
        if job.sealed_secret is not None:
            try:
                opened = self.sealer.open(job.sealed_secret, context=secret_context(job.webhook_id))
            except SealedSecretError:
                opened = None
            else:
                return opened
            log.error("webhook secret does not open", extra={"webhookId": job.webhook_id})
            return opened
        return job.legacy_secret

    async def send(
        self,
        client: httpx.AsyncClient,
        url: str,
        secret: str,
        envelope: dict[str, Any],
        delivery_id: str,
    ) -> Outcome:
        """POST one CloudEvent (structured mode), signed; never raises for receiver trouble."""
        body = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            "Content-Type": CONTENT_TYPE,
            "User-Agent": USER_AGENT,
            signing.HEADER: signing.sign(secret, body, int(time.time())),
            "Nest-Delivery-Id": delivery_id,
        }
        try:
            await check_resolved(url)
            async with asyncio.timeout(self.timeout):
                async with client.stream("POST", url, content=body, headers=headers) as response:
                    return classify(
                        response.status_code, _retry_after(response.headers.get("retry-after"))
                    )
        except RefusedTarget as exc:
            return Outcome(delivered=False, retryable=False, error=f"refused target: {exc}")
        except (TimeoutError, httpx.TimeoutException):
            return Outcome(
                delivered=False, retryable=True, error=f"no answer within {self.timeout:g}s"
            )
        except (httpx.TransportError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            return Outcome(delivered=False, retryable=True, error=f"connection failed: {reason}")

    async def _record(self, job: repository.Job, outcome: Outcome) -> None:
        now = utcnow()
        values: dict[str, Any] = {
            "updated_at": now,
            "response_code": outcome.response_code,
            "last_error": outcome.error,
        }
        if outcome.delivered:
            values.update(status="delivered", delivered_at=now, next_attempt_at=None)
            label = "delivered"
        elif outcome.retryable and job.attempts < self.max_attempts:
            wait = backoff(job.attempts, self.base_backoff)
            if outcome.retry_after is not None:
                wait = min(max(wait, outcome.retry_after), MAX_BACKOFF_SECONDS)
            values.update(next_attempt_at=now + timedelta(seconds=wait))
            label = "retrying"
        else:
            values.update(status="failed", next_attempt_at=None)
            label = "failed"
            log.warning(
                "webhook delivery failed for good",
                extra={"webhookId": job.webhook_id, "attempts": job.attempts},
            )
        async with self.sessions() as session:
            if await repository.finish(session, job.delivery_id, self.owner, values):
                await repository.note_outcome(
                    session, job.webhook_id, label, now, failed=not outcome.delivered
                )
            await session.commit()
