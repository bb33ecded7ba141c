"""The event projector: a durable consumer on NEST_EVENTS that applies facts to the Foundry DB.

It works in batches: up to `batch_size` messages are fetched at once, recorded in the history
and projected in ONE transaction, in stream order, then acked (one fsync for many events, where
one each made it CPU- and disk-bound at ~190 events/s). Handlers are registered per payload type
(`HANDLERS`), each taking a run of consecutive events of its type, so ordering across types is
kept and a run of status events is applied with one read and one write per cluster.

Delivery rules (DESIGN.md) hold per message: a malformed envelope is dead-lettered at once, a
payload that does not validate once it is in the history; if the batch's transaction fails, its
messages are applied
one by one, so only the message that fails is retried (nak with backoff) or, after
`max_deliver`, dead-lettered; the rest commit. Events the API itself published (`source:
/nest/api`) are already in the history (recorded with the write that caused them): they are
projected, never recorded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from libs.common.bus import (
    HEADER_CONSUMER,
    HEADER_DELIVERIES,
    HEADER_ERROR,
    HEADER_SUBJECT,
    Bus,
    BusUnavailable,
)
from libs.common.contract import BY_TYPE, EVENTS_STREAM, Envelope, dlq_subject, parse_payload
from libs.common.contract.backup import (
    BackupCompleted,
    BackupFailed,
    BackupStarted,
    DrillFailed,
    DrillPassed,
)
from libs.common.contract.cluster import ClusterDeleted, ClusterStatusChanged
from libs.common.contract.restore import RestoreProgressed
from services.api.backups import service as backups
from services.api.clusters import service as clusters
from services.api.events.service import EventFeed
from services.api.kit.db import Database, Session
from services.api.kit.outbox import API_SOURCE
from services.api.restores import service as restores

log = logging.getLogger(__name__)

DURABLE = "api-projector"
SERVICE = "api"
BACKOFF_SECONDS = (0.5, 2.0, 5.0, 15.0, 30.0)

Batch = Sequence[tuple[Any, int]]
"""(payload, stream sequence) of consecutive events of one type, in stream order."""


@dataclass(frozen=True)
class Handler:
    """How one payload type is projected: `apply(session, run)`; `orm` if it uses the ORM."""

    apply: Callable[[Session, Batch], Awaitable[None]]
    orm: bool = False


async def _statuses(session: Session, run: Batch) -> None:
    await clusters.apply_statuses(session, run)


async def _deleted(session: Session, run: Batch) -> None:
    for event, _ in run:
        await clusters.apply_deleted(session, event)


def _each_orm(apply: Callable[[Any, Any], Awaitable[bool]]) -> Handler:
    async def handle(session: Session, run: Batch) -> None:
        orm = await session.orm()
        for event, _ in run:
            await apply(orm, event)

    return Handler(handle, orm=True)


HANDLERS: dict[type, Handler] = {
    ClusterStatusChanged: Handler(_statuses),
    ClusterDeleted: Handler(_deleted),
    BackupStarted: _each_orm(backups.apply_started),
    BackupCompleted: _each_orm(backups.apply_completed),
    BackupFailed: _each_orm(backups.apply_failed),
    DrillPassed: _each_orm(backups.apply_drill),
    DrillFailed: _each_orm(backups.apply_drill),
    RestoreProgressed: _each_orm(restores.apply_progress),
}
"""Payload type -> its projection. Types not listed are only recorded in the history."""


@dataclass
class Item:
    """One fetched message, parsed."""

    msg: Msg
    envelope: Envelope
    payload: Any
    sequence: int
    deliveries: int
    invalid: str | None = None
    """Why the payload does not validate: recorded in the history, then dead-lettered."""


class Projector:
    """Fetches NEST_EVENTS in batches and applies each batch in one transaction."""

    def __init__(
        self,
        db: Database,
        bus: Bus,
        feed: EventFeed | None = None,
        *,
        max_deliver: int = 5,
        batch_size: int = 256,
    ) -> None:
        self.db = db
        self.bus = bus
        self.feed = feed
        self.max_deliver = max_deliver
        self.batch_size = batch_size
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.handled = 0
        self.dead_lettered = 0
        self.batches = 0

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=DURABLE,
            filter_subject="nest.event.>",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30.0,
            # We count deliveries and dead-letter ourselves (the DLQ gets the error with it).
            max_deliver=-1,
            max_ack_pending=self.batch_size * 4,
        )

    async def run(self) -> None:
        """Fetch and apply batches until stop(); survives NATS restarts."""
        await self.bus.wait_connected()
        sub = None
        while not self._stopping.is_set():
            try:
                if sub is None:
                    sub = await self.bus.nc.jetstream().pull_subscribe(
                        "nest.event.>", durable=DURABLE, stream=EVENTS_STREAM, config=self.config()
                    )
                msgs = await sub.fetch(self.batch_size, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("projector: fetch failed (%s); retrying", exc or type(exc))
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                sub = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 1.0)
                continue
            self._idle.clear()
            try:
                await self.handle_batch(msgs)
            finally:
                self._idle.set()
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    async def drain(self, timeout: float) -> None:
        """Stop after the batch in hand (waiting at most `timeout` for it)."""
        self.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def handle_batch(self, msgs: Sequence[Msg]) -> None:
        items: list[Item] = []
        for msg in msgs:
            item = await self._parse(msg)
            if item is not None:
                items.append(item)
        if not items:
            return
        try:
            await self.apply(items)
        except Exception as exc:
            if len(items) == 1:
                await self._failed(items[0], exc)
                return
            log.warning("projector: a batch of %d failed (%s); one by one", len(items), exc)
            for item in items:
                try:
                    await self.apply([item])
                except Exception as error:
                    await self._failed(item, error)
                else:
                    await self._settled(item)
            return
        for item in items:
            await self._settled(item)
        with contextlib.suppress(Exception):
            await self.bus.nc.flush(timeout=5)

    async def apply(self, items: Sequence[Item]) -> None:
        """Record and project `items` in one transaction, in stream order."""
        async with self.db.session() as session:
            if any(self._handler(item) is not None and self._handler(item).orm for item in items):  # type: ignore[union-attr]
                await session.orm()  # the ORM's transaction first; lean writes join it
            if self.feed is not None:
                foreign = [
                    (i.envelope, i.sequence) for i in items if i.envelope.source != API_SOURCE
                ]
                await self.feed.append(session, foreign)
            index = 0
            while index < len(items):
                handler = self._handler(items[index])
                end = index + 1
                while end < len(items) and self._handler(items[end]) is handler:
                    end += 1
                if handler is not None:
                    await handler.apply(
                        session, [(i.payload, i.sequence) for i in items[index:end]]
                    )
                index = end
            await session.commit()
        self.handled += sum(1 for item in items if item.invalid is None)
        self.batches += 1

    @staticmethod
    def _handler(item: Item) -> Handler | None:
        return None if item.payload is None else HANDLERS.get(type(item.payload))

    async def _parse(self, msg: Msg) -> Item | None:
        meta = msg.metadata
        sequence, deliveries = meta.sequence.stream, meta.num_delivered
        try:
            envelope = Envelope.from_bytes(msg.data)
        except (ValidationError, ValueError) as exc:
            await self._dead_letter(msg, sequence, deliveries, f"malformed envelope: {exc}")
            return None
        if deliveries > self.max_deliver:
            await self._dead_letter(
                msg, sequence, deliveries, "delivered more than max_deliver times"
            )
            return None
        payload, invalid = None, None
        if envelope.type in BY_TYPE:
            try:
                payload = parse_payload(envelope)
            except ValidationError as exc:
                invalid = f"ValidationError: {exc}"
        return Item(msg, envelope, payload, sequence, deliveries, invalid)

    async def _settled(self, item: Item) -> None:
        """After the commit: ack, or dead-letter a payload that did not validate (it is in the
        history, as every event is, but can never be projected)."""
        if item.invalid is not None:
            await self._dead_letter(item.msg, item.sequence, item.deliveries, item.invalid)
        else:
            await self._ack(item.msg)

    async def _failed(self, item: Item, exc: Exception) -> None:
        if item.deliveries >= self.max_deliver:
            await self._dead_letter(
                item.msg, item.sequence, item.deliveries, f"{type(exc).__name__}: {exc}"
            )
            return
        delay = BACKOFF_SECONDS[min(item.deliveries, len(BACKOFF_SECONDS)) - 1]
        log.warning(
            "projecting %s failed (delivery %d/%d): %s; retrying in %.1fs",
            item.envelope.type,
            item.deliveries,
            self.max_deliver,
            exc,
            delay,
            exc_info=exc,
        )
        with contextlib.suppress(Exception):
            await item.msg.nak(delay=delay)

    async def _ack(self, msg: Msg) -> None:
        try:
            await msg.ack()
        except Exception as exc:
            # The effects are committed and idempotent; a redelivery is harmless.
            log.warning("ack failed (%s); the message may be redelivered", exc)

    async def _dead_letter(self, msg: Msg, sequence: int, deliveries: int, error: str) -> None:
        log.error("moving event %d to the DLQ after %d deliveries: %s", sequence, deliveries, error)
        headers = {
            HEADER_ERROR: error[:4000].replace("\r", " ").replace("\n", " "),
            HEADER_SUBJECT: msg.subject,
            HEADER_DELIVERIES: str(deliveries),
            HEADER_CONSUMER: DURABLE,
        }
        try:
            await self.bus.publish_raw(
                dlq_subject(SERVICE), msg.data, f"dlq-{EVENTS_STREAM}-{sequence}", headers=headers
            )
        except BusUnavailable:
            # Not stored in the DLQ: leave it to be redelivered rather than lose it.
            with contextlib.suppress(Exception):
                await msg.nak(delay=BACKOFF_SECONDS[-1])
            return
        await self._ack(msg)
        self.dead_lettered += 1
