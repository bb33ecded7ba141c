"""Restore drills of the newest backup: real etcd (etcdutl + a scratch etcd), SQLite, PostgreSQL
(a scratch database on the real server), SeaweedFS S3 and the local store."""

from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from libs.common.contract.backup import DrillFailed, DrillPassed
from services.backup.drills.newest import drill_newest
from services.backup.snapshots.database import PostgresDump, PostgresTarget, SqliteSnapshot
from services.backup.snapshots.etcd import EtcdSnapshot
from services.backup.stores import artifacts, crypto
from services.backup.stores.layout import new_ref
from services.backup.stores.local import LocalStore
from services.backup.stores.manifest import Manifest
from services.backup.stores.objects import ObjectStore
from services.backup.stores.s3 import S3Store
from tests.conftest import PG_DSN
from tests.integration.backup.conftest import endpoint_of
from tests.support.etcd import EtcdServer, put_keys
from tests.support.parts import missing

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
NewDatabase = Callable[[], Awaitable[str]]


@pytest.fixture(scope="module")
def etcd_with_data(etcd_server: EtcdServer) -> EtcdServer:
    put_keys(etcd_server, {f"/registry/secrets/ns/s-{i}".encode(): b"v" * 100 for i in range(50)})
    return etcd_server


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def etcd_backup(
    store: ObjectStore, server: EtcdServer, keyring: crypto.Keyring | None, when: datetime = NOW
) -> Manifest:
    snapshot = EtcdSnapshot(endpoint_of(server))
    return await artifacts.write_backup(
        store,
        new_ref("cluster-demo", when),
        "etcd",
        snapshot.chunks(),
        keyring=keyring,
        details=snapshot.details,
    )


