"""The event projector: a durable consumer on NEST_EVENTS that applies facts to the Foundry DB."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.bus import Bus, Consumer, ConsumerSpec, Delivery
from libs.common.contract import BY_TYPE, EVENTS_STREAM, Envelope, parse_payload
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
from services.api.restores import service as restores

DURABLE = "api-projector"

RecordEvent = Callable[[Envelope, int], Awaitable[None]]
"""Stores an event in the history (idempotently) given its envelope and stream sequence."""


class Projector:
    """Routes each event type to the domain function that projects it."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], record: RecordEvent | None = None
    ) -> None:
        self.sessions = sessions
        self.record = record

    async def handle(self, envelope: Envelope, delivery: Delivery) -> None:
        if self.record is not None:
            # Every event, whatever its type, goes to the history (and its webhooks) first.
            await self.record(envelope, delivery.stream_sequence)
            if envelope.type not in BY_TYPE:
                return
        payload = parse_payload(envelope)
        async with self.sessions() as session:
            if isinstance(payload, ClusterStatusChanged):
                await clusters.apply_status(session, payload, delivery.stream_sequence)
            elif isinstance(payload, ClusterDeleted):
                await clusters.apply_deleted(session, payload)
            # Backups and their drills (services/api/backups).
            elif isinstance(payload, BackupStarted):
                await backups.apply_started(session, payload)
            elif isinstance(payload, BackupCompleted):
                await backups.apply_completed(session, payload)
            elif isinstance(payload, BackupFailed):
                await backups.apply_failed(session, payload)
            elif isinstance(payload, DrillPassed | DrillFailed):
                await backups.apply_drill(session, payload)
            # Cluster restores (services/api/restores).
            elif isinstance(payload, RestoreProgressed):
                await restores.apply_progress(session, payload)

    def consumer(self, bus: Bus, *, max_deliver: int) -> Consumer:
        spec = ConsumerSpec(
            stream=EVENTS_STREAM,
            durable=DURABLE,
            filter_subject="nest.event.>",
            service="api",
            max_deliver=max_deliver,
            concurrency=8,
        )
        return bus.consumer(spec, self.handle)
