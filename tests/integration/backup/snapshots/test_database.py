"""Foundry DB backups: PostgreSQL (pg_dump/pg_restore) and SQLite (online backup), round trips."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from services.backup import errors
from services.backup.restores.database import restore_postgres, restore_sqlite
from services.backup.restores.foundry import restore
from services.backup.snapshots.database import PostgresDump, PostgresTarget, SqliteSnapshot
from services.backup.stores import artifacts, crypto
from services.backup.stores.layout import new_ref
from services.backup.stores.s3 import S3Store
from tests.support.parts import missing

NewDatabase = Callable[[], Awaitable[str]]

SCHEMA = """
CREATE TABLE clusters (
    id uuid PRIMARY KEY, name text UNIQUE NOT NULL, generation bigint NOT NULL,
    spec jsonb NOT NULL, created_at timestamptz NOT NULL, secret bytea
);
CREATE TABLE outbox (id bigserial PRIMARY KEY, cluster_id uuid REFERENCES clusters(id),
    payload text NOT NULL, sent boolean NOT NULL DEFAULT false);
CREATE INDEX outbox_unsent ON outbox (id) WHERE NOT sent;
"""


async def rows(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    connection = await asyncpg.connect(dsn)
    try:
        return {
            table: [tuple(r) for r in await connection.fetch(f"SELECT * FROM {table} ORDER BY 1")]
            for table in ("clusters", "outbox")
        }
    finally:
        await connection.close()


async def seed(dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(SCHEMA)
        for i in range(200):
            cluster = await connection.fetchval(
                "INSERT INTO clusters VALUES (gen_random_uuid(), $1, $2, $3, $4, $5) RETURNING id",
                f"cluster-{i}",
                i,
                f'{{"kubernetesVersion": "1.34.{i % 3}", "note": "ünïcødé ✓"}}',
                datetime(2026, 11, 21, tzinfo=UTC),
                bytes(range(256)) * 4,
            )
            await connection.execute(
                "INSERT INTO outbox (cluster_id, payload) VALUES ($1, $2)", cluster, "x" * 1000
            )
    finally:
        await connection.close()


def require_pg_tools() -> None:
    for tool in ("pg_dump", "pg_restore"):
        if shutil.which(tool) is None:
            missing(f"{tool} not found (apt-get install postgresql-client)")


@pytest.mark.postgres
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_postgres_round_trip(
    new_database: NewDatabase,
    s3_store: S3Store,
    keyring: crypto.Keyring,
    tmp_path: Path,
    encrypted: bool,
) -> None:
    require_pg_tools()
    source = await new_database()
    await seed(source)
    ring = keyring if encrypted else None
    dump = PostgresDump(
        PostgresTarget.from_url(source.replace("postgresql://", "postgresql+asyncpg://"))
    )
    manifest = await artifacts.write_backup(
        s3_store,
        new_ref("foundry", datetime.now(UTC)),
        "postgres",
        dump.chunks(),
        keyring=ring,
        details=dump.details,
    )
    assert manifest.database is not None
    assert manifest.database.engine == "postgres"
    assert manifest.verified_at is not None

    local = tmp_path / "foundry.pgdump"
    await artifacts.download(s3_store, manifest.ref, local, ring)
    target = await new_database()
    await restore_postgres(local, PostgresTarget.from_url(target))
    assert await rows(target) == await rows(source)


@pytest.mark.postgres
async def test_postgres_restore_is_all_or_nothing(
    new_database: NewDatabase, tmp_path: Path
) -> None:
    require_pg_tools()
    source = await new_database()
    await seed(source)
    dump = PostgresDump(PostgresTarget.from_url(source))
    local = tmp_path / "dump"
    local.write_bytes(b"".join([chunk async for chunk in dump.chunks()]))
    target = await new_database()
    connection = await asyncpg.connect(target)
    await connection.execute("CREATE TABLE outbox (id int)")  # collides with the dump
    await connection.close()
    with pytest.raises(errors.RestoreError, match="pg_restore"):
        await restore_postgres(local, PostgresTarget.from_url(target))
    connection = await asyncpg.connect(target)
    try:
        tables = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
    finally:
        await connection.close()
    assert [t["tablename"] for t in tables] == ["outbox"]  # nothing half-restored


@pytest.mark.postgres
async def test_pg_dump_failure_is_reported_and_nothing_stored(
    s3_store: S3Store, tmp_path: Path
) -> None:
    require_pg_tools()
    dump = PostgresDump(PostgresTarget.from_url("postgresql://postgres@127.0.0.1:5432/no_such_db"))
    with pytest.raises(errors.DumpError, match="no_such_db"):
        await artifacts.write_backup(
            s3_store, new_ref("foundry", datetime.now(UTC)), "postgres", dump.chunks()
        )
    assert await s3_store.list("") == []


def test_password_is_not_on_the_command_line() -> None:
    target = PostgresTarget.from_url("postgresql+asyncpg://nest:s3cr%40t@db.example:5433/foundry")
    assert "s3cr" not in target.url
    assert "s3cr" not in repr(target)
    assert target.url == "postgresql://nest@db.example:5433/foundry"
    assert target.environment()["PGPASSWORD"] == "s3cr@t"
    assert target.database == "foundry"


def make_sqlite(path: Path, count: int = 500) -> None:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE clusters (id TEXT PRIMARY KEY, spec TEXT, blob BLOB)")
    connection.executemany(
        "INSERT INTO clusters VALUES (?, ?, ?)",
        [(f"c{i:04}", '{"v": "ünïcødé"}' * 10, bytes(range(256))) for i in range(count)],
    )
    connection.commit()
    connection.close()


def sqlite_rows(path: Path) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT * FROM clusters ORDER BY id").fetchall()
    finally:
        connection.close()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_sqlite_round_trip_while_written(
    s3_store: S3Store, keyring: crypto.Keyring, tmp_path: Path, encrypted: bool
) -> None:
    live = tmp_path / "nest.db"
    make_sqlite(live)
    # A writer keeps a transaction open: the online backup still sees a consistent state.
    writer = sqlite3.connect(live, check_same_thread=False)
    writer.execute("BEGIN")
    writer.execute("INSERT INTO clusters VALUES ('uncommitted', '{}', NULL)")
    expected = sqlite_rows(live)
    ring = keyring if encrypted else None
    snapshot = SqliteSnapshot(live, scratch_dir=tmp_path)
    try:
        manifest = await artifacts.write_backup(
            s3_store,
            new_ref("foundry", datetime.now(UTC)),
            "sqlite",
            snapshot.chunks(),
            keyring=ring,
            details=snapshot.details,
        )
    finally:
        writer.rollback()
        writer.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("nest-sqlite-")] == []
    downloaded = tmp_path / "downloaded.sqlite3"
    await artifacts.download(s3_store, manifest.ref, downloaded, ring)
    destination = tmp_path / "restored" / "nest.db"
    await restore_sqlite(downloaded, destination)
    assert sqlite_rows(destination) == expected
    assert ("uncommitted", "{}", None) not in expected


async def test_sqlite_restore_refuses_a_non_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a database" * 100)
    destination = tmp_path / "nest.db"
    make_sqlite(destination, 3)
    with pytest.raises(errors.RestoreError, match=r"not a SQLite database|integrity"):
        await restore_sqlite(junk, destination)
    assert len(sqlite_rows(destination)) == 3  # untouched


@pytest.mark.postgres
async def test_the_foundry_restore_puts_the_database_back(
    new_database: NewDatabase, s3_store: S3Store, keyring: crypto.Keyring, tmp_path: Path
) -> None:
    require_pg_tools()
    source = await new_database()
    await seed(source)
    dump = PostgresDump(PostgresTarget.from_url(source))
    manifest = await artifacts.write_backup(
        s3_store, new_ref("foundry", datetime.now(UTC)), "postgres", dump.chunks(), keyring=keyring
    )
    target = await new_database()
    await restore(s3_store, manifest, target, keyring, scratch_dir=tmp_path)
    assert await rows(target) == await rows(source)
    # Over an existing Foundry DB: --clean replaces it.
    connection = await asyncpg.connect(target)
    await connection.execute("DELETE FROM outbox")
    await connection.close()
    await restore(s3_store, manifest, target, keyring, scratch_dir=tmp_path, replace=True)
    assert await rows(target) == await rows(source)
