"""Event history: record every event the projector sees, list it, prune it, and feed streams.

Recording stores the envelope and stages the webhook deliveries it causes in one transaction, so
a crash loses neither; a redelivered event (same id) is stored and delivered once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

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
from services.api.models import utcnow
from services.api.problems import FieldError, InvalidInput
from services.api.webhooks import service as webhooks

log = logging.getLogger(__name__)

PRUNE_INTERVAL_SECONDS = 3600.0
PRUNE_BATCH = 5000
WRITE_BATCH = 100


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


async def record(
    session: AsyncSession,
    envelope: Envelope,
    stream_sequence: int,
    subscriptions: webhooks.Subscriptions | None = None,
) -> int | None:
    """Store the event and stage its webhook deliveries (caller commits); None if seen before."""
    await repository.lock_for_append(session)
    position = await repository.insert_if_absent(
        session, envelope_row(envelope, stream_sequence, utcnow())
    )
    if position is None:
        return None
    await webhooks.stage_deliveries(session, position, envelope.id, envelope.type, subscriptions)
    return position


async def list_events(
    session: AsyncSession, where: EventFilter, *, limit: int, cursor: str | None
) -> dict[str, Any]:
    """A page of matching events, oldest first, as plain JSON-ready CloudEvents."""
    after = decode_cursor(cursor) if cursor else 0
    rows = await repository.page(session, where, after=after, limit=limit + 1)
    following = encode_cursor(rows[limit - 1].position) if len(rows) > limit else None
    return {"items": [row.envelope for row in rows[:limit]], "next": following}


async def prune(sessions: async_sessionmaker[AsyncSession], cutoff: datetime) -> int:
    """Delete events recorded before `cutoff`, in short batches; returns how many."""
    total = 0
    while True:
        async with sessions() as session:
            removed = await repository.prune_batch(session, cutoff, PRUNE_BATCH)
            await session.commit()
        total += removed
        if removed < PRUNE_BATCH:
            return total


class EventFeed:
    """The API's event history and live feed: what the projector, the routes and the lifespan
    use. `record` is the projector's hook; `run` fans out and prunes until cancelled."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        *,
        on_recorded: Sequence[Callable[[], None]] = (),
        poll_seconds: float = 1.0,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.on_recorded = list(on_recorded)
        self.broadcaster = Broadcaster(
            sessions, queue_size=settings.sse_queue_size, poll_seconds=poll_seconds
        )
        self.recorded = 0
        self._waiting: asyncio.Queue[tuple[Envelope, int, asyncio.Future[int | None]]] = (
            asyncio.Queue()
        )

    async def record(self, envelope: Envelope, stream_sequence: int) -> None:
        """Store one event (idempotent); returns once it is committed.

        The projector handles a batch concurrently and its handlers call this in stream order;
        the writer commits whatever is waiting in one transaction (one fsync for many events)
        in that order, so positions follow stream sequences.
        """
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiting.put_nowait((envelope, stream_sequence, done))
        await done

    async def _write_forever(self) -> None:
        while True:
            batch = [await self._waiting.get()]
            while not self._waiting.empty() and len(batch) < WRITE_BATCH:
                batch.append(self._waiting.get_nowait())
            try:
                positions = await self._write([(e, s) for e, s, _ in batch])
            except Exception:
                # One bad event must not fail its neighbours: retry them one by one.
                positions = []
                for envelope, sequence, done in batch:
                    try:
                        positions += await self._write([(envelope, sequence)])
                    except Exception as exc:
                        positions.append(None)
                        if not done.done():
                            done.set_exception(exc)
            for (_, _, done), position in zip(batch, positions, strict=True):
                if not done.done():
                    done.set_result(position)
            if any(position is not None for position in positions):
                self.recorded += sum(position is not None for position in positions)
                self.broadcaster.notify()
                for listener in self.on_recorded:
                    listener()

    async def _write(self, events: Sequence[tuple[Envelope, int]]) -> list[int | None]:
        async with self.sessions() as session:
            subscriptions = await webhooks.enabled_subscriptions(session)
            positions = [
                await record(session, e, sequence, subscriptions) for e, sequence in events
            ]
            await session.commit()
        return positions

    async def replay(self, where: EventFilter, after: int, upto: int) -> list[StreamedEvent]:
        async with self.sessions() as session:
            rows = await repository.page(session, where, after=after, limit=BATCH, upto=upto)
            return [sse_frame(row) for row in rows]

    async def stream(
        self, where: EventFilter, after: int | None, authorized: StillAuthorized | None = None
    ) -> EventStreamResponse:
        """A stream from `after`, or from the newest recorded event if None."""
        await self.broadcaster.wait_ready()
        if after is None:
            # "From now" means after what is committed now, even if not yet fanned out.
            async with self.sessions() as session:
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
        """Record, fan out and prune until cancelled."""
        helpers = [
            asyncio.create_task(self._write_forever(), name="event-history-writer"),
            asyncio.create_task(self._prune_forever(), name="event-history-retention"),
        ]
        try:
            await self.broadcaster.run()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _prune_forever(self) -> None:
        while True:
            cutoff = utcnow() - timedelta(days=self.settings.event_history_days)
            try:
                removed = await prune(self.sessions, cutoff)
                if removed:
                    log.info("pruned event history", extra={"events": removed})
            except Exception:
                log.exception("pruning the event history failed; will retry")
            await asyncio.sleep(PRUNE_INTERVAL_SECONDS)
