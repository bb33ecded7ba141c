"""The backup service on a real NATS: intents in, events out, schedules emitted once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest

from libs.common.bus import Bus, RpcError
from libs.common.contract.backup import RunBackup
from libs.common.contract.etcd_access import ETCD_CLIENT_RPC_SUBJECT, EtcdClientIssued
from libs.common.settings import Settings
from services.backup.catalog import CLUSTERS_BUCKET, LOCATIONS_BUCKET, POLICIES_BUCKET
from services.backup.schedules.records import SCHEDULES_BUCKET, ScheduleRecord, Schedules
from services.backup.schedules.rpo import RPO_BUCKET
from services.backup.service import LEASES_BUCKET, BackupService
from services.backup.stores import artifacts
from services.backup.stores.local import LocalStore
from tests.support.etcd import EtcdServer

CATALOG_BUCKETS = (LOCATIONS_BUCKET, POLICIES_BUCKET, CLUSTERS_BUCKET)


@pytest.fixture
async def clean_buckets(bus: Bus) -> Bus:
    js = bus.nc.jetstream()
    for bucket in (SCHEDULES_BUCKET, LEASES_BUCKET, *CATALOG_BUCKETS, RPO_BUCKET):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_key_value(bucket)
    return bus


def backup_settings(tmp_path: Path, nats_url: str, **overrides: Any) -> Settings:
    database = tmp_path / "nest.db"
    if not database.exists():
        connection = sqlite3.connect(database)
        connection.execute("CREATE TABLE clusters (id TEXT PRIMARY KEY, name TEXT)")
        connection.execute("INSERT INTO clusters VALUES ('c1', 'demo')")
        connection.commit()
        connection.close()
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": f"sqlite:///{database}",
        "nats_url": nats_url,
        "backup_dir": tmp_path / "backups",
        "max_deliver": 2,
        "shutdown_timeout_seconds": 3,
        "instance": "replica-a",
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def events(bus: Bus) -> AsyncIterator[list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        received.append(json.loads(msg.data))

    subscription = await bus.nc.subscribe("nest.event.backup.>", cb=collect)
    try:
        yield received
    finally:
        await subscription.unsubscribe()


async def wait_for(received: list[dict[str, Any]], kind: str, count: int = 1) -> None:
    for _ in range(400):
        if sum(1 for e in received if e["type"] == kind) >= count:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{kind} x{count} not seen; got {[e['type'] for e in received]}")


async def test_run_intent_produces_a_verified_backup_and_events(
    clean_buckets: Bus, tmp_path: Path, nats_url: str
) -> None:
    bus = clean_buckets
    service = BackupService(backup_settings(tmp_path, nats_url), tick_seconds=3600)
    async with events(bus) as received:
        await service.start(bus)
        try:
            await bus.publish(RunBackup(target="foundry", kind="foundry"), source="test")
            await wait_for(received, "io.nest.backup.completed.v1")
        finally:
            await service.stop(3)
    types = [e["type"] for e in received]
    assert types == ["io.nest.backup.started.v1", "io.nest.backup.completed.v1"]
    completed = received[1]["data"]
    assert completed["verified"] is True
    assert completed["encrypted"] is False
    listed = await artifacts.list_backups(LocalStore(tmp_path / "backups"), "foundry")
    assert [str(m.ref) for m in listed] == [completed["backup"]]


async def test_failure_is_reported_with_its_reason(
    clean_buckets: Bus, tmp_path: Path, nats_url: str
) -> None:
    bus = clean_buckets
    settings = backup_settings(tmp_path, nats_url, database_url="sqlite:////nonexistent/nest.db")
    service = BackupService(settings, tick_seconds=3600)
    async with events(bus) as received:
        await service.start(bus)
        try:
            await bus.publish(RunBackup(target="foundry", kind="foundry"), source="test")
            await wait_for(received, "io.nest.backup.failed.v1")
        finally:
            await service.stop(3)
    failed = next(e for e in received if e["type"] == "io.nest.backup.failed.v1")["data"]
    assert failed["reason"] == "DumpError"
    assert "does not exist" in failed["message"]


async def test_missed_runs_become_one_run_emitted_by_one_replica(
    clean_buckets: Bus, tmp_path: Path, nats_url: str
) -> None:
    bus = clean_buckets
    now = datetime(2026, 11, 21, 12, 30, tzinfo=UTC)
    replicas = [
        BackupService(
            backup_settings(tmp_path, nats_url, instance=name), tick_seconds=3600, clock=lambda: now
        )
        for name in ("replica-a", "replica-b")
    ]
    # Down for three days: 72 hourly runs missed.
    schedules = await Schedules.open(bus)
    missed = ScheduleRecord(
        target="foundry", kind="foundry", cron="0 * * * *", last_run=now - timedelta(days=3)
    )
    assert await schedules.put(missed, None)
    async with events(bus) as received:
        # Both replicas start (each scheduler ticks at once); only the lease holder emits.
        for replica in replicas:
            await replica.start(bus)
        try:
            await wait_for(received, "io.nest.backup.completed.v1")
            assert [await r.tick() for r in replicas] == [[], []]  # nothing more is due
            await asyncio.sleep(0.3)
        finally:
            for replica in replicas:
                await replica.stop(3)
    assert [e["type"] for e in received].count("io.nest.backup.completed.v1") == 1
    stored = await schedules.get("foundry")
    assert stored is not None
    assert stored[0].last_run == datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    assert stored[0].cron == "0 * * * *"


async def test_new_schedule_waits_for_its_first_firing(
    clean_buckets: Bus, tmp_path: Path, nats_url: str
) -> None:
    bus = clean_buckets
    now = datetime(2026, 11, 21, 12, 30, tzinfo=UTC)
    service = BackupService(
        backup_settings(tmp_path, nats_url), tick_seconds=3600, clock=lambda: now
    )
    await service.start(bus)
    try:
        schedules = await Schedules.open(bus)
        await schedules.put(
            ScheduleRecord(target="cluster-demo", kind="etcd", cron="*/5 * * * *"), None
        )
        assert await service.tick() == []
        stored = await schedules.get("cluster-demo")
        assert stored is not None
        assert stored[0].last_run == now
    finally:
        await service.stop(3)


async def test_etcd_backup_end_to_end_with_access_from_the_provisioner_rpc(
    clean_buckets: Bus, tmp_path: Path, nats_url: str, etcd_server: EtcdServer
) -> None:
    """RunBackup(kind=etcd) -> client access over request/reply -> snapshot -> verified backup."""
    bus = clean_buckets
    asked: list[dict[str, Any]] = []

    async def issue(body: dict[str, Any]) -> dict[str, Any]:
        asked.append(body)
        if body["clusterId"] != "c-1":
            raise RpcError("not-found", f"no cluster {body['clusterId']}")
        return EtcdClientIssued(
            url=etcd_server.url,
            ca_pem=etcd_server.tls.ca_pem.decode(),
            cert_pem=etcd_server.tls.client_cert_pem.decode(),
            key_pem=etcd_server.tls.client_key_pem.decode(),
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        ).wire()

    responder = await bus.serve(ETCD_CLIENT_RPC_SUBJECT, issue, queue="provisioner")
    service = BackupService(backup_settings(tmp_path, nats_url), tick_seconds=3600)
    try:
        async with events(bus) as received:
            await service.start(bus)
            try:
                for cluster in ("c-1", "c-unknown"):
                    await bus.publish(
                        RunBackup(target="cluster-demo", kind="etcd", cluster_id=cluster),
                        source="test",
                    )
                await wait_for(received, "io.nest.backup.completed.v1")
                await wait_for(received, "io.nest.backup.failed.v1")
            finally:
                await service.stop(3)
    finally:
        await responder.unsubscribe()
    completed = next(e for e in received if e["type"] == "io.nest.backup.completed.v1")["data"]
    failed = next(e for e in received if e["type"] == "io.nest.backup.failed.v1")["data"]
    assert completed["etcdRevision"] > 0
    assert completed["verified"] is True
    assert failed["reason"] == "EtcdAccessUnavailable"
    assert "not-found" in failed["message"]
    assert {body["clusterId"] for body in asked} == {"c-1", "c-unknown"}
    listed = await artifacts.list_backups(LocalStore(tmp_path / "backups"), "cluster-demo")
    assert [m.kind for m in listed] == ["etcd"]
