"""etcd snapshots from a real etcd over mutual TLS into real S3, restored and drilled."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from services.backup import errors
from services.backup.drills.etcd import restore_drill
from services.backup.restores.etcd import restore_snapshot, snapshot_status
from services.backup.restores.foundry import FoundryRestoreError, check_kind
from services.backup.snapshots.etcd import EtcdSnapshot, Transport
from services.backup.stores import artifacts, crypto
from services.backup.stores.layout import new_ref
from services.backup.stores.manifest import Manifest
from services.backup.stores.objects import ObjectStore
from services.backup.stores.s3 import S3Store
from tests.integration.backup.conftest import endpoint_of
from tests.support.etcd import EtcdServer, all_keys, put_keys, start_etcd
from tests.support.parts import free_port


@pytest.fixture(scope="module")
def etcd_with_data(etcd_server: EtcdServer) -> EtcdServer:
    put_keys(
        etcd_server, {f"/registry/pods/ns/pod-{i}".encode(): os.urandom(200) for i in range(300)}
    )
    put_keys(etcd_server, {b"/registry/pods/ns/pod-0": b"overwritten"})  # history, not just keys
    return etcd_server


async def take_backup(
    store: ObjectStore,
    server: EtcdServer,
    keyring: crypto.Keyring | None,
    transport: Transport = "grpc",
) -> Manifest:
    from datetime import UTC, datetime

    snapshot = EtcdSnapshot(endpoint_of(server), transport=transport)
    return await artifacts.write_backup(
        store,
        new_ref("cluster-demo", datetime.now(UTC)),
        "etcd",
        snapshot.chunks(),
        keyring=keyring,
        details=snapshot.details,
        kubernetes_version="1.34.1",
    )


@pytest.mark.parametrize(
    ("encrypted", "transport"),
    [(False, "grpc"), (True, "grpc"), (True, "gateway")],
    ids=["plain-grpc", "encrypted-grpc", "encrypted-gateway"],
)
async def test_round_trip_keys_and_revision_identical(
    s3_store: S3Store,
    etcd_with_data: EtcdServer,
    keyring: crypto.Keyring,
    tmp_path: Path,
    encrypted: bool,
    transport: Transport,
) -> None:
    with etcd_with_data.client() as client:
        revision, keys = all_keys(client)
    manifest = await take_backup(
        s3_store, etcd_with_data, keyring if encrypted else None, transport
    )
    assert manifest.etcd is not None
    assert (manifest.etcd.revision, manifest.etcd.key_count) == (revision, len(keys))
    assert manifest.etcd.revision_exact
    assert manifest.verified_at is not None
    assert manifest.kubernetes_version == "1.34.1"
    assert (manifest.encryption is not None) == encrypted

    snapshot_file = tmp_path / "snapshot.db"
    await artifacts.download(s3_store, manifest.ref, snapshot_file, keyring)
    body = snapshot_file.read_bytes()
    assert hashlib.sha256(body[:-32]).hexdigest() == manifest.etcd.snapshot_sha256
    assert (await snapshot_status(snapshot_file)).revision == revision

    # Restore into a new member and read every key back over mutual TLS.
    peer_port = free_port()
    data_dir = tmp_path / "restored"
    await restore_snapshot(
        snapshot_file, data_dir, name="restored", peer_url=f"http://127.0.0.1:{peer_port}"
    )
    restored = start_etcd(
        tmp_path / "member", data_dir=data_dir, name="restored", peer_port=peer_port
    )
    try:
        with restored.client() as client:
            assert all_keys(client) == (revision, keys)
    finally:
        restored.stop()


async def test_restore_drill_checks_revision_and_key_count(
    s3_store: S3Store, etcd_with_data: EtcdServer, tmp_path: Path, scratch: Path
) -> None:
    manifest = await take_backup(s3_store, etcd_with_data, None)
    assert manifest.etcd is not None
    snapshot_file = tmp_path / "snapshot.db"
    await artifacts.download(s3_store, manifest.ref, snapshot_file)
    result = await restore_drill(snapshot_file, scratch, manifest.etcd)
    assert (result.revision, result.key_count) == (manifest.etcd.revision, manifest.etcd.key_count)

    wrong = manifest.etcd.model_copy(update={"key_count": manifest.etcd.key_count + 1})
    with pytest.raises(errors.RestoreError, match="the manifest recorded"):
        await restore_drill(snapshot_file, tmp_path / "drill2", wrong)


async def test_flipped_bit_in_stored_snapshot_is_refused(
    s3_store: S3Store, etcd_with_data: EtcdServer, keyring: crypto.Keyring, tmp_path: Path
) -> None:
    for ring in (None, keyring):
        manifest = await take_backup(s3_store, etcd_with_data, ring)
        key = manifest.ref.key(manifest.artifact)
        stored = bytearray(b"".join([chunk async for chunk in s3_store.get(key)]))
        stored[len(stored) // 2] ^= 0x04
        await s3_store.put(key, _once(bytes(stored)))
        with pytest.raises((errors.IntegrityError, errors.CiphertextCorrupt)):
            await artifacts.download(s3_store, manifest.ref, tmp_path / "snap.db", ring)
        assert not (tmp_path / "snap.db").exists()


async def test_etcdutl_refuses_a_snapshot_without_its_hash(
    etcd_with_data: EtcdServer, tmp_path: Path
) -> None:
    snapshot = EtcdSnapshot(endpoint_of(etcd_with_data))
    data = b"".join([chunk async for chunk in snapshot.chunks()])
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(data[:-32] + bytes(32))  # trailer replaced: hash no longer matches
    with pytest.raises(errors.RestoreError, match="etcdutl snapshot restore failed"):
        await restore_snapshot(damaged, tmp_path / "out")


@pytest.mark.parametrize("transport", ["grpc", "gateway"])
async def test_wrong_client_certificate_is_refused(
    etcd_with_data: EtcdServer, transport: Transport
) -> None:
    from tests.support.etcd import generate_tls

    other = generate_tls()
    endpoint = endpoint_of(etcd_with_data)
    stranger = type(endpoint)(
        url=endpoint.url,
        ca_pem=endpoint.ca_pem,
        cert_pem=other.client_cert_pem,
        key_pem=other.client_key_pem,
    )
    with pytest.raises(errors.SnapshotError):
        async for _ in EtcdSnapshot(stranger, transport=transport).chunks():
            pass


async def _once(data: bytes):  # type: ignore[no-untyped-def]
    yield data


async def test_a_verified_download_drills_and_restores_into_a_member(
    s3_store: S3Store, etcd_with_data: EtcdServer, keyring: crypto.Keyring, tmp_path: Path
) -> None:
    manifest = await take_backup(s3_store, etcd_with_data, keyring)
    assert manifest.etcd is not None
    snapshot = tmp_path / "snapshot.db"
    await artifacts.download(s3_store, manifest.ref, snapshot, keyring)
    scratch = tmp_path / "drill"
    scratch.mkdir()
    result = await restore_drill(snapshot, scratch, manifest.etcd)
    assert (result.revision, result.key_count) == (manifest.etcd.revision, manifest.etcd.key_count)
    data_dir = tmp_path / "member"
    await restore_snapshot(snapshot, data_dir)
    assert (data_dir / "member" / "snap" / "db").is_file()
    with pytest.raises(errors.RestoreError, match="already exists"):
        await restore_snapshot(snapshot, data_dir)
    with pytest.raises(FoundryRestoreError, match="is a etcd dump and the Foundry DB here is"):
        check_kind(manifest, f"sqlite:///{tmp_path / 'x.db'}")
