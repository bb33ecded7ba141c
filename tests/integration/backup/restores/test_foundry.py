"""The domain of `nest restore foundry` against real parts: SeaweedFS S3, SQLite, PostgreSQL.

Corruption, a wrong key and a backup of the other engine are refused before the database is
touched; an occupied database is refused unless forced, and forced it is replaced."""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import asyncpg
import pytest

from services.backup.restores import foundry as domain
from services.backup.snapshots.database import PostgresDump, PostgresTarget, SqliteSnapshot
from services.backup.stores import artifacts, crypto
from services.backup.stores.layout import new_ref
from services.backup.stores.local import LocalStore
from services.backup.stores.manifest import Manifest
from services.backup.stores.objects import ObjectStore
from tests.integration.backup.drills.test_newest import make_foundry_sqlite, require_pg_tools
from tests.support.s3 import SeaweedS3

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
NewDatabase = Callable[[], Awaitable[str]]


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def sqlite_backup(
    store: ObjectStore,
    live: Path,
    keyring: crypto.Keyring | None,
    when: datetime,
    verify: bool = True,
) -> Manifest:
    snapshot = SqliteSnapshot(live)
    return await artifacts.write_backup(
        store,
        new_ref("foundry", when),
        "sqlite",
        snapshot.chunks(),
        keyring=keyring,
        verify=verify,
        details=snapshot.details,
    )


