"""The outbox relay: publishes committed envelopes to JetStream in order, then marks them sent.

A crash between commit and publish loses nothing (the row stays pending); a crash between the
PubAck and marking the row sent republishes it with the same Nats-Msg-Id, which JetStream drops
as a duplicate within its window (and consumers are idempotent beyond it). Several API replicas
may relay at once: the worst case is the same duplicate, never a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.bus import Bus, BusUnavailable
from services.api.models import utcnow
from services.api.outbox import repository

log = logging.getLogger(__name__)


class OutboxRelay:
    """Publishes pending outbox rows; woken by `notify()` after a commit; polls as a backstop."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        bus: Bus,
        *,
        batch_size: int = 100,
        poll_seconds: float = 1.0,
        retain_sent: timedelta = timedelta(days=1),
    ) -> None:
        self.sessions = sessions
        self.bus = bus
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.retain_sent = retain_sent
        self._wake = asyncio.Event()
        self.published = 0
        self.last_error: str | None = None

    def notify(self) -> None:
        self._wake.set()

    async def publish_pending(self) -> int:
        """Publish every pending row, oldest first; returns how many were published.

        No DB connection is held while publishing: rows are read in one short transaction and
        marked sent in another, so requests never wait behind a slow NATS round trip.
        """
        total = 0
        while True:
            async with self.sessions() as session:
                rows = [
                    (r.id, r.subject, r.envelope, r.event_id)
                    for r in await repository.pending(session, self.batch_size)
                ]
            if not rows:
                return total
            sent: list[int] = []
            try:
                for row_id, subject, envelope, event_id in rows:
                    await self.bus.publish_raw(subject, envelope.encode(), event_id)
                    sent.append(row_id)
            finally:
                if sent:
                    async with self.sessions() as session:
                        await repository.mark_sent(session, sent, utcnow())
                        await session.commit()
            total += len(sent)
            self.published += len(sent)

    async def run(self) -> None:
        """Relay forever: after every notify(), every poll interval, and after NATS comes back."""
        await self.bus.wait_connected()
        last_purge = utcnow()
        backoff = 0.5
        while True:
            self._wake.clear()
            try:
                await self.publish_pending()
                self.last_error = None
                backoff = 0.5
            except BusUnavailable as exc:
                self.last_error = str(exc)
                log.warning("outbox relay: %s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            except Exception:
                log.exception("outbox relay failed; retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if utcnow() - last_purge > timedelta(minutes=10):
                async with self.sessions() as session:
                    await repository.purge_sent_before(session, utcnow() - self.retain_sent)
                    await session.commit()
                last_purge = utcnow()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
