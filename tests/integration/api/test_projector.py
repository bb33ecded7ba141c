"""The projector's batches on SQLite and PostgreSQL, with the real bus: one transaction per batch,
the per-event order and staleness rules inside a batch, and a poison event that fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from libs.common.bus import HEADER_ERROR, Bus
from libs.common.contract import DLQ_STREAM, Envelope
from libs.common.contract.cluster import ClusterDeleted, ClusterStatusChanged, Condition
from libs.common.settings import Settings
from services.api import projector as projection
from services.api.clusters import service as clusters
from services.api.clusters.schemas import ClusterCreate, ClusterRead
from services.api.events.service import EventFeed
from services.api.kit.db import Database, Session
from services.api.projector import Projector


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(settings.resolved_database_url)
    await database.migrate()
    yield database
    await database.dispose()


async def create_cluster(db: Database, name: str) -> ClusterRead:
    async with db.session() as session:
        cluster = await clusters.create(session, ClusterCreate(name=name))
        await session.commit()
    return cluster


async def read(db: Database, ref: str) -> ClusterRead:
    async with db.session() as session:
        return await clusters.get(session, ref)


def status(cluster_id: str, generation: int, phase: str, **extra: Any) -> ClusterStatusChanged:
    return ClusterStatusChanged(
        cluster_id=cluster_id,
        observed_generation=generation,
        phase=phase,  # type: ignore[arg-type]
        conditions=[
            Condition(
                type="ControlPlaneReady",
                status="True" if phase == "Ready" else "False",
                reason=phase,
                message="",
                last_transition_time=datetime.now(UTC),
            )
        ],
        **extra,
    )


async def run_until(projector: Projector, handled: int, timeout: float = 15.0) -> None:
    """Run the projector until it has handled (applied or dead-lettered) `handled` messages."""
    task = asyncio.create_task(projector.run())
    try:
        async with asyncio.timeout(timeout):
            while projector.handled + projector.dead_lettered < handled:
                await asyncio.sleep(0.02)
    finally:
        await projector.drain(5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def dead_letters(bus: Bus) -> list[tuple[Envelope, str]]:
    sub = await bus.nc.jetstream().pull_subscribe("nest.dlq.api", durable="t", stream=DLQ_STREAM)
    found: list[tuple[Envelope, str]] = []
    try:
        for msg in await sub.fetch(10, timeout=2):
            found.append((Envelope.from_bytes(msg.data), (msg.headers or {}).get(HEADER_ERROR, "")))
    except Exception:
        pass
    return found


class TestBatches:
    async def test_a_stale_and_a_fresh_event_for_one_cluster_in_one_batch(
        self, db: Database, bus: Bus, settings: Settings
    ) -> None:
        cluster = await create_cluster(db, "batched")
        other = await create_cluster(db, "neighbour")
        # Published before the projector starts, so one fetch takes them all: one batch.
        await bus.publish(status(cluster.id, 1, "Provisioning"), source="provisioner")
        await bus.publish(status(cluster.id, 1, "Ready"), source="provisioner")
        await bus.publish(status(other.id, 1, "Ready"), source="provisioner")
        await bus.publish(status(cluster.id, 0, "Degraded"), source="provisioner")  # stale
        feed = EventFeed(db, settings)
        projector = Projector(db, bus, feed, max_deliver=3)
        await run_until(projector, 4)
        assert projector.batches == 1
        got = await read(db, cluster.id)
        assert (got.status.phase, got.status.observed_generation) == ("Ready", 1)
        assert (await read(db, other.id)).status.phase == "Ready"
        assert feed.recorded == 4  # all four are in the history, stale or not

    async def test_order_inside_a_batch_follows_the_stream(
        self, db: Database, bus: Bus, settings: Settings
    ) -> None:
        cluster = await create_cluster(db, "ordered")
        for phase in ("Provisioning", "Degraded", "Ready", "Degraded"):
            await bus.publish(status(cluster.id, 1, phase), source="provisioner")
        projector = Projector(db, bus, EventFeed(db, settings), max_deliver=3)
        await run_until(projector, 4)
        assert (await read(db, cluster.id)).status.phase == "Degraded"

    async def test_a_poison_event_fails_alone(
        self,
        db: Database,
        bus: Bus,
        settings: Settings,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        cluster = await create_cluster(db, "survives")
        doomed = await create_cluster(db, "poisoned")

        async def explode(session: Session, run: projection.Batch) -> None:
            raise RuntimeError("this handler cannot apply its event")

        monkeypatch.setitem(projection.HANDLERS, ClusterDeleted, projection.Handler(explode))
        await bus.publish(status(cluster.id, 1, "Provisioning"), source="provisioner")
        poison = await bus.publish(
            ClusterDeleted(cluster_id=doomed.id, observed_generation=1), source="provisioner"
        )
        await bus.publish(status(cluster.id, 1, "Ready"), source="provisioner")
        # A payload that does not validate goes to the DLQ at once, before the batch runs.
        invalid = Envelope(
            source="/nest/provisioner", type="io.nest.cluster.status_changed.v1", data={"x": 1}
        )
        await bus.publish_envelope("nest.event.cluster.status_changed", invalid)
        feed = EventFeed(db, settings)
        projector = Projector(db, bus, feed, max_deliver=1)
        await run_until(projector, 4)
        got = await read(db, cluster.id)
        assert got.status.phase == "Ready"  # its neighbours in the batch committed
        assert (await read(db, doomed.id)).status.phase == "Pending"
        letters = await dead_letters(bus)
        assert {envelope.id for envelope, _ in letters} == {poison.id, invalid.id}
        errors = {envelope.id: error for envelope, error in letters}
        assert "cannot apply its event" in errors[poison.id]
        assert "ValidationError" in errors[invalid.id]

    async def test_the_apis_own_events_are_not_recorded_again(
        self, db: Database, bus: Bus, settings: Settings
    ) -> None:
        feed = EventFeed(db, settings)
        from services.api.kit.outbox import Outbox

        outbox = Outbox(db, bus)
        outbox.on_event.append(feed.on_api_events)
        cluster = await create_cluster(db, "declared")  # stages ClusterDeclared: recorded now
        assert feed.recorded == 1
        await outbox.publish_pending()  # the event goes out to NEST_EVENTS ...
        projector = Projector(db, bus, feed, max_deliver=3)
        await run_until(projector, 1)  # ... and comes back: projected, not recorded again
        assert feed.recorded == 1
        assert (await read(db, "declared")).id == cluster.id
