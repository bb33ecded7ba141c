"""The transactional outbox: messages staged with a write commit with it; a relay publishes them.

`stage(session, payload, subject=...)` wraps a contract payload in its envelope and adds it to
the unit of work: its outbox row is written inside the same transaction, right before COMMIT,
and the relay is woken after the commit (not at all if it rolls back). Services never thread a
`notify` callback. Events the API itself publishes are also handed to `Outbox.on_event`
listeners in the transaction (the event history records them there, so the projector need not
record them again when they come back from NEST_EVENTS).

The relay publishes committed rows to JetStream in order, then marks them sent. A crash between
commit and publish loses nothing (the row stays pending); a crash between the PubAck and marking
the row sent republishes it with the same Nats-Msg-Id, which JetStream drops as a duplicate
within its window (and consumers are idempotent beyond it). Several API replicas may relay at
once: the worst case is the same duplicate, never a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

from libs.common.bus import Bus, BusUnavailable
from libs.common.contract import BY_TYPE, Envelope, envelope_for
from libs.common.contract.base import WireModel
from libs.common.logging import correlation_id
from services.api.kit.clock import utcnow
from services.api.kit.db import Database, Session, sql

log = logging.getLogger(__name__)

SOURCE = "api"
"""Envelopes the API publishes say `source: /nest/api`."""
API_SOURCE = f"/nest/{SOURCE}"

EventListener = Callable[[Session, Sequence[Envelope]], Awaitable[None]]

_INSERT = sql(
    "INSERT INTO outbox (event_id, subject, envelope, created_at) "
    "VALUES (:event_id, :subject, :envelope, :created_at)"
)
_PENDING = sql(
    "SELECT id, subject, envelope, event_id FROM outbox WHERE sent_at IS NULL "
    "ORDER BY id LIMIT :limit"
)
_PURGE = sql("DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < :cutoff")


def stage(session: Session, payload: WireModel, *, subject: str) -> Envelope:
    """Stage a contract payload (intent or event) in this unit of work; returns its envelope."""
    nats_subject, envelope = envelope_for(
        payload, source=SOURCE, subject=subject, correlation_id=correlation_id.get()
    )
    session.staged.append((nats_subject, envelope))
    return envelope


def is_event(envelope: Envelope) -> bool:
    entry = BY_TYPE.get(envelope.type)
    return entry is not None and entry.kind == "event"


class Outbox:
    """Writes staged messages at commit, and relays committed ones to JetStream."""

    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        batch_size: int = 100,
        poll_seconds: float = 1.0,
        retain_sent: timedelta = timedelta(days=1),
    ) -> None:
        self.db = db
        self.bus = bus
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.retain_sent = retain_sent
        self.on_event: list[EventListener] = []
        self._wake = asyncio.Event()
        self.published = 0
        self.last_error: str | None = None
        db.before_commit.append(self.write_staged)

    def notify(self) -> None:
        self._wake.set()

    async def write_staged(self, session: Session) -> None:
        """The before-commit hook: the unit of work's staged messages become outbox rows."""
        if not session.staged:
            return
        now = self.db.stamp(utcnow())
        events: list[Envelope] = []
        for subject, envelope in session.staged:
            session.defer(
                _INSERT,
                {
                    "event_id": envelope.id,
                    "subject": subject,
                    "envelope": envelope.to_bytes().decode(),
                    "created_at": now,
                },
            )
            if is_event(envelope):
                events.append(envelope)
        session.staged = []
        for listener in self.on_event:
            if events:
                await listener(session, events)
        session.after_commit(self.notify)

    async def publish_pending(self) -> int:
        """Publish every pending row, oldest first; returns how many were published.

        No DB connection is held while publishing: rows are read in one short query and
        marked sent in one short transaction, so requests never wait behind NATS.
        """
        total = 0
        while True:
            async with self.db.session() as session:
                rows = await session.fetch(_PENDING, {"limit": self.batch_size})
            if not rows:
                return total
            sent: list[int] = []
            try:
                for row_id, subject, envelope, event_id in rows:
                    await self.bus.publish_raw(subject, str(envelope).encode(), str(event_id))
                    sent.append(int(row_id))
            finally:
                if sent:
                    await self._mark_sent(sent, utcnow())
            total += len(sent)
            self.published += len(sent)

    async def _mark_sent(self, ids: Sequence[int], when: datetime) -> None:
        marks = ", ".join(str(int(i)) for i in ids)
        async with self.db.session() as session:
            await session.execute(
                sql(f"UPDATE outbox SET sent_at = :when WHERE id IN ({marks})"),  # noqa: S608
                {"when": self.db.stamp(when)},
            )
            await session.commit()

    async def purge(self) -> int:
        async with self.db.session() as session:
            removed = await session.execute(
                _PURGE, {"cutoff": self.db.stamp(utcnow() - self.retain_sent)}
            )
            await session.commit()
        return removed

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
                await self.purge()
                last_purge = utcnow()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