async def flip_bit(store: ObjectStore, manifest: Manifest) -> None:
    key = manifest.ref.key(manifest.artifact)
    stored = bytearray(b"".join([chunk async for chunk in store.get(key)]))
    stored[len(stored) // 2] ^= 0x10
    await store.put(key, _once(bytes(stored)))


async def edit_manifest(store: ObjectStore, manifest: Manifest, **etcd: int) -> None:
    data = json.loads(b"".join([c async for c in store.get(manifest.ref.manifest_key)]))
    data["etcd"].update(etcd)
    await store.put(manifest.ref.manifest_key, _once(json.dumps(data).encode()))


async def drill(
    store: ObjectStore,
    target: str,
    kind: str,
    keyring: crypto.Keyring | None,
    scratch: Path,
    database_url: str | None = None,
) -> DrillPassed | DrillFailed:
    return await drill_newest(
        store,
        target,
        kind,
        keyring,
        scratch_dir=scratch,
        etcd_bin_dir=None,
        database_url=database_url,
        pg_bin_dir=None,
        location_id="loc-1",
        policy_id="pol-1",
        now=NOW,
    )


def leftovers(scratch: Path) -> list[Path]:
    return list(scratch.iterdir()) if scratch.exists() else []


class TestEtcd:
    @pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
    async def test_newest_snapshot_passes_with_its_figures(
        self,
        s3_store: S3Store,
        etcd_with_data: EtcdServer,
        keyring: crypto.Keyring,
        scratch: Path,
        encrypted: bool,
    ) -> None:
        ring = keyring if encrypted else None
        await etcd_backup(s3_store, etcd_with_data, ring, NOW - timedelta(hours=1))
        # An older backup with a broken artifact is not the one drilled.
        older = await artifacts.list_backups(s3_store, "cluster-demo")
        await flip_bit(s3_store, older[0])
        newest = await etcd_backup(s3_store, etcd_with_data, ring)
        assert newest.etcd is not None
        result = await drill(s3_store, "cluster-demo", "etcd", ring, scratch)
        assert isinstance(result, DrillPassed), result
        assert result.backup == str(newest.ref)
        assert (result.etcd_revision, result.etcd_key_count) == (
            newest.etcd.revision,
            newest.etcd.key_count,
        )
        assert (result.location_id, result.policy_id, result.drilled_at) == ("loc-1", "pol-1", NOW)
        assert result.duration_seconds > 0
        assert leftovers(scratch) == []

    async def test_flipped_bit_wrong_key_and_no_backup_fail_with_their_reason(
        self, s3_store: S3Store, etcd_with_data: EtcdServer, keyring: crypto.Keyring, scratch: Path
    ) -> None:
        none = await drill(s3_store, "cluster-demo", "etcd", keyring, scratch)
        assert isinstance(none, DrillFailed)
        assert (none.reason, none.backup) == ("NoBackup", None)
        assert "cluster-demo" in none.message

        manifest = await etcd_backup(s3_store, etcd_with_data, keyring)
        impostor = crypto.Keyring({keyring.active: secrets.token_bytes(32)}, keyring.active)
        wrong = await drill(s3_store, "cluster-demo", "etcd", impostor, scratch)
        assert isinstance(wrong, DrillFailed)
        assert wrong.reason == "WrongKey" and wrong.backup == str(manifest.ref)
        missing_key = await drill(s3_store, "cluster-demo", "etcd", None, scratch)
        assert isinstance(missing_key, DrillFailed) and missing_key.reason == "UnknownKey"

        await flip_bit(s3_store, manifest)
        corrupt = await drill(s3_store, "cluster-demo", "etcd", keyring, scratch)
        assert isinstance(corrupt, DrillFailed)
        assert corrupt.reason == "CiphertextCorrupt", corrupt
        assert str(manifest.ref) in corrupt.message

        plain = await etcd_backup(s3_store, etcd_with_data, None, NOW + timedelta(minutes=1))
        await flip_bit(s3_store, plain)
        flipped = await drill(s3_store, "cluster-demo", "etcd", None, scratch)
        assert isinstance(flipped, DrillFailed) and flipped.reason == "IntegrityError"
        assert leftovers(scratch) == []

    async def test_revision_and_key_count_are_compared_with_the_manifest(
        self, etcd_with_data: EtcdServer, scratch: Path, tmp_path: Path
    ) -> None:
        store = LocalStore(tmp_path / "store")
        manifest = await etcd_backup(store, etcd_with_data, None)
        assert manifest.etcd is not None and manifest.etcd.revision_exact
        await edit_manifest(store, manifest, revision=manifest.etcd.revision + 7)
        result = await drill(store, "cluster-demo", "etcd", None, scratch)
        assert isinstance(result, DrillFailed) and result.reason == "RevisionMismatch", result
        assert str(manifest.etcd.revision + 7) in result.message

        await edit_manifest(
            store,
            manifest,
            revision=manifest.etcd.revision,
            keyCount=manifest.etcd.key_count + 1,
        )
        result = await drill(store, "cluster-demo", "etcd", None, scratch)
        assert isinstance(result, DrillFailed) and result.reason == "KeyCountMismatch", result
        assert leftovers(scratch) == []


def make_foundry_sqlite(path: Path, *, alembic: bool = True) -> None:
    connection = sqlite3.connect(path)
    try:
        connection.execute("CREATE TABLE clusters (id TEXT PRIMARY KEY, name TEXT)")
        connection.execute("CREATE TABLE api_tokens (id TEXT PRIMARY KEY, token_hash TEXT)")
        connection.executemany(
            "INSERT INTO clusters VALUES (?, ?)", [(f"c{i}", f"cluster-{i}") for i in range(3)]
        )
        connection.executemany(
            "INSERT INTO api_tokens VALUES (?, ?)", [(f"t{i}", "0" * 64) for i in range(2)]
        )
        if alembic:
            connection.execute("CREATE TABLE alembic_version (version_num TEXT PRIMARY KEY)")
            connection.execute("INSERT INTO alembic_version VALUES ('0006')")
        connection.commit()
    finally:
        connection.close()


async def sqlite_backup(
    store: ObjectStore, path: Path, keyring: crypto.Keyring | None, when: datetime = NOW
) -> Manifest:
    snapshot = SqliteSnapshot(path)
    return await artifacts.write_backup(
        store,
        new_ref("foundry", when),
        "sqlite",
        snapshot.chunks(),
        keyring=keyring,
        details=snapshot.details,
    )


class TestSqlite:
    @pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
    async def test_good_backup_passes_with_rows_per_table(
        self, tmp_path: Path, keyring: crypto.Keyring, scratch: Path, encrypted: bool
    ) -> None:
        store = LocalStore(tmp_path / "store")
        live = tmp_path / "nest.db"
        make_foundry_sqlite(live)
        ring = keyring if encrypted else None
        manifest = await sqlite_backup(store, live, ring)
        result = await drill(store, "foundry", "foundry", ring, scratch)
        assert isinstance(result, DrillPassed), result
        assert result.backup == str(manifest.ref) and result.kind == "foundry"
        assert result.table_rows == {"alembic_version": 1, "api_tokens": 2, "clusters": 3}
        assert result.etcd_revision is None
        assert leftovers(scratch) == []

    async def test_flipped_bit_wrong_key_and_a_database_that_is_not_nest(
        self, tmp_path: Path, keyring: crypto.Keyring, scratch: Path
    ) -> None:
        store = LocalStore(tmp_path / "store")
        stranger = tmp_path / "other.db"
        make_foundry_sqlite(stranger, alembic=False)
        await sqlite_backup(store, stranger, None, NOW - timedelta(hours=1))
        result = await drill(store, "foundry", "foundry", None, scratch)
        assert isinstance(result, DrillFailed) and result.reason == "AlembicVersionMissing"

        live = tmp_path / "nest.db"
        make_foundry_sqlite(live)
        manifest = await sqlite_backup(store, live, keyring)
        impostor = crypto.Keyring({keyring.active: secrets.token_bytes(32)}, keyring.active)
        result = await drill(store, "foundry", "foundry", impostor, scratch)
        assert isinstance(result, DrillFailed) and result.reason == "WrongKey"
        await flip_bit(store, manifest)
        result = await drill(store, "foundry", "foundry", keyring, scratch)
        assert isinstance(result, DrillFailed) and result.reason == "CiphertextCorrupt"
        assert leftovers(scratch) == []

    async def test_incomplete_or_unverified_backups_are_not_drilled(
        self, tmp_path: Path, scratch: Path
    ) -> None:
        store = LocalStore(tmp_path / "store")
        live = tmp_path / "nest.db"
        make_foundry_sqlite(live)
        snapshot = SqliteSnapshot(live)
        await artifacts.write_backup(
            store,
            new_ref("foundry", NOW),
            "sqlite",
            snapshot.chunks(),
            verify=False,
            details=snapshot.details,
        )
        # An artifact without a manifest (an upload that died) next to it.
        await store.put(new_ref("foundry", NOW).key("foundry.sqlite3"), _once(b"partial"))
        result = await drill(store, "foundry", "foundry", None, scratch)
        assert isinstance(result, DrillFailed) and result.reason == "NoBackup"


def require_pg_tools() -> None:
    for tool in ("pg_dump", "pg_restore"):
        if shutil.which(tool) is None:
            missing(f"{tool} not found (apt-get install postgresql-client)")


async def drill_databases() -> set[str]:
    connection = await asyncpg.connect(PG_DSN)
    try:
        rows = await connection.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'nest_drill_%'"
        )
        return {row["datname"] for row in rows}
    finally:
        await connection.close()


