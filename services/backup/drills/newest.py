"""Restore drills: prove that the newest verified backup of a target actually restores.

`drill_newest` finds the newest verified backup of a target (`artifacts.list_backups`), downloads
it with every check (`artifacts.download`: stored and plaintext sha256, decryption), then:

- etcd: restores it with `etcdutl` into a scratch directory, starts a throwaway etcd on it
  (`etcd.restore_drill`) and compares revision and key count with the manifest (exactly when the
  manifest's revision is exact, else revision ≥ the manifest's).
- Foundry DB, SQLite: `PRAGMA integrity_check` on the downloaded file, rows per table.
- Foundry DB, PostgreSQL: `CREATE DATABASE nest_drill_<hex>` on the server of the Foundry DB's
  URL, `pg_restore` into it (`database.restore_postgres`), rows per table; the scratch database
  is always dropped, also when a step fails.
- Both Foundry kinds: the alembic version table must be there (it is a Foundry DB).

It never raises for a backup-domain problem: the result is a `DrillPassed`, or a `DrillFailed`
whose `reason` says what broke (`NoBackup`, `IntegrityError`, `WrongKey`, `UnknownKey`,
`CiphertextCorrupt`, `RevisionMismatch`, `KeyCountMismatch`, `RestoreFailed`,
`AlembicVersionMissing`, `NoScratchDatabase`, `ToolMissing`, store errors by their reason).
Scratch files are always removed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import tempfile
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from libs.common.contract.backup import DrillFailed, DrillPassed
from services.backup import artifacts, crypto, errors
from services.backup.database import PostgresTarget, restore_postgres
from services.backup.etcd import restore_drill
from services.backup.manifest import Manifest
from services.backup.runs import sqlite_path
from services.backup.store import ObjectStore

log = logging.getLogger(__name__)

ALEMBIC_TABLE = "alembic_version"


class DrillProblem(Exception):
    """A drill check failed; `reason` is the DrillFailed reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _reason(exc: BaseException) -> str:
    if isinstance(exc, DrillProblem):
        return exc.reason
    if isinstance(exc, errors.RestoreError):
        return "RestoreFailed"
    if isinstance(exc, errors.BackupError):
        return exc.reason
    return "RestoreFailed"


async def drill_newest(
    store: ObjectStore,
    target: str,
    kind: str,
    keyring: crypto.Keyring | None,
    *,
    scratch_dir: Path,
    etcd_bin_dir: Path | None,
    database_url: str | None,
    pg_bin_dir: Path | None,
    location_id: str | None,
    policy_id: str | None,
    now: datetime,
) -> DrillPassed | DrillFailed:
    """Drill the newest verified backup of `target` (kind `etcd` or `foundry`); see the module."""
    began = time.monotonic()
    backup: str | None = None

    def failed(reason: str, message: str) -> DrillFailed:
        log.warning(
            "restore drill failed",
            extra={"target": target, "backup": backup, "reason": reason, "error": message},
        )
        return DrillFailed(
            target=target,
            kind=kind,
            backup=backup,
            location_id=location_id,
            policy_id=policy_id,
            drilled_at=now,
            reason=reason,
            message=message,
        )

    if kind not in ("etcd", "foundry"):
        return failed("RestoreFailed", f"unknown backup kind {kind!r} (etcd or foundry)")
    try:
        manifests = await artifacts.list_backups(store, target)
    except (errors.BackupError, OSError) as exc:
        reason = exc.reason if isinstance(exc, errors.BackupError) else "StoreError"
        return failed(
            reason, f"cannot list the backups of {target!r} in {store.description}: {exc}"
        )
    verified = [m for m in manifests if m.verified_at is not None]
    if not verified:
        return failed("NoBackup", f"no verified backup of {target!r} in {store.description}")
    manifest = verified[-1]
    backup = str(manifest.ref)
    try:
        await asyncio.to_thread(scratch_dir.mkdir, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="nest-drill-", dir=scratch_dir) as directory:
            scratch = Path(directory)
            revision: int | None = None
            key_count: int | None = None
            rows: dict[str, int] | None = None
            if kind == "etcd":
                revision, key_count = await _drill_etcd(
                    store, manifest, keyring, scratch, etcd_bin_dir
                )
            else:
                rows = await _drill_foundry(
                    store, manifest, keyring, scratch, database_url, pg_bin_dir
                )
    except (errors.BackupError, DrillProblem, OSError, sqlite3.Error) as exc:
        return failed(_reason(exc), f"drill of {backup}: {exc}")
    seconds = round(time.monotonic() - began, 3)
    log.info("restore drill passed", extra={"backup": backup, "seconds": seconds})
    return DrillPassed(
        target=target,
        kind=kind,
        backup=backup,
        location_id=location_id,
        policy_id=policy_id,
        drilled_at=now,
        duration_seconds=seconds,
        etcd_revision=revision,
        etcd_key_count=key_count,
        table_rows=rows,
    )


