"""The event projector: a durable consumer on NEST_EVENTS that applies facts to the Foundry DB."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.bus import Bus, Consumer, ConsumerSpec, Delivery
from libs.common.contract import EVENTS_STREAM, Envelope, parse_payload
from libs.common.contract.cluster import ClusterDeleted, ClusterStatusChanged
from services.api.clusters import service as clusters

DURABLE = "api-projector"


class Projector:
    """Routes each event type to the domain function that projects it."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def handle(self, envelope: Envelope, delivery: Delivery) -> None:
        payload = parse_payload(envelope)
        async with self.sessions() as session:
            if isinstance(payload, ClusterStatusChanged):
                await clusters.apply_status(session, payload, delivery.stream_sequence)
            elif isinstance(payload, ClusterDeleted):
                await clusters.apply_deleted(session, payload)

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
