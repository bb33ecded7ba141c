"""Preparing a cluster restore in the backup service: a real etcd (current revision over mutual
TLS), real backups in SeaweedFS S3 and a local store, a real NATS, and the staging server over
real HTTP. A good snapshot is Staged and handed to the provisioner with a URL serving exactly
its plaintext; a flipped bit, a wrong key or a missing manifest fail with their reason; an
older snapshot is refused unless forced."""

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
import pytest

from libs.common.bus import Bus
from libs.common.contract.restore import PrepareRestore
from services.backup import errors
from services.backup.restores.cluster import RestorePreparer
from services.backup.restores.staging import StagedSnapshots
from services.backup.snapshots.etcd import EtcdEndpoint, EtcdSnapshot
from services.backup.stores import artifacts, crypto
from services.backup.stores.layout import new_ref
from services.backup.stores.local import LocalStore
from services.backup.stores.manifest import Manifest
from services.backup.stores.objects import ObjectStore
from services.backup.stores.s3 import S3Store
from tests.integration.backup.conftest import endpoint_of
from tests.support.etcd import EtcdServer, put_keys


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def backup_of(
    store: ObjectStore, server: EtcdServer, keyring: crypto.Keyring | None
) -> Manifest:
    snapshot = EtcdSnapshot(endpoint_of(server))
    return await artifacts.write_backup(
        store,
        new_ref("cluster-demo", datetime.now(UTC)),
        "etcd",
        snapshot.chunks(),
        keyring=keyring,
        details=snapshot.details,
    )


class Harness:
    """A preparer with its staging server and everything it published."""

    def __init__(self, bus: Bus, staged: StagedSnapshots, preparer: RestorePreparer) -> None:
        self.bus = bus
        self.staged = staged
        self.preparer = preparer
        self.stores: dict[str | None, ObjectStore] = {}
        self.keyrings: dict[str, crypto.Keyring | None] = {"current": None}
        self.access: dict[str, EtcdEndpoint | None] = {}
        self.progress: list[dict[str, Any]] = []
        self.handed: list[dict[str, Any]] = []

    async def subscribe(self) -> None:
        async def progress(msg: Any) -> None:
            self.progress.append(json.loads(msg.data)["data"])

        async def handed(msg: Any) -> None:
            self.handed.append(json.loads(msg.data)["data"])

        await self.bus.nc.subscribe("nest.event.restore.progressed", cb=progress)
        await self.bus.nc.subscribe("nest.intent.provisioner.restore", cb=handed)

    async def prepare(self, backup: str, restore_id: str, force: bool = False) -> dict[str, Any]:
        await self.preparer.prepare(
            PrepareRestore(
                restore_id=restore_id,
                cluster_id="c1",
                cluster_name="demo",
                backup=backup,
                force=force,
            )
        )
        await self.bus.nc.flush()
        for _ in range(100):
            mine = [p for p in self.progress if p["restoreId"] == restore_id]
            if mine and mine[-1]["phase"] in ("Staged", "Failed"):
                return mine[-1]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no outcome for {restore_id}: {self.progress}")


@pytest.fixture
async def harness(
    bus: Bus, tmp_path: Path, etcd_server: EtcdServer, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    h: Harness

    @contextlib.asynccontextmanager
    async def store_for(location_id: str | None) -> AsyncIterator[ObjectStore]:
        yield h.stores[location_id]

    async def access(cluster_id: str) -> EtcdEndpoint:
        endpoint = h.access["endpoint"]
        if endpoint is None:
            raise errors.EtcdAccessUnavailable(f"no etcd access for cluster {cluster_id}")
        return endpoint

    staged = StagedSnapshots(tmp_path / "restores", ttl=timedelta(minutes=5))
    await staged.start()
    preparer = RestorePreparer(
        staged=staged,
        store_for=store_for,
        keyring=lambda: h.keyrings["current"],
        etcd_access=lambda: access,
        bus=lambda: bus,
    )
    h = Harness(bus, staged, preparer)
    h.access["endpoint"] = endpoint_of(etcd_server)
    await h.subscribe()
    try:
        yield h
    finally:
        await staged.stop()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_a_good_snapshot_is_staged_and_its_url_serves_exactly_the_plaintext(
    harness: Harness,
    s3_store: S3Store,
    etcd_server: EtcdServer,
    keyring: crypto.Keyring,
    encrypted: bool,
    tmp_path: Path,
) -> None:
    harness.stores["loc-1"] = s3_store
    harness.keyrings["current"] = keyring
    put_keys(etcd_server, {b"/registry/a": b"1"})
    manifest = await backup_of(s3_store, etcd_server, keyring if encrypted else None)

    await harness.preparer.prepare(
        PrepareRestore(
            restore_id="r-good",
            cluster_id="c1",
            cluster_name="demo",
            backup=str(manifest.ref),
            location_id="loc-1",
        )
    )
    await harness.bus.nc.flush()
    await asyncio.sleep(0.1)
    phases = [p["phase"] for p in harness.progress if p["restoreId"] == "r-good"]
    assert phases == ["Verifying", "Staged"], harness.progress
    (handed,) = harness.handed
    assert handed["restoreId"] == "r-good" and handed["backup"] == str(manifest.ref)
    assert handed["snapshotSha256"] == manifest.plaintext_sha256
    assert handed["snapshotBytes"] == manifest.plaintext_size
    assert manifest.etcd is not None and handed["etcdRevision"] >= manifest.etcd.revision

    expected = tmp_path / "expected.db"
    await artifacts.download(s3_store, manifest.ref, expected, keyring)
    url = handed["snapshotUrl"]
    assert url.startswith(harness.staged.base_url + "/v1/restores/r-good/snapshot?expires=")
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
        assert response.status_code == 200
        assert response.content == expected.read_bytes()
        assert hashlib.sha256(response.content).hexdigest() == manifest.plaintext_sha256

        forged = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
        assert (await client.get(forged)).status_code == 403
        other = url.replace("/r-good/", "/r-other/")
        assert (await client.get(other)).status_code == 403
        no_token = url.split("&token=")[0]
        assert (await client.get(no_token)).status_code == 403
        later = url.replace("expires=", "expires=9")
        assert (await client.get(later)).status_code == 403

    # Once the URL expired, the token no longer opens it and the file is swept.
    harness.staged.wall_clock = lambda: 1e12
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(url)).status_code == 403
    assert "r-good" in harness.staged.sweep()
    assert not (harness.staged.directory / "r-good").exists()


