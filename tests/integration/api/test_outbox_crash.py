"""The transactional outbox survives crashes: nothing committed is lost, nothing is sent twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from sqlalchemy import update

from libs.common.bus import Bus
from libs.common.contract import INTENTS_STREAM, Envelope
from libs.common.nats_server import EmbeddedNats
from libs.common.settings import Settings
from services.api.kit import outbox
from services.api.kit.db import Database
from services.api.models import OutboxMessage
from tests.support.parts import free_port
from tests.support.processes import AUTH, kill_group, nest_process, wait_http


async def drain_intents(url: str, settle: float = 2.0) -> list[Envelope]:
    """Every intent on the work queue, waiting `settle` seconds after the last one for more."""
    bus = Bus([url], name="test-consumer")
    await bus.connect()
    sub = await bus.nc.jetstream().pull_subscribe(
        "nest.intent.>", durable="test-provisioner", stream=INTENTS_STREAM
    )
    got: list[Envelope] = []
    idle_since = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - idle_since < settle:
        try:
            msgs = await sub.fetch(10, timeout=0.3)
        except Exception:
            continue
        for msg in msgs:
            got.append(Envelope.from_bytes(msg.data))
            await msg.ack_sync()
        idle_since = asyncio.get_running_loop().time()
    await bus.close()
    return got


async def test_sigkill_after_commit_before_publish_publishes_exactly_once(tmp_path: Path) -> None:
    nats_port, api_port = free_port(), free_port()
    env = {
        "NEST_DATA_DIR": str(tmp_path / "data"),
        "NEST_NATS_URL": f"nats://127.0.0.1:{nats_port}",  # nothing listens there yet
        "NEST_API_PORT": str(api_port),
    }
    api = nest_process(["run", "api"], env, tmp_path / "api-1.log")
    try:
        wait_http(f"http://127.0.0.1:{api_port}/healthz", process=api)
        response = httpx.post(
            f"http://127.0.0.1:{api_port}/api/v1/clusters", json={"name": "survivor"}, headers=AUTH
        )
        assert response.status_code == 201
        cluster_id = response.json()["id"]
        assert httpx.get(f"http://127.0.0.1:{api_port}/readyz").status_code == 503
    finally:
        kill_group(api)  # SIGKILL: committed, never published

    nats = EmbeddedNats(tmp_path / "nats", port=nats_port)
    nats.start()
    api = nest_process(["run", "api"], env, tmp_path / "api-2.log")
    try:
        wait_http(f"http://127.0.0.1:{api_port}/readyz", process=api)
        received = await drain_intents(nats.url)
        assert [(e.type, e.subject) for e in received] == [
            ("io.nest.cluster.reconcile.v1", cluster_id)
        ]
    finally:
        kill_group(api)
        nats.stop()


async def test_crash_after_publish_before_marking_sent_is_deduplicated(
    tmp_path: Path, nats_url: str, bus: Bus
) -> None:
    settings = Settings(data_dir=tmp_path, nats_url=nats_url)
    db = Database(settings.resolved_database_url)
    await db.migrate()
    from libs.common.contract.cluster import ClusterSpec, ReconcileCluster

    relay = outbox.Outbox(db, bus)
    async with db.session() as session:
        envelope = outbox.stage(
            session,
            ReconcileCluster(cluster_id="c1", name="c1", generation=1, spec=ClusterSpec()),
            subject="c1",
        )
        await session.commit()
    assert await relay.publish_pending() == 1
    # As if the process died after the PubAck but before its UPDATE committed:
    async with db.orm_sessions() as orm:
        await orm.execute(update(OutboxMessage).values(sent_at=None))
        await orm.commit()
    assert await relay.publish_pending() == 1
    received = await drain_intents(nats_url, settle=1.0)
    assert [e.id for e in received] == [envelope.id]
    await db.dispose()