def clusters(path: Path) -> list[tuple[str, str]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT id, name FROM clusters ORDER BY id").fetchall()
    finally:
        connection.close()


async def test_s3_location_lists_and_chooses_the_newest_verified_backup(
    s3_server: SeaweedS3, tmp_path: Path, keyring: crypto.Keyring
) -> None:
    bucket = s3_server.new_bucket()
    access = domain.S3Access(
        access_key_id=s3_server.access_key,
        secret_access_key=s3_server.secret_key,
        endpoint_url=s3_server.endpoint,
    )
    store = domain.open_location(f"s3://{bucket}/nest/prod", access)
    try:
        live = tmp_path / "nest.db"
        make_foundry_sqlite(live)
        old = await sqlite_backup(store, live, keyring, NOW - timedelta(hours=2))
        newest = await sqlite_backup(store, live, keyring, NOW - timedelta(hours=1))
        await sqlite_backup(store, live, keyring, NOW, verify=False)
        manifests = await domain.foundry_backups(store)
        assert len(manifests) == 3
        assert domain.choose(manifests, None).ref == newest.ref  # the unverified one is newer
        assert domain.choose(manifests, domain.backup_id(old)).ref == old.ref
        assert domain.choose(manifests, f"foundry/{domain.backup_id(old)}").ref == old.ref
        with pytest.raises(domain.FoundryRestoreError, match="no complete Foundry backup"):
            domain.choose(manifests, "20200101T000000Z-00000000")

        destination = tmp_path / "restored" / "nest.db"
        seen: list[int] = []
        await domain.restore(
            store,
            newest,
            f"sqlite:///{destination}",
            keyring,
            scratch_dir=tmp_path / "scratch",
            progress=seen.append,
        )
        assert clusters(destination) == clusters(live)
        assert sum(seen) == newest.plaintext_size
        assert list((tmp_path / "scratch").iterdir()) == []
    finally:
        await store.close()

    wrong = domain.S3Access(
        access_key_id=s3_server.access_key,
        secret_access_key="not-the-secret",
        endpoint_url=s3_server.endpoint,
    )
    store = domain.open_location(f"s3://{bucket}/nest/prod", wrong)
    try:
        with pytest.raises(domain.FoundryRestoreError, match="cannot list backups"):
            await domain.foundry_backups(store)
    finally:
        await store.close()
    assert "not-the-secret" not in repr(wrong)


async def test_corrupt_or_undecryptable_backups_leave_the_database_as_it_was(
    tmp_path: Path, keyring: crypto.Keyring
) -> None:
    store = LocalStore(tmp_path / "store")
    live = tmp_path / "nest.db"
    make_foundry_sqlite(live)
    manifest = await sqlite_backup(store, live, keyring, NOW)
    destination = tmp_path / "existing.db"
    make_foundry_sqlite(destination, alembic=False)
    connection = sqlite3.connect(destination)
    connection.execute("INSERT INTO clusters VALUES ('only-here', 'precious')")
    connection.commit()
    connection.close()
    before = clusters(destination)
    url = f"sqlite:///{destination}"

    # Checked before anything is downloaded: the keyring must hold the backup's key id.
    other = crypto.Keyring({"other": secrets.token_bytes(32)}, "other")
    assert "does not hold" in (domain.keyring_problem(manifest, other) or "")
    assert "NEST_BACKUP_ENCRYPTION_KEYS" in (domain.keyring_problem(manifest, None) or "")
    # The same key id with another key: found by the key commitment while downloading.
    impostor = crypto.Keyring({keyring.active: secrets.token_bytes(32)}, keyring.active)
    with pytest.raises(domain.FoundryRestoreError, match="WrongKey"):
        await domain.restore(store, manifest, url, impostor, scratch_dir=tmp_path / "s")

    key = manifest.ref.key(manifest.artifact)
    stored = bytearray(b"".join([chunk async for chunk in store.get(key)]))
    stored[len(stored) // 3] ^= 0x01
    await store.put(key, _once(bytes(stored)))
    with pytest.raises(domain.FoundryRestoreError, match="failed its checks"):
        await domain.restore(store, manifest, url, keyring, scratch_dir=tmp_path / "s")
    assert clusters(destination) == before
    assert list((tmp_path / "s").iterdir()) == []

    # The destination holds clusters: refused unless forced.
    assert await domain.occupied(url) == {"clusters": 4, "api_tokens": 2}
    with pytest.raises(domain.FoundryRestoreError, match="already holds data"):
        await domain.preflight(
            manifest,
            url,
            keyring,
            data_dir=tmp_path / "d",
            api_url="http://127.0.0.1:9",
            force=False,
        )
    with pytest.raises(domain.FoundryRestoreError, match="sqlite dump"):
        domain.check_kind(manifest, "postgresql+asyncpg://postgres@127.0.0.1/x")


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_running_nest_is_detected(tmp_path: Path, health_server: str) -> None:
    assert domain.nest_running(tmp_path, "http://127.0.0.1:9") is None
    assert "answers at" in (domain.nest_running(tmp_path, health_server) or "")
    # A stale pid file (a process that is not nats-server) is not a running Nest.
    (tmp_path / "nats").mkdir()
    (tmp_path / "nats" / "nats-server.pid").write_text("1")
    assert domain.nest_running(tmp_path, "http://127.0.0.1:9") is None


@pytest.mark.postgres
async def test_postgres_restore_and_a_forced_one_over_existing_data(
    new_database: NewDatabase, tmp_path: Path
) -> None:
    require_pg_tools()
    source = await new_database()
    connection = await asyncpg.connect(source)
    try:
        await connection.execute(
            "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY);"
            "INSERT INTO alembic_version VALUES ('0006');"
            "CREATE TABLE clusters (id text PRIMARY KEY, name text NOT NULL);"
            "CREATE TABLE api_tokens (id text PRIMARY KEY);"
            "INSERT INTO clusters VALUES ('c1', 'kept'), ('c2', 'also-kept');"
            "INSERT INTO api_tokens VALUES ('t1');"
        )
    finally:
        await connection.close()
    store = LocalStore(tmp_path / "store")
    dump = PostgresDump(PostgresTarget.from_url(source))
    manifest = await artifacts.write_backup(
        store, new_ref("foundry", NOW), "postgres", dump.chunks(), details=dump.details
    )
    target = await new_database()
    url = target.replace("postgresql://", "postgresql+asyncpg://")
    assert await domain.occupied(url) == {}
    await domain.restore(store, manifest, url, None, scratch_dir=tmp_path / "s")
    assert await domain.occupied(url) == {"clusters": 2, "api_tokens": 1}

    connection = await asyncpg.connect(target)
    try:
        await connection.execute("INSERT INTO clusters VALUES ('c3', 'after the backup')")
    finally:
        await connection.close()
    await domain.restore(store, manifest, url, None, scratch_dir=tmp_path / "s", replace=True)
    connection = await asyncpg.connect(target)
    try:
        names = [r["name"] for r in await connection.fetch("SELECT name FROM clusters ORDER BY 1")]
    finally:
        await connection.close()
    assert names == ["also-kept", "kept"]
    with pytest.raises(domain.FoundryRestoreError, match="postgres dump"):
        domain.check_kind(manifest, f"sqlite:///{tmp_path / 'nest.db'}")
