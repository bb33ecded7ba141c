"""Backups in a store: manifest written last, verification, listing, corruption, cleanup."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.backup import errors
from services.backup.stores import artifacts, crypto
from services.backup.stores.layout import BackupRef, new_ref, parse_key, parse_ref
from services.backup.stores.local import LocalStore
from services.backup.stores.manifest import Manifest
from services.backup.stores.streams import collect, iterate

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def ring(key_id: str = "k1") -> crypto.Keyring:
    return crypto.Keyring({key_id: secrets.token_bytes(32)}, key_id)


async def store_backup(
    store: LocalStore, data: bytes, keyring: crypto.Keyring | None = None, target: str = "demo"
) -> Manifest:
    return await artifacts.write_backup(
        store, new_ref(target, NOW), "sqlite", iterate(data, 65536), keyring=keyring
    )


def flip_bit(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_round_trip(tmp_path: Path, encrypted: bool) -> None:
    store = LocalStore(tmp_path / "store")
    keyring = ring() if encrypted else None
    data = os.urandom(2_500_000)
    manifest = await store_backup(store, data, keyring)
    assert manifest.verified_at is not None
    assert manifest.plaintext_size == len(data)
    assert (manifest.stored_size > len(data)) == encrypted
    assert manifest.encryption is None or manifest.encryption.key_id == "k1"
    listed = await artifacts.list_backups(store)
    assert [m.backup_id for m in listed] == [manifest.backup_id]
    out = tmp_path / "restored"
    await artifacts.download(store, manifest.ref, out, keyring)
    assert out.read_bytes() == data


async def test_manifest_json_is_camel_case_and_complete(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    manifest = await store_backup(store, b"data", ring("2026-q4"))
    raw = (tmp_path / manifest.ref.manifest_key).read_text()
    for name in ("plaintextSha256", "storedSha256", "nestVersion", "createdAt", "keyId"):
        assert f'"{name}"' in raw
    assert '"2026-q4"' in raw


async def test_flipped_bit_is_refused_at_restore(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    manifest = await store_backup(store, os.urandom(100_000))
    flip_bit(tmp_path / "store" / manifest.ref.key(manifest.artifact), 5000)
    out = tmp_path / "restored"
    with pytest.raises(errors.IntegrityError, match="does not match its manifest"):
        await artifacts.download(store, manifest.ref, out)
    assert not out.exists()
    assert not list(tmp_path.glob(".restored*"))


async def test_flipped_bit_in_encrypted_artifact_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    keyring = ring()
    manifest = await store_backup(store, os.urandom(100_000), keyring)
    flip_bit(tmp_path / "store" / manifest.ref.key(manifest.artifact), 50_000)
    with pytest.raises(errors.CiphertextCorrupt, match="chunk 0 failed authentication"):
        await artifacts.download(store, manifest.ref, tmp_path / "restored", keyring)
    assert not (tmp_path / "restored").exists()


async def test_wrong_and_missing_keys_are_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    manifest = await store_backup(store, b"secret", ring())
    with pytest.raises(errors.WrongKey):
        await artifacts.download(store, manifest.ref, tmp_path / "a", ring())
    with pytest.raises(errors.UnknownKey, match="'k1'"):
        await artifacts.download(store, manifest.ref, tmp_path / "b", ring("k2"))
    with pytest.raises(errors.UnknownKey, match="no encryption keys are configured"):
        await artifacts.download(store, manifest.ref, tmp_path / "c", None)


async def test_missing_manifest_is_incomplete_never_listed_and_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    manifest = await store_backup(store, b"data")
    await store.delete(manifest.ref.manifest_key)
    assert await artifacts.list_backups(store) == []
    with pytest.raises(errors.ManifestMissing, match="incomplete"):
        await artifacts.download(store, manifest.ref, tmp_path / "out")


async def test_invalid_manifest_is_a_clear_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    manifest = await store_backup(store, b"data")
    await store.put(manifest.ref.manifest_key, iterate(b'{"target": "demo"}'))
    with pytest.raises(errors.ManifestInvalid, match="invalid"):
        await artifacts.read_manifest(store, manifest.ref)
    assert await artifacts.list_backups(store) == []
    # Unreadable is not abandoned: cleanup never deletes it, however old.
    listing = await artifacts.scan(store)
    assert list(listing.unreadable) == [manifest.ref]
    far = datetime.now(UTC) + timedelta(days=365)
    assert await artifacts.cleanup_incomplete(store, far) == []
    assert await store.exists(manifest.ref.key(manifest.artifact))


async def test_manifest_from_a_newer_nest_with_extra_fields_is_readable(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    manifest = await store_backup(store, b"data")
    raw = manifest.wire()
    raw["someFutureField"] = {"added": "later"}
    await store.put(manifest.ref.manifest_key, iterate(json.dumps(raw).encode()))
    assert [m.backup_id for m in await artifacts.list_backups(store)] == [manifest.backup_id]
    out = tmp_path / "out"
    await artifacts.download(store, manifest.ref, out)
    assert out.read_bytes() == b"data"


async def test_failed_source_leaves_no_artifact_and_no_manifest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    async def dying() -> AsyncIterator[bytes]:
        yield os.urandom(1000)
        raise errors.SnapshotCorrupt("trailer mismatch")

    with pytest.raises(errors.SnapshotCorrupt):
        await artifacts.write_backup(store, new_ref("demo", NOW), "etcd", dying())
    assert await store.list("") == []


async def test_cleanup_waits_for_the_grace_period(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    complete = await store_backup(store, b"complete")
    # An upload in progress: artifact there, manifest not yet.
    ref = new_ref("demo", datetime.now(UTC))
    await store.put(ref.key("foundry.sqlite3"), iterate(b"partial"))
    removed = await artifacts.cleanup_incomplete(store, datetime.now(UTC), timedelta(hours=1))
    assert removed == []
    assert await store.exists(ref.key("foundry.sqlite3"))
    later = datetime.now(UTC) + timedelta(hours=2)
    removed = await artifacts.cleanup_incomplete(store, later, timedelta(hours=1))
    assert removed == [ref]
    assert not await store.exists(ref.key("foundry.sqlite3"))
    assert [m.backup_id for m in await artifacts.list_backups(store)] == [complete.backup_id]


async def test_delete_backup_removes_manifest_and_artifact(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    manifest = await store_backup(store, b"data")
    await artifacts.delete_backup(store, manifest.ref)
    assert await store.list("") == []


def test_layout_names_round_trip() -> None:
    ref = new_ref("cluster-demo", datetime(2026, 11, 21, 12, 0, 7, 123, tzinfo=UTC))
    assert ref.prefix.startswith("cluster-demo/20261121T120007Z-")
    assert parse_key(ref.manifest_key) == (ref, "manifest.json")
    assert parse_ref(str(ref)) == ref
    assert parse_key("cluster-demo/not-a-backup/x") is None
    assert parse_key(".nest-probe/x") is None
    with pytest.raises(ValueError, match="lowercase"):
        new_ref("Bad/Target", NOW)
    assert BackupRef("a", NOW, "00000001") < BackupRef("a", NOW + timedelta(seconds=1), "0")


async def test_manifest_size_is_bounded(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    manifest = await store_backup(store, b"x")
    await store.put(manifest.ref.manifest_key, iterate(b" " * (2 << 20)))
    with pytest.raises(errors.ManifestInvalid, match="larger than 1 MiB"):
        await artifacts.read_manifest(store, manifest.ref)
    assert await collect(store.get(manifest.ref.key(manifest.artifact))) == b"x"
