"""The Foundry DB drill: restore a dump where it cannot hurt and count what it holds.

- SQLite: `PRAGMA integrity_check` on the downloaded file, rows per table.
- PostgreSQL: `CREATE DATABASE nest_drill_<hex>` on the server of the Foundry DB's URL,
  `pg_restore` into it (`restores.database.restore_postgres`), rows per table; the scratch
  database is always dropped, also when a step fails.
- Both: the alembic version table must be there (it is a Foundry DB).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from services.backup import errors
from services.backup.restores.database import restore_postgres
from services.backup.snapshots.database import PostgresTarget, sqlite_path
from services.backup.stores import artifacts, crypto
from services.backup.stores.manifest import Manifest
from services.backup.stores.objects import ObjectStore

log = logging.getLogger(__name__)

ALEMBIC_TABLE = "alembic_version"


async def drill_foundry(
    store: ObjectStore,
    manifest: Manifest,
    keyring: crypto.Keyring | None,
    scratch: Path,
    database_url: str | None,
    pg_bin_dir: Path | None,
) -> dict[str, int]:
    if manifest.kind == "sqlite":
        local = scratch / "foundry.sqlite3"
        await artifacts.download(store, manifest.ref, local, keyring)
        rows = await asyncio.to_thread(_sqlite_rows, local)
    elif manifest.kind == "postgres":
        if database_url is None or sqlite_path(database_url) is not None:
            raise errors.DrillCheckFailed(
                "NoScratchDatabase",
                "a PostgreSQL dump is drilled in a scratch database on the Foundry DB's "
                "PostgreSQL server, and the Foundry DB URL is not a PostgreSQL one",
            )
        server = PostgresTarget.from_url(database_url)
        local = scratch / "foundry.pgdump"
        await artifacts.download(store, manifest.ref, local, keyring)
        rows = await _postgres_rows(local, server, pg_bin_dir)
    else:
        raise errors.DrillCheckFailed(
            "RestoreFailed", f"the backup is of kind {manifest.kind!r}, not a Foundry DB dump"
        )
    if ALEMBIC_TABLE not in rows:
        raise errors.DrillCheckFailed(
            "AlembicVersionMissing",
            f"the restored database has no {ALEMBIC_TABLE} table: it is not a Foundry DB",
        )
    if rows[ALEMBIC_TABLE] < 1:
        raise errors.DrillCheckFailed(
            "AlembicVersionMissing", f"the restored database's {ALEMBIC_TABLE} table is empty"
        )
    return rows


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sqlite_rows(path: Path) -> dict[str, int]:
    try:
        connection = sqlite3.connect(path)
    except sqlite3.Error as exc:
        raise errors.DrillCheckFailed("RestoreFailed", f"not a SQLite database: {exc}") from None
    try:
        try:
            check = connection.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.DatabaseError as exc:
            raise errors.DrillCheckFailed(
                "RestoreFailed", f"not a SQLite database: {exc}"
            ) from None
        if [tuple(row) for row in check] != [("ok",)]:
            detail = "; ".join(str(row[0]) for row in check[:3])
            raise errors.DrillCheckFailed(
                "IntegrityError", f"SQLite integrity_check failed: {detail}"
            )
        names = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                "ORDER BY name"
            )
        ]
        rows: dict[str, int] = {}
        for name in names:
            # A table name from the restored catalog, quoted as an identifier.
            query = f"SELECT count(*) FROM {_quote(name)}"  # noqa: S608
            rows[name] = int(connection.execute(query).fetchone()[0])
        return rows
    finally:
        connection.close()


def _with_database(target: PostgresTarget, name: str) -> PostgresTarget:
    parts = urlsplit(target.url)
    return PostgresTarget(
        urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, "")), target.password
    )


async def _postgres_rows(
    dump: Path, server: PostgresTarget, pg_bin_dir: Path | None
) -> dict[str, int]:
    import asyncpg

    name = f"nest_drill_{secrets.token_hex(6)}"

    async def admin() -> asyncpg.Connection:
        try:
            return await asyncpg.connect(server.url, password=server.password, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise errors.DrillCheckFailed(
                "RestoreFailed", f"cannot reach PostgreSQL {server.database!r}: {exc}"
            ) from None

    connection = await admin()
    try:
        try:
            await connection.execute(f"CREATE DATABASE {_quote(name)}")
        except asyncpg.PostgresError as exc:
            raise errors.DrillCheckFailed(
                "NoScratchDatabase", f"cannot create the scratch database {name}: {exc}"
            ) from None
    finally:
        await connection.close()
    scratch = _with_database(server, name)
    try:
        await restore_postgres(dump, scratch, bin_dir=pg_bin_dir)
        restored = await asyncpg.connect(scratch.url, password=scratch.password, timeout=10)
        try:
            names = [
                row["tablename"]
                for row in await restored.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
                )
            ]
            rows: dict[str, int] = {}
            for table in names:
                query = f"SELECT count(*) FROM {_quote(table)}"  # noqa: S608 - quoted identifier
                rows[table] = int(await restored.fetchval(query))
        finally:
            await restored.close()
        return rows
    except asyncpg.PostgresError as exc:
        raise errors.DrillCheckFailed(
            "RestoreFailed", f"reading the scratch database failed: {exc}"
        ) from None
    finally:
        await asyncio.shield(_drop(server, name))


async def _drop(server: PostgresTarget, name: str) -> None:
    import asyncpg

    try:
        connection = await asyncpg.connect(server.url, password=server.password, timeout=10)
        try:
            await connection.execute(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")
        finally:
            await connection.close()
    except (OSError, asyncpg.PostgresError) as exc:
        log.warning("scratch database not dropped", extra={"database": name, "error": str(exc)})
    else:
        log.info("scratch database dropped", extra={"database": name})