async def test_corrupt_wrong_key_and_incomplete_backups_fail_with_their_reason(
    harness: Harness,
    etcd_server: EtcdServer,
    keyring: crypto.Keyring,
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path / "backups")
    harness.stores[None] = store
    harness.keyrings["current"] = keyring

    plain = await backup_of(store, etcd_server, None)
    sealed = await backup_of(store, etcd_server, keyring)
    for manifest in (plain, sealed):
        key = manifest.ref.key(manifest.artifact)
        stored = bytearray(b"".join([chunk async for chunk in store.get(key)]))
        stored[len(stored) // 2] ^= 0x10
        await store.put(key, _once(bytes(stored)))
    outcome = await harness.prepare(str(plain.ref), "r-flip-plain")
    assert (outcome["phase"], outcome["reason"]) == ("Failed", "IntegrityError")
    outcome = await harness.prepare(str(sealed.ref), "r-flip-sealed")
    assert (outcome["phase"], outcome["reason"]) == ("Failed", "CiphertextCorrupt")

    good = await backup_of(store, etcd_server, keyring)
    harness.keyrings["current"] = crypto.Keyring({"2026-11": b"\x01" * 32}, "2026-11")
    outcome = await harness.prepare(str(good.ref), "r-wrong-key")
    assert (outcome["phase"], outcome["reason"]) == ("Failed", "WrongKey")

    await store.delete(good.ref.manifest_key)
    outcome = await harness.prepare(str(good.ref), "r-no-manifest")
    assert (outcome["phase"], outcome["reason"]) == ("Failed", "ManifestMissing")

    assert harness.handed == []
    assert list((tmp_path / "restores").iterdir()) == [], "nothing stays staged after a failure"


async def test_an_older_snapshot_is_refused_unless_forced(
    harness: Harness, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "backups")
    harness.stores[None] = store
    manifest = await backup_of(store, etcd_server, None)
    put_keys(etcd_server, {b"/registry/after-the-backup": b"x"})

    outcome = await harness.prepare(str(manifest.ref), "r-old")
    assert (outcome["phase"], outcome["reason"]) == ("Failed", "SnapshotOlder")
    assert "older than the cluster's current revision" in outcome["message"]
    assert harness.handed == []

    outcome = await harness.prepare(str(manifest.ref), "r-old-forced", force=True)
    assert outcome["phase"] == "Staged"
    assert [h["restoreId"] for h in harness.handed] == ["r-old-forced"]

    # Without a readable current revision: refused unless forced.
    harness.access["endpoint"] = None
    outcome = await harness.prepare(str(manifest.ref), "r-unknown")
    assert (outcome["phase"], outcome["reason"]) == ("Failed", "CurrentRevisionUnknown")
    outcome = await harness.prepare(str(manifest.ref), "r-unknown-forced", force=True)
    assert outcome["phase"] == "Staged"


async def test_expired_staged_files_of_an_earlier_process_are_removed_at_start(
    tmp_path: Path,
) -> None:
    leftover = tmp_path / "restores" / "r-old" / "snapshot.db"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x")
    os.utime(leftover.parent, (0, 0))  # staged long ago: its URL expired
    staged = StagedSnapshots(tmp_path / "restores")
    await staged.start()
    await staged.serve()
    try:
        assert not leftover.exists()
        async with httpx.AsyncClient() as client:
            expires = int(staged.wall_clock()) + 60
            response = await client.get(staged.url_for("r-old", expires))
            assert response.status_code == 404
    finally:
        await staged.stop()
