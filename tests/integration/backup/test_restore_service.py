"""The backup service takes PrepareRestore from the intent stream: a backup it made is verified,
staged at a signed URL its own server answers, and handed to the provisioner as RestoreEtcd."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats.js.errors

from libs.common.bus import Bus
from libs.common.contract.backup import RunBackup
from libs.common.contract.backup_policy import (
    ApplyBackupLocation,
    SealedBackupLocation,
    SealedLocationSpec,
)
from libs.common.contract.etcd_access import ETCD_CLIENT_RPC_SUBJECT, EtcdClientIssued
from libs.common.contract.restore import PrepareRestore
from libs.common.settings import Settings
from services.backup.service import BackupService
from services.backup.stores import artifacts
from services.backup.stores.local import LocalStore
from tests.support.etcd import EtcdServer


def settings_for(tmp_path: Path, nats_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'nest.db'}",
        nats_url=nats_url,
        backup_dir=tmp_path / "backups",
        backup_serve_port=0,
        max_deliver=2,
        instance="replica-r",
    )


@contextlib.asynccontextmanager
async def collected(bus: Bus, subject: str) -> AsyncIterator[list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        received.append(json.loads(msg.data))

    subscription = await bus.nc.subscribe(subject, cb=collect)
    try:
        yield received
    finally:
        await subscription.unsubscribe()


async def until(found: list[dict[str, Any]], predicate: Any, timeout: float = 30.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for item in found:
            if predicate(item):
                return item
        await asyncio.sleep(0.05)
    raise AssertionError(f"not found in {found}")


async def fresh_buckets(bus: Bus) -> None:
    js = bus.nc.jetstream()
    for info in await js.streams_info():
        if info.config.name and info.config.name.startswith("KV_nest_backup"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(info.config.name)


def issuer(etcd_server: EtcdServer) -> Any:
    async def issue(body: dict[str, Any]) -> dict[str, Any]:
        return EtcdClientIssued(
            url=etcd_server.url,
            ca_pem=etcd_server.tls.ca_pem.decode(),
            cert_pem=etcd_server.tls.client_cert_pem.decode(),
            key_pem=etcd_server.tls.client_key_pem.decode(),
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        ).wire()

    return issue


async def test_prepare_restore_intent_is_verified_staged_and_handed_on(
    bus: Bus, tmp_path: Path, nats_url: str, etcd_server: EtcdServer
) -> None:
    await fresh_buckets(bus)
    responder = await bus.serve(ETCD_CLIENT_RPC_SUBJECT, issuer(etcd_server), queue="provisioner")
    leftover = tmp_path / "data" / "restores" / "r-before" / "snapshot.db"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"staged by a process that died, long expired")
    os.utime(leftover.parent, (0, 0))
    service = BackupService(settings_for(tmp_path, nats_url), tick_seconds=3600)
    try:
        async with (
            collected(bus, "nest.event.>") as events,
            collected(bus, "nest.intent.provisioner.restore") as handed,
        ):
            await service.start(bus)
            try:
                assert not leftover.exists(), "expired staged files are removed at start"
                await bus.publish(
                    RunBackup(target="cluster-demo", kind="etcd", cluster_id="c-1"),
                    source="test",
                )
                completed = await until(
                    events, lambda e: e["type"] == "io.nest.backup.completed.v1"
                )
                backup = completed["data"]["backup"]
                await bus.publish(
                    PrepareRestore(
                        restore_id="r-svc",
                        cluster_id="c-1",
                        cluster_name="demo",
                        backup=backup,
                    ),
                    source="test",
                )
                intent = (await until(handed, lambda e: e["data"]["restoreId"] == "r-svc"))["data"]
                async with httpx.AsyncClient(timeout=10) as client:
                    response = await client.get(intent["snapshotUrl"])
            finally:
                await service.stop(3)
    finally:
        await responder.unsubscribe()
    phases = [e["data"]["phase"] for e in events if e["type"] == "io.nest.restore.progressed.v1"]
    assert phases == ["Verifying", "Staged"]
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == intent["snapshotSha256"]
    (manifest,) = await artifacts.list_backups(LocalStore(tmp_path / "backups"), "cluster-demo")
    assert str(manifest.ref) == backup == intent["backup"]
    assert intent["snapshotSha256"] == manifest.plaintext_sha256


async def test_a_backup_in_a_backup_location_is_restored_from_there(
    bus: Bus, tmp_path: Path, nats_url: str, etcd_server: EtcdServer
) -> None:
    await fresh_buckets(bus)
    responder = await bus.serve(ETCD_CLIENT_RPC_SUBJECT, issuer(etcd_server), queue="provisioner")
    disk = tmp_path / "location"
    service = BackupService(settings_for(tmp_path, nats_url), tick_seconds=3600)
    try:
        async with (
            collected(bus, "nest.event.>") as events,
            collected(bus, "nest.intent.provisioner.restore") as handed,
        ):
            await service.start(bus)
            try:
                await bus.publish(
                    ApplyBackupLocation(
                        location_id="loc-disk",
                        name="disk",
                        generation=1,
                        location=SealedBackupLocation(
                            spec=SealedLocationSpec(kind="local", path=str(disk))
                        ),
                    ),
                    source="test",
                )
                await bus.publish(
                    RunBackup(
                        target="cluster-demo",
                        kind="etcd",
                        cluster_id="c-1",
                        location_id="loc-disk",
                    ),
                    source="test",
                )
                completed = await until(
                    events, lambda e: e["type"] == "io.nest.backup.completed.v1"
                )
                backup = completed["data"]["backup"]
                for restore_id, location in (("r-loc", "loc-disk"), ("r-nowhere", "loc-gone")):
                    await bus.publish(
                        PrepareRestore(
                            restore_id=restore_id,
                            cluster_id="c-1",
                            cluster_name="demo",
                            backup=backup,
                            location_id=location,
                        ),
                        source="test",
                    )
                intent = (await until(handed, lambda e: e["data"]["restoreId"] == "r-loc"))["data"]
                failed = await until(
                    events,
                    lambda e: (
                        e["type"] == "io.nest.restore.progressed.v1"
                        and e["data"]["restoreId"] == "r-nowhere"
                        and e["data"]["phase"] == "Failed"
                    ),
                )
                async with httpx.AsyncClient(timeout=10) as client:
                    response = await client.get(intent["snapshotUrl"])
            finally:
                await service.stop(3)
    finally:
        await responder.unsubscribe()
    # The backup is in the location, not in the service's own store, and came back from there.
    (manifest,) = await artifacts.list_backups(LocalStore(disk), "cluster-demo")
    assert await artifacts.list_backups(LocalStore(tmp_path / "backups"), "cluster-demo") == []
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == manifest.plaintext_sha256
    assert failed["data"]["reason"] == "LocationNotFound"
    assert [h["data"]["restoreId"] for h in handed] == ["r-loc"]