@pytest.mark.postgres
class TestPostgres:
    async def test_dump_restores_into_a_scratch_database_which_is_dropped(
        self, new_database: NewDatabase, s3_store: S3Store, keyring: crypto.Keyring, scratch: Path
    ) -> None:
        require_pg_tools()
        source = await new_database()
        connection = await asyncpg.connect(source)
        try:
            await connection.execute(
                "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);"
                "INSERT INTO alembic_version VALUES ('0006');"
                "CREATE TABLE clusters (id text PRIMARY KEY, name text NOT NULL);"
                "INSERT INTO clusters SELECT 'c' || g, 'cluster-' || g "
                "FROM generate_series(1, 25) g;"
                'CREATE TABLE "odd ""name""" (x int);'
            )
        finally:
            await connection.close()
        dump = PostgresDump(PostgresTarget.from_url(source))
        manifest = await artifacts.write_backup(
            s3_store,
            new_ref("foundry", NOW),
            "postgres",
            dump.chunks(),
            keyring=keyring,
            details=dump.details,
        )
        before = await drill_databases()
        # The Foundry DB URL as the API holds it (SQLAlchemy driver name and all).
        url = source.replace("postgresql://", "postgresql+asyncpg://")
        result = await drill(s3_store, "foundry", "foundry", keyring, scratch, url)
        assert isinstance(result, DrillPassed), result
        assert result.backup == str(manifest.ref)
        assert result.table_rows == {"alembic_version": 1, "clusters": 25, 'odd "name"': 0}
        assert await drill_databases() <= before
        assert leftovers(scratch) == []

    async def test_a_failing_restore_still_drops_the_scratch_database(
        self, tmp_path: Path, scratch: Path
    ) -> None:
        require_pg_tools()
        store = LocalStore(tmp_path / "store")
        # Stored and verified as written, but not a dump pg_restore can read.
        await artifacts.write_backup(
            store, new_ref("foundry", NOW), "postgres", _once(b"PGDMP" + b"\0" * 4000)
        )
        before = await drill_databases()
        result = await drill(store, "foundry", "foundry", None, scratch, PG_DSN)
        assert isinstance(result, DrillFailed) and result.reason == "RestoreFailed", result
        assert "pg_restore" in result.message
        assert await drill_databases() <= before
        # Without a PostgreSQL server to drill on, the drill says so.
        sqlite_url = f"sqlite:///{tmp_path / 'nest.db'}"
        result = await drill(store, "foundry", "foundry", None, scratch, sqlite_url)
        assert isinstance(result, DrillFailed) and result.reason == "NoScratchDatabase"
        assert leftovers(scratch) == []