# etcd


async def _drill_etcd(
    store: ObjectStore,
    manifest: Manifest,
    keyring: crypto.Keyring | None,
    scratch: Path,
    bin_dir: Path | None,
) -> tuple[int, int]:
    if manifest.kind != "etcd" or manifest.etcd is None:
        raise DrillProblem(
            "RestoreFailed", f"the backup is of kind {manifest.kind!r}, not an etcd snapshot"
        )
    snapshot = scratch / "snapshot.db"
    await artifacts.download(store, manifest.ref, snapshot, keyring)
    result = await restore_drill(snapshot, scratch, None, bin_dir=bin_dir)
    expected = manifest.etcd
    if expected.revision_exact:
        if result.revision != expected.revision:
            raise DrillProblem(
                "RevisionMismatch",
                f"the restored etcd is at revision {result.revision}; the manifest recorded "
                f"{expected.revision}",
            )
        if result.key_count != expected.key_count:
            raise DrillProblem(
                "KeyCountMismatch",
                f"the restored etcd holds {result.key_count} keys; the manifest recorded "
                f"{expected.key_count}",
            )
    elif result.revision < expected.revision:
        raise DrillProblem(
            "RevisionMismatch",
            f"the restored etcd is at revision {result.revision}, older than the manifest's "
            f"{expected.revision}",
        )
    return result.revision, result.key_count


# Foundry DB


async def _drill_foundry(
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
            raise DrillProblem(
                "NoScratchDatabase",
                "a PostgreSQL dump is drilled in a scratch database on the Foundry DB's "
                "PostgreSQL server, and the Foundry DB URL is not a PostgreSQL one",
            )
        server = PostgresTarget.from_url(database_url)
        local = scratch / "foundry.pgdump"
        await artifacts.download(store, manifest.ref, local, keyring)
        rows = await _postgres_rows(local, server, pg_bin_dir)
    else:
        raise DrillProblem(
            "RestoreFailed", f"the backup is of kind {manifest.kind!r}, not a Foundry DB dump"
        )
    if ALEMBIC_TABLE not in rows:
        raise DrillProblem(
            "AlembicVersionMissing",
            f"the restored database has no {ALEMBIC_TABLE} table: it is not a Foundry DB",
        )
    if rows[ALEMBIC_TABLE] < 1:
        raise DrillProblem(
            "AlembicVersionMissing", f"the restored database's {ALEMBIC_TABLE} table is empty"
        )
    return rows


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sqlite_rows(path: Path) -> dict[str, int]:
    try:
        connection = sqlite3.connect(path)
    except sqlite3.Error as exc:
        raise DrillProblem("RestoreFailed", f"not a SQLite database: {exc}") from None
    try:
        try:
            check = connection.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.DatabaseError as exc:
            raise DrillProblem("RestoreFailed", f"not a SQLite database: {exc}") from None
        if [tuple(row) for row in check] != [("ok",)]:
            detail = "; ".join(str(row[0]) for row in check[:3])
            raise DrillProblem("IntegrityError", f"SQLite integrity_check failed: {detail}")
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
            raise DrillProblem(
                "RestoreFailed", f"cannot reach PostgreSQL {server.database!r}: {exc}"
            ) from None

    connection = await admin()
    try:
        try:
            await connection.execute(f"CREATE DATABASE {_quote(name)}")
        except asyncpg.PostgresError as exc:
            raise DrillProblem(
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
        raise DrillProblem("RestoreFailed", f"reading the scratch database failed: {exc}") from None
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
