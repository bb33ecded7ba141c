"""Event history: record every event, list it, prune it, and feed streams.

`EventFeed.append` stores envelopes in the caller's transaction and hands each new one to the
stagers the app gives it (webhook deliveries), so a crash loses neither; a redelivered event
(same id) is stored and delivered once. The projector appends what it consumes in its batch
transaction; the API's own events are appended where they are written (`on_api_events`, an
outbox listener), so the projector skips them when they come back from NEST_EVENTS.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from libs.common.contract import Envelope
from libs.common.settings import Settings
from services.api.auth.schemas import Scope
from services.api.events import repository
from services.api.events.filters import EventFilter
from services.api.events.stream import (
    BATCH,
    Broadcaster,
    EventStreamResponse,
    StillAuthorized,
    StreamedEvent,
    sse_frame,
)
from services.api.kit.clock import utcnow
from services.api.kit.db import Database, Session
from services.api.kit.problems import FieldError, InvalidInput

log = logging.getLogger(__name__)

PRUNE_INTERVAL_SECONDS = 3600.0
PRUNE_BATCH = 5000

Stager = Callable[[Session, Sequence[tuple[int, Envelope]]], Awaitable[int]]
"""Given newly recorded (position, envelope) pairs, stages what they cause in the same
transaction (webhook deliveries); returns how many it staged."""


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"p": position}).encode()).decode().rstrip("=")


def decode_cursor(text: str) -> int:
    position: object = None
    try:
        padded = text + "=" * (-len(text) % 4)
        position = json.loads(base64.urlsafe_b64decode(padded))["p"]
    except (ValueError, TypeError, KeyError, binascii.Error):
        position = None
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise InvalidInput(
            "invalid cursor", errors=[FieldError(field="cursor", message="not a valid cursor")]
        )
    return position


def reader_filter(scope: Scope, types: Sequence[str] | None, subject: str | None) -> EventFilter:
    """A reader's filter; bad type patterns are a 422 naming `type`."""
    try:
        return EventFilter.for_reader(scope, types or (), subject)
    except ValueError as exc:
        raise InvalidInput(
            f"invalid input: type: {exc}", errors=[FieldError(field="type", message=str(exc))]
        ) from None


def envelope_row(envelope: Envelope, stream_sequence: int, now: datetime) -> dict[str, Any]:
    return {
        "id": envelope.id,
        "type": envelope.type,
        "source": envelope.source,
        "subject": envelope.subject,
        "time": envelope.time,
        "correlation_id": envelope.correlationid,
        "stream_sequence": stream_sequence,
        "envelope": envelope.model_dump(mode="json", exclude_none=True),
        "recorded_at": now,
    }


async def list_events(
    session: Session, where: EventFilter, *, limit: int, cursor: str | None
) -> dict[str, Any]:
    """A page of matching events, oldest first, as plain JSON-ready CloudEvents."""
    after = decode_cursor(cursor) if cursor else 0
    rows = await repository.page(await session.orm(), where, after=after, limit=limit + 1)
    following = encode_cursor(rows[limit - 1].position) if len(rows) > limit else None
    return {"items": [row.envelope for row in rows[:limit]], "next": following}


async def prune(db: Database, cutoff: datetime) -> int:
    """Delete events recorded before `cutoff`, in short batches; returns how many."""
    total = 0
    while True:
        async with db.orm_sessions() as session:
            removed = await repository.prune_batch(session, cutoff, PRUNE_BATCH)
            await session.commit()
        total += removed
        if removed < PRUNE_BATCH:
            return total


class EventFeed:
    """The API's event history and live feed: what the projector, the outbox, the routes and
    the lifespan use. `append` records; `run` fans out and prunes until cancelled."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        stagers: Sequence[Stager] = (),
        poll_seconds: float = 1.0,
    ) -> None:
        self.db = db
        self.settings = settings
        self.stagers = list(stagers)
        self.broadcaster = Broadcaster(
            db, queue_size=settings.sse_queue_size, poll_seconds=poll_seconds
        )
        self.recorded = 0

    async def append(
        self, session: Session, events: Sequence[tuple[Envelope, int]]
    ) -> list[int | None]:
        """Store events (idempotently, in order) in the session's transaction; their positions,
        None for one already stored. The broadcaster is woken after the commit."""
        if not events:
            return []
        await repository.lock_for_append(session)
        now = utcnow()
        fresh: dict[str, Envelope] = {}
        for envelope, _ in events:
            fresh.setdefault(envelope.id, envelope)
        stored = await repository.insert_many(
            session,
            [
                envelope_row(envelope, sequence, now)
                for envelope, sequence in events
                if fresh.get(envelope.id) is envelope
            ],
        )
        positions: list[int | None] = []
        for envelope, _ in events:
            positions.append(stored.pop(envelope.id, None))
        recorded = [
            (position, envelope)
            for position, (envelope, _) in zip(positions, events, strict=True)
            if position is not None
        ]
        for stager in self.stagers:
            await stager(session, recorded)
        if recorded:
            count = len(recorded)

            def committed() -> None:
                self.recorded += count
                self.broadcaster.notify()

            session.after_commit(committed)
        return positions

    async def on_api_events(self, session: Session, envelopes: Sequence[Envelope]) -> None:
        """Outbox listener: the API's own events enter the history with the write that caused
        them (stream sequence 0: not yet published)."""
        await self.append(session, [(envelope, 0) for envelope in envelopes])

    async def replay(self, where: EventFilter, after: int, upto: int) -> list[StreamedEvent]:
        async with self.db.orm_sessions() as session:
            rows = await repository.page(session, where, after=after, limit=BATCH, upto=upto)
            return [sse_frame(row.position, row.type, row.subject, row.envelope) for row in rows]

    async def stream(
        self, where: EventFilter, after: int | None, authorized: StillAuthorized | None = None
    ) -> EventStreamResponse:
        """A stream from `after`, or from the newest recorded event if None."""
        await self.broadcaster.wait_ready()
        await self.broadcaster.refresh()
        if after is None:
            # "From now" means after what is committed now, even if not yet fanned out.
            async with self.db.session() as session:
                after = await repository.last_position(session)
        return EventStreamResponse(
            self.broadcaster,
            self.replay,
            where,
            after=after,
            heartbeat=self.settings.sse_heartbeat_seconds,
            authorized=authorized,
        )

    async def run(self) -> None:
        """Fan out and prune until cancelled."""
        pruning = asyncio.create_task(self._prune_forever(), name="event-history-retention")
        try:
            await self.broadcaster.run()
        finally:
            pruning.cancel()
            await asyncio.gather(pruning, return_exceptions=True)

    async def _prune_forever(self) -> None:
        while True:
            cutoff = utcnow() - timedelta(days=self.settings.event_history_days)
            try:
                removed = await prune(self.db, cutoff)
                if removed:
                    log.info("pruned event history", extra={"events": removed})
            except Exception:
                log.exception("pruning the event history failed; will retry")
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)
