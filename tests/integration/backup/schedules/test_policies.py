"""Policy-driven scheduling in the backup service on a real NATS and a real S3 (SeaweedFS).

The API's intents (locations with the secret sealed, policies) and cluster events are published
exactly as the API's outbox would; the scheduler is driven with a fixed clock so firing times
are exact, and every run really backs up a SQLite Foundry DB into the location's bucket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest

from libs.common.bus import Bus
from libs.common.contract.backup import RunBackup
from libs.common.contract.backup_policy import (
    ApplyBackupLocation,
    ApplyBackupPolicy,
    BackupPolicySpec,
    DeleteBackupPolicy,
    SealedBackupLocation,
    SealedLocationSpec,
)
from libs.common.contract.cluster import ClusterDeclared, ClusterDeleted
from libs.common.secrets import Sealer
from libs.common.settings import Settings
from services.backup.catalog import (
    CLUSTERS_BUCKET,
    LOCATIONS_BUCKET,
    POLICIES_BUCKET,
    Catalog,
)
from services.backup.schedules.records import SCHEDULES_BUCKET, Schedules
from services.backup.schedules.rpo import RPO_BUCKET, RpoBook
from services.backup.service import LEASES_BUCKET, BackupService
from services.backup.stores import artifacts
from services.backup.stores.local import LocalStore
from services.backup.stores.s3 import S3Store
from tests.integration.backup.conftest import s3_config
from tests.support.s3 import SeaweedS3

SECRETS_KEY = "policy-test-secrets-key-0123456789"
BUCKETS = (
    SCHEDULES_BUCKET,
    LEASES_BUCKET,
    LOCATIONS_BUCKET,
    POLICIES_BUCKET,
    CLUSTERS_BUCKET,
    RPO_BUCKET,
)


async def _delete_buckets(bus: Bus) -> None:
    js = bus.nc.jetstream()
    for bucket in BUCKETS:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_key_value(bucket)


@pytest.fixture
async def clean(bus: Bus) -> AsyncIterator[Bus]:
    await _delete_buckets(bus)
    yield bus
    await _delete_buckets(bus)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def settings_for(tmp_path: Path, nats_url: str, **overrides: Any) -> Settings:
    database = tmp_path / "nest.db"
    if not database.exists():
        connection = sqlite3.connect(database)
        connection.execute("CREATE TABLE clusters (id TEXT PRIMARY KEY, name TEXT)")
        connection.execute("INSERT INTO clusters VALUES ('c1', 'demo')")
        connection.execute("CREATE TABLE alembic_version (version_num TEXT PRIMARY KEY)")
        connection.execute("INSERT INTO alembic_version VALUES ('0005')")
        connection.commit()
        connection.close()
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": f"sqlite:///{database}",
        "nats_url": nats_url,
        "backup_dir": tmp_path / "settings-store",
        "secrets_key": SECRETS_KEY,
        "max_deliver": 2,
        "shutdown_timeout_seconds": 3,
        "instance": "replica-a",
    }
    values.update(overrides)
    return Settings(**values)


def encryption_keys() -> str:
    return json.dumps({"k1": base64.b64encode(secrets.token_bytes(32)).decode()})


def s3_location(server: SeaweedS3, bucket: str, location_id: str = "loc-s3") -> ApplyBackupLocation:
    """What the API stages for an S3 location: the secret sealed for this location id."""
    sealed = Sealer(SECRETS_KEY.encode()).seal(
        server.secret_key, context=f"backup-location:{location_id}"
    )
    spec = SealedLocationSpec(
        kind="s3",
        endpoint_url=server.endpoint,
        bucket=bucket,
        prefix="nest/backups",
        access_key_id=server.access_key,
        path_style=True,
    )
    return ApplyBackupLocation(
        location_id=location_id,
        name="offsite",
        generation=1,
        location=SealedBackupLocation(spec=spec, sealed_secret_access_key=sealed),
    )


def local_location(path: Path, location_id: str = "loc-disk") -> ApplyBackupLocation:
    return ApplyBackupLocation(
        location_id=location_id,
        name="disk",
        generation=1,
        location=SealedBackupLocation(spec=SealedLocationSpec(kind="local", path=str(path))),
    )


def policy(policy_id: str, location_id: str, generation: int = 1, **spec: Any) -> ApplyBackupPolicy:
    values: dict[str, Any] = {
        "schedule": "0 * * * *",
        "targets": {"foundry": True},
        "locationId": location_id,
        "drillSchedule": None,
    }
    values.update(spec)
    return ApplyBackupPolicy(
        policy_id=policy_id,
        name=policy_id,
        generation=generation,
        spec=BackupPolicySpec.model_validate(values),
    )


@contextlib.asynccontextmanager
async def events(bus: Bus, subject: str = "nest.event.backup.>") -> AsyncIterator[list[Any]]:
    received: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        received.append(json.loads(msg.data))

    subscription = await bus.nc.subscribe(subject, cb=collect)
    try:
        yield received
    finally:
        await subscription.unsubscribe()


def of_type(received: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e["data"] for e in received if e["type"] == f"io.nest.backup.{name}.v1"]


async def wait_for(received: list[dict[str, Any]], name: str, count: int = 1) -> None:
    for _ in range(600):
        if len(of_type(received, name)) >= count:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{name} x{count} not seen; got {[e['type'] for e in received]}")


async def until(check: Any, what: str) -> None:
    for _ in range(400):
        if await check():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"timed out waiting for {what}")


async def knows_policy(service: BackupService, policy_id: str, generation: int = 1) -> None:
    async def check() -> bool:
        held = await service._catalog.policy(policy_id)  # type: ignore[union-attr]
        return held is not None and held.generation >= generation

    await until(check, f"policy {policy_id} at generation {generation}")


async def schedule_keys(bus: Bus) -> set[str]:
    return {record.record_key for record, _ in await (await Schedules.open(bus)).all()}


async def has_keys(bus: Bus, keys: set[str]) -> bool:
    return await schedule_keys(bus) == keys


T0 = datetime(2026, 11, 21, 12, 30, tzinfo=UTC)


async def test_scheduled_runs_land_encrypted_in_the_policys_bucket_with_retention(
    clean: Bus, tmp_path: Path, nats_url: str, s3_server: SeaweedS3
) -> None:
    bus = clean
    bucket = s3_server.new_bucket()
    clock = Clock(T0)
    service = BackupService(
        settings_for(tmp_path, nats_url, backup_encryption_keys=encryption_keys()),
        tick_seconds=3600,
        clock=clock,
    )
    async with events(bus) as received:
        await service.start(bus)
        try:
            # No policy yet: the settings' Foundry DB schedule (the scheduler's first tick).
            await until(lambda: has_keys(bus, {"foundry"}), "the settings' schedule")
            await bus.publish(s3_location(s3_server, bucket), source="test")
            await bus.publish(
                policy("hourly", "loc-s3", encrypted=True, retention={"keepLast": 2}),
                source="test",
            )
            await knows_policy(service, "hourly")
            assert await service.tick() == []  # the new schedule waits for its first firing
            assert await schedule_keys(bus) == {"backup.hourly.foundry"}
            for hour in (13, 14, 15):
                clock.now = T0.replace(hour=hour, minute=0, second=20)
                assert await service.tick() == ["backup.hourly.foundry"]
                assert await service.tick() == []
                await wait_for(received, "completed", hour - 12)
        finally:
            await service.stop(3)
    completed = of_type(received, "completed")
    assert [c["policyId"] for c in completed] == ["hourly"] * 3
    assert {c["locationId"] for c in completed} == {"loc-s3"}
    first = completed[0]
    assert first["encrypted"] is True
    assert first["encryptionKeyId"] == "k1"
    assert first["verified"] is True
    assert first["plaintextBytes"] > 0
    assert first["storedSha256"] != first["plaintextSha256"]
    assert first["durationSeconds"] >= 0
    assert first["startedAt"] is not None
    started = of_type(received, "started")
    assert [s["trigger"] for s in started] == ["schedule"] * 3
    assert {s["locationId"] for s in started} == {"loc-s3"}
    # Retention keepLast 2: the third run pruned the first.
    assert completed[2]["pruned"] == [completed[0]["backup"]]
    store = S3Store(s3_config(s3_server, bucket))
    try:
        listed = await artifacts.list_backups(store, "foundry")
    finally:
        await store.close()
    assert [str(m.ref) for m in listed] == [c["backup"] for c in completed[1:]]
    assert all(m.encryption is not None and m.encryption.key_id == "k1" for m in listed)
    # Nothing went to the settings' store.
    assert not list((tmp_path / "settings-store").rglob("manifest.json"))


async def test_runs_by_policy_location_or_default_and_their_failures(
    clean: Bus, tmp_path: Path, nats_url: str
) -> None:
    """policyId -> its location; locationId -> that location; neither -> the `default` policy's
    location; an encrypted policy without keys fails with EncryptionKeyMissing."""
    bus = clean
    service = BackupService(settings_for(tmp_path, nats_url), tick_seconds=3600)
    async with events(bus) as received:
        await service.start(bus)
        try:
            await bus.publish(RunBackup(target="foundry", kind="foundry"), source="test")
            await wait_for(received, "completed", 1)
            await bus.publish(local_location(tmp_path / "a", "loc-a"), source="test")
            await bus.publish(local_location(tmp_path / "b", "loc-b"), source="test")
            await bus.publish(policy("sealed", "loc-a", encrypted=True), source="test")
            await knows_policy(service, "sealed")
            await bus.publish(
                RunBackup(target="foundry", kind="foundry", policy_id="sealed"), source="test"
            )
            await wait_for(received, "failed", 1)
            await bus.publish(
                RunBackup(target="foundry", kind="foundry", location_id="loc-b"), source="test"
            )
            await wait_for(received, "completed", 2)
            apply_default = policy("default-id", "loc-a", retention={"keepLast": 5})
            apply_default.name = "default"
            await bus.publish(apply_default, source="test")
            await knows_policy(service, "default-id")
            await bus.publish(RunBackup(target="foundry", kind="foundry"), source="test")
            await wait_for(received, "completed", 3)
            await bus.publish(
                RunBackup(target="foundry", kind="foundry", policy_id="no-such-policy"),
                source="test",
            )
            await wait_for(received, "failed", 2)
            # loc-b moves (generation 2): the next run writes to its new directory.
            moved = local_location(tmp_path / "b2", "loc-b")
            moved.generation = 2
            await bus.publish(moved, source="test")

            async def moved_known() -> bool:
                held = await service._catalog.location("loc-b")  # type: ignore[union-attr]
                return held is not None and held.generation == 2

            await until(moved_known, "loc-b at generation 2")
            await bus.publish(
                RunBackup(target="foundry", kind="foundry", location_id="loc-b"), source="test"
            )
            await wait_for(received, "completed", 4)
        finally:
            await service.stop(3)
    completed = of_type(received, "completed")
    failed = of_type(received, "failed")
    assert [(c["policyId"], c["locationId"]) for c in completed] == [
        (None, None),
        (None, "loc-b"),
        ("default-id", "loc-a"),
        (None, "loc-b"),
    ]
    assert completed[2]["encrypted"] is False
    assert [(f["reason"], f["policyId"]) for f in failed] == [
        ("EncryptionKeyMissing", "sealed"),
        ("PolicyNotFound", "no-such-policy"),
    ]
    assert "NEST_BACKUP_ENCRYPTION_KEYS" in failed[0]["message"]
    for directory, backup in (
        (tmp_path / "settings-store", completed[0]["backup"]),
        (tmp_path / "b", completed[1]["backup"]),
        (tmp_path / "a", completed[2]["backup"]),
        (tmp_path / "b2", completed[3]["backup"]),
    ):
        listed = await artifacts.list_backups(LocalStore(directory), "foundry")
        assert [str(m.ref) for m in listed] == [backup]


async def test_all_clusters_follows_declared_and_deleted_clusters(
    clean: Bus, tmp_path: Path, nats_url: str
) -> None:
    bus = clean
    clock = Clock(T0)
    service = BackupService(settings_for(tmp_path, nats_url), tick_seconds=3600, clock=clock)

    def declared(cluster_id: str, name: str, generation: int, **extra: Any) -> ClusterDeclared:
        return ClusterDeclared(
            cluster_id=cluster_id,
            name=name,
            generation=generation,
            kubernetes_version="1.31.4",
            **extra,
        )

    async def clusters_known(count: int) -> None:
        async def check() -> bool:
            return len(await service._catalog.clusters()) == count  # type: ignore[union-attr]

        await until(check, f"{count} live clusters")

    async with events(bus) as received:
        await service.start(bus)
        try:
            await bus.publish(local_location(tmp_path / "disk"), source="test")
            await bus.publish(
                policy(
                    "every",
                    "loc-disk",
                    targets={"allClusters": True},
                    drillSchedule="0 3 * * 0",
                ),
                source="test",
            )
            await knows_policy(service, "every")
            await bus.publish(declared("c-a", "alpha", 1), source="test")
            await bus.publish(declared("c-b", "beta", 1), source="test")
            await bus.publish(declared("c-a", "alpha", 2), source="test")
            await clusters_known(2)
            await service.tick()
            assert await schedule_keys(bus) == {
                "backup.every.cluster-alpha",
                "backup.every.cluster-beta",
                "drill.every.cluster-alpha",
                "drill.every.cluster-beta",
            }
            # beta is being deleted (same generation, deletion requested); alpha is gone.
            await bus.publish(declared("c-b", "beta", 1, deletion_requested=True), source="test")
            await clusters_known(1)
            await bus.publish(
                ClusterDeleted(cluster_id="c-a", observed_generation=2), source="test"
            )
            await clusters_known(0)
            # A stale declaration after the deletion does not bring alpha back.
            await bus.publish(declared("c-a", "alpha", 2), source="test")
            await bus.publish(declared("c-c", "gamma", 1), source="test")
            await clusters_known(1)
            clock.now = T0.replace(hour=13, minute=0, second=5)
            assert await service.tick() == []  # gamma's new schedules wait for their firing
            assert await schedule_keys(bus) == {
                "backup.every.cluster-gamma",
                "drill.every.cluster-gamma",
            }
            clock.now = T0.replace(hour=14, minute=0, second=5)
            assert await service.tick() == ["backup.every.cluster-gamma"]
            await wait_for(received, "failed", 1)  # no provisioner answers for its etcd here
            await bus.publish(DeleteBackupPolicy(policy_id="every", generation=1), source="test")

            async def policy_gone() -> bool:
                return not await service._catalog.policies()  # type: ignore[union-attr]

            await until(policy_gone, "the policy's deletion")
            await service.tick()
            assert await schedule_keys(bus) == {"foundry"}  # back to the settings' schedule
        finally:
            await service.stop(3)
    started = of_type(received, "started")
    assert [(s["target"], s["clusterId"], s["policyId"]) for s in started] == [
        ("cluster-gamma", "c-c", "every")
    ]
    failed = of_type(received, "failed")[0]
    assert failed["reason"] == "EtcdAccessUnavailable"
    assert failed["policyId"] == "every"


async def test_schedules_survive_a_restart_and_two_replicas_emit_once(
    clean: Bus, tmp_path: Path, nats_url: str
) -> None:
    bus = clean
    clock = Clock(T0)
    first = BackupService(settings_for(tmp_path, nats_url), tick_seconds=3600, clock=clock)
    await first.start(bus)
    try:
        await bus.publish(local_location(tmp_path / "disk"), source="test")
        await bus.publish(policy("hourly", "loc-disk"), source="test")
        await knows_policy(first, "hourly")
        assert await first.tick() == []
    finally:
        await first.stop(3)
    # Down for three days; two replicas come back, both ticking at once. (The pause lets the
    # stopped consumer's last pull request expire, as it would while a process restarts.)
    await asyncio.sleep(1.5)
    clock.now = T0 + timedelta(days=3, minutes=10)
    replicas = [
        BackupService(
            settings_for(tmp_path, nats_url, instance=name), tick_seconds=3600, clock=clock
        )
        for name in ("replica-a", "replica-b")
    ]
    async with events(bus) as received:
        for replica in replicas:
            await replica.start(bus)
        try:
            await wait_for(received, "completed", 1)
            assert [await r.tick() for r in replicas] == [[], []]
            await asyncio.sleep(0.5)
        finally:
            for replica in replicas:
                await replica.stop(3)
    assert len(of_type(received, "completed")) == 1
    (started,) = of_type(received, "started")
    assert started["policyId"] == "hourly"
    stored = await (await Schedules.open(bus)).get("backup.hourly.foundry")
    assert stored is not None
    assert stored[0].last_run == datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    listed = await artifacts.list_backups(LocalStore(tmp_path / "disk"), "foundry")
    assert len(listed) == 1


async def test_rpo_missed_once_per_period_and_reset_by_a_success(
    clean: Bus, tmp_path: Path, nats_url: str
) -> None:
    bus = clean
    start = datetime.now(UTC).replace(microsecond=0)
    clock = Clock(start)
    replicas = [
        BackupService(
            settings_for(tmp_path, nats_url, instance=name), tick_seconds=3600, clock=clock
        )
        for name in ("replica-a", "replica-b")
    ]
    async with events(bus) as received:
        for replica in replicas:
            await replica.start(bus)
        try:
            await bus.publish(local_location(tmp_path / "disk"), source="test")
            # Yearly schedule, RPO one hour: nothing runs, so the objective is missed.
            await bus.publish(
                policy("yearly", "loc-disk", schedule="0 0 1 1 *", rpoMinutes=60), source="test"
            )
            for replica in replicas:
                await knows_policy(replica, "yearly")
            a, b = replicas
            await a.tick()  # first seen now
            for minutes in (30, 59):
                clock.now = start + timedelta(minutes=minutes)
                await a.tick()
            assert of_type(received, "rpo_missed") == []
            clock.now = start + timedelta(minutes=61)
            await a.tick()
            await b.tick()  # a second replica racing the same tick publishes nothing new
            await a.tick()
            clock.now = start + timedelta(minutes=119)
            await a.tick()
            await asyncio.sleep(0.3)
            assert len(of_type(received, "rpo_missed")) == 1
            clock.now = start + timedelta(minutes=121)
            await b.tick()
            await wait_for(received, "rpo_missed", 2)
            # A success resets it.
            await bus.publish(
                RunBackup(target="foundry", kind="foundry", policy_id="yearly"), source="test"
            )
            await wait_for(received, "completed", 1)
            success = datetime.fromisoformat(of_type(received, "completed")[0]["completedAt"])
            rpo = await RpoBook.open(bus)
            held = await rpo.get("yearly.foundry")
            assert held is not None
            assert held[0].last_success == success
            clock.now = success + timedelta(minutes=59)
            await a.tick()
            clock.now = success + timedelta(minutes=61)
            await a.tick()
            await wait_for(received, "rpo_missed", 3)
            await a.tick()
            await asyncio.sleep(0.3)
        finally:
            for replica in replicas:
                await replica.stop(3)
    missed = of_type(received, "rpo_missed")
    assert len(missed) == 3
    assert [m["lastSuccessAt"] for m in missed[:2]] == [None, None]
    assert missed[2]["lastSuccessAt"] is not None
    assert datetime.fromisoformat(missed[2]["lastSuccessAt"]) == success
    assert {(m["policyId"], m["target"], m["kind"], m["rpoSeconds"]) for m in missed} == {
        ("yearly", "foundry", "foundry", 3600)
    }


async def test_drill_schedule_drills_the_newest_backup(
    clean: Bus, tmp_path: Path, nats_url: str
) -> None:
    bus = clean
    clock = Clock(T0)
    service = BackupService(settings_for(tmp_path, nats_url), tick_seconds=3600, clock=clock)
    async with events(bus) as received:
        await service.start(bus)
        try:
            await bus.publish(local_location(tmp_path / "disk"), source="test")
            await bus.publish(
                policy("drilled", "loc-disk", schedule="0 0 1 1 *", drillSchedule="0 13 * * *"),
                source="test",
            )
            await knows_policy(service, "drilled")
            await bus.publish(
                RunBackup(target="foundry", kind="foundry", policy_id="drilled"), source="test"
            )
            await wait_for(received, "completed", 1)
            await service.tick()
            clock.now = T0.replace(hour=13, minute=0, second=30)
            assert await service.tick() == ["drill.drilled.foundry"]
            assert await service.tick() == []
            await wait_for(received, "drill_passed", 1)
        finally:
            await service.stop(3)
    (passed,) = of_type(received, "drill_passed")
    assert passed["backup"] == of_type(received, "completed")[0]["backup"]
    assert passed["policyId"] == "drilled"
    assert passed["locationId"] == "loc-disk"
    assert passed["tableRows"]["clusters"] == 1


async def test_catalog_takes_only_newer_generations_and_keeps_deletions(clean: Bus) -> None:
    """Redelivered, re-staged (API restart) and out-of-order messages leave the newest copy."""
    catalog = await Catalog.open(clean)
    assert await catalog.apply(policy("p", "l", generation=2, schedule="0 2 * * *"))
    assert not await catalog.apply(policy("p", "l", generation=2, schedule="0 9 * * *"))
    assert not await catalog.apply(policy("p", "l", generation=1, schedule="0 1 * * *"))
    held = await catalog.policy("p")
    assert held is not None
    assert (held.generation, held.spec and held.spec.schedule) == (2, "0 2 * * *")
    assert await catalog.apply(DeleteBackupPolicy(policy_id="p", generation=2))
    assert not await catalog.apply(policy("p", "l", generation=3))  # ids are never reused
    assert await catalog.policy("p") is None
    assert await catalog.policies() == []

    assert await catalog.apply(local_location(Path("/tmp/x"), "l"))
    assert not await catalog.apply(local_location(Path("/tmp/y"), "l"))  # same generation
    location = await catalog.location("l")
    assert location is not None
    assert location.location is not None
    assert location.location.spec.path == "/tmp/x"
