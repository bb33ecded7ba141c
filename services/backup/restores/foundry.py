"""Bringing the Foundry DB back on a fresh appliance: `nest restore foundry` (cli/restore.py).

The steps, each a plain function the CLI calls in order:

1. `open_location`: the store the backups are in: an absolute directory (the local store) or
   `s3://bucket/prefix` with credentials given by the operator (never logged).
2. `foundry_backups` / `choose`: the complete Foundry backups there, and the one to restore: the
   newest verified one, or the one the operator named.
3. `nest_running`: refuse while a Nest runs on this data dir (its embedded NATS pid file names a
   live nats-server, or a Nest API answers on the configured port): the API holds the database.
4. `occupied`: refuse to overwrite a database that already holds clusters or tokens unless
   forced.
5. `restore`: download to a scratch file with every check (`artifacts.read_backup`: stored and
   plaintext sha256, decryption), reporting progress, and only then restore it with
   `database.restore_sqlite` (checked, then an atomic replace) or `database.restore_postgres`
   (`pg_restore --single-transaction`: all or nothing). A failure at any step leaves the
   existing database as it was.

Every failure the operator can act on is a `FoundryRestoreError` with one readable message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from services.backup import errors
from services.backup.restores.database import restore_postgres, restore_sqlite
from services.backup.snapshots.database import PostgresTarget, sqlite_path
from services.backup.stores import artifacts, crypto
from services.backup.stores.local import LocalStore
from services.backup.stores.manifest import Manifest
from services.backup.stores.objects import ObjectStore
from services.backup.stores.s3 import S3Config, S3Store

TARGET = "foundry"
CHECKED_TABLES = ("clusters", "api_tokens")
"""A database holding rows in any of these is not overwritten without --force."""


class FoundryRestoreError(Exception):
    """A restore cannot go ahead or failed; the message says why and what to do."""


@dataclass(frozen=True)
class S3Access:
    """How to reach an S3 location; the secret is never shown."""

    access_key_id: str
    secret_access_key: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    path_style: bool = True
    verify: bool | str = True

    def __repr__(self) -> str:
        return f"S3Access(access_key_id={self.access_key_id!r}, endpoint_url={self.endpoint_url!r})"


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def open_location(location: str, s3: S3Access | None = None) -> ObjectStore:
    """The store at `location`: an absolute directory, or `s3://bucket/prefix`."""
    if is_s3(location):
        parts = urlsplit(location)
        if not parts.netloc:
            raise FoundryRestoreError(f"--location {location!r}: no bucket (s3://bucket/prefix)")
        if s3 is None or not s3.access_key_id:
            raise FoundryRestoreError(
                "--access-key-id is required for an s3:// location (the secret comes from "
                "NEST_RESTORE_SECRET_ACCESS_KEY or a prompt)"
            )
        try:
            config = S3Config(
                endpoint_url=s3.endpoint_url,
                bucket=parts.netloc,
                prefix=parts.path.strip("/"),
                region=s3.region,
                access_key_id=s3.access_key_id,
                secret_access_key=s3.secret_access_key,
                path_style=s3.path_style,
                verify=s3.verify,
            )
        except ValidationError as exc:
            first = exc.errors(include_input=False)[0]
            field = ".".join(str(p) for p in first["loc"])
            raise FoundryRestoreError(f"--location {location!r}: {field}: {first['msg']}") from None
        return S3Store(config)
    path = Path(location)
    if not path.is_absolute():
        raise FoundryRestoreError(
            f"--location {location!r} must be an absolute directory or s3://bucket/prefix"
        )
    if not path.is_dir():
        raise FoundryRestoreError(f"--location {location}: no such directory")
    return LocalStore(path)


async def foundry_backups(store: ObjectStore) -> list[Manifest]:
    """Complete Foundry backups in the store, oldest first."""
    try:
        return await artifacts.list_backups(store, TARGET)
    except errors.BackupError as exc:
        raise FoundryRestoreError(f"cannot list backups in {store.description}: {exc}") from None


def backup_id(manifest: Manifest) -> str:
    """The id an operator passes to --backup: the backup's folder name."""
    return manifest.ref.name


def choose(manifests: list[Manifest], wanted: str | None) -> Manifest:
    """The backup named by `wanted` (its id, `foundry/<id>`, or the short id), else the newest
    verified one."""
    if wanted is not None:
        name = wanted.removeprefix(f"{TARGET}/")
        for manifest in manifests:
            if name in (manifest.ref.name, manifest.backup_id):
                return manifest
        raise FoundryRestoreError(
            f"no complete Foundry backup {wanted!r} here (list them with --list)"
        )
    verified = [m for m in manifests if m.verified_at is not None]
    if not verified:
        raise FoundryRestoreError(
            "no verified Foundry backup here"
            + (" (unverified ones exist: name one with --backup)" if manifests else "")
        )
    return verified[-1]


# Is this appliance in use?


def _alive_nats(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"nats-server" in cmdline else None


def nest_running(data_dir: Path, api_url: str) -> str | None:
    """Why Nest looks like it is running on this data dir / API address, or None."""
    pid = _alive_nats(data_dir / "nats" / "nats-server.pid")
    if pid is not None:
        return f"the embedded NATS of {data_dir} is running (pid {pid}): stop `nest up` first"
    with contextlib.suppress(httpx.HTTPError):
        response = httpx.get(f"{api_url}/healthz", timeout=2.0)
        if response.status_code < 500:
            return f"a Nest API answers at {api_url}: stop it first"
    return None


def _sqlite_counts(path: Path) -> dict[str, int]:
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        present = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        counts: dict[str, int] = {}
        for table in CHECKED_TABLES:
            if table in present:
                row = connection.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
                counts[table] = int(row[0])
        return counts
    finally:
        connection.close()


async def _postgres_counts(target: PostgresTarget) -> dict[str, int]:
    import asyncpg

    try:
        connection = await asyncpg.connect(target.url, password=target.password, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise FoundryRestoreError(
            f"cannot connect to the Foundry DB {target.database!r} (NEST_DATABASE_URL): {exc}; "
            "it must exist (create it empty) before the restore"
        ) from None
    try:
        counts: dict[str, int] = {}
        for table in CHECKED_TABLES:
            if await connection.fetchval("SELECT to_regclass($1)", f"public.{table}"):
                query = f"SELECT count(*) FROM public.{table}"  # noqa: S608 - fixed names
                counts[table] = int(await connection.fetchval(query))
        return counts
    finally:
        await connection.close()


async def occupied(database_url: str) -> dict[str, int]:
    """Rows in clusters / api_tokens of the destination database (empty: nothing to lose)."""
    path = sqlite_path(database_url)
    if path is not None:
        if not path.exists():
            return {}
        try:
            counts = await asyncio.to_thread(_sqlite_counts, path)
        except sqlite3.Error as exc:
            raise FoundryRestoreError(f"cannot read the existing database {path}: {exc}") from None
    else:
        counts = await _postgres_counts(PostgresTarget.from_url(database_url))
    return {table: count for table, count in counts.items() if count}


def engine_of(database_url: str) -> str:
    return "sqlite" if sqlite_path(database_url) is not None else "postgres"


def check_kind(manifest: Manifest, database_url: str) -> None:
    engine = engine_of(database_url)
    if manifest.kind != engine:
        raise FoundryRestoreError(
            f"backup {backup_id(manifest)} is a {manifest.kind} dump and the Foundry DB here is "
            f"{engine} (NEST_DATABASE_URL): restore it with the same database engine"
        )


async def preflight(
    manifest: Manifest,
    database_url: str,
    keyring: crypto.Keyring | None,
    *,
    data_dir: Path,
    api_url: str,
    force: bool,
) -> dict[str, int]:
    """Every check before anything is downloaded or changed; returns what the destination holds
    (non-empty only when forced)."""
    check_kind(manifest, database_url)
    if problem := keyring_problem(manifest, keyring):
        raise FoundryRestoreError(problem)
    if reason := await asyncio.to_thread(nest_running, data_dir, api_url):
        raise FoundryRestoreError(f"Nest is running: {reason}")
    held = await occupied(database_url)
    if held and not force:
        what = ", ".join(f"{count} {table}" for table, count in sorted(held.items()))
        raise FoundryRestoreError(
            f"the Foundry DB already holds data ({what}); pass --force to replace it"
        )
    return held


# The restore


Progress = Callable[[int], None]
"""Called with the number of plaintext bytes just written."""


async def _download(
    store: ObjectStore,
    manifest: Manifest,
    destination: Path,
    keyring: crypto.Keyring | None,
    progress: Progress,
) -> None:
    """Like `artifacts.download`, reporting progress: the file exists only if every check held."""
    _, stream = await artifacts.read_backup(store, manifest.ref, keyring)
    temp = destination.with_name(f".{destination.name}.partial")
    try:
        with temp.open("wb") as handle:
            async for chunk in stream:
                await asyncio.to_thread(handle.write, chunk)
                progress(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


async def restore(
    store: ObjectStore,
    manifest: Manifest,
    database_url: str,
    keyring: crypto.Keyring | None,
    *,
    scratch_dir: Path,
    pg_bin_dir: Path | None = None,
    replace: bool = False,
    progress: Progress = lambda _: None,
) -> None:
    """Download `manifest`'s backup with every check, then restore it into `database_url`.

    `replace`: PostgreSQL drops the objects the dump holds first (`pg_restore --clean`)."""
    check_kind(manifest, database_url)
    await asyncio.to_thread(scratch_dir.mkdir, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nest-restore-", dir=scratch_dir) as directory:
        local = Path(directory) / "foundry"
        try:
            await _download(store, manifest, local, keyring, progress)
        except errors.BackupError as exc:
            raise FoundryRestoreError(
                f"backup {backup_id(manifest)} failed its checks ({exc.reason}): {exc}"
            ) from None
        except OSError as exc:
            raise FoundryRestoreError(
                f"download into {scratch_dir} failed, the database is unchanged: {exc}"
            ) from None
        try:
            destination = sqlite_path(database_url)
            if destination is not None:
                await restore_sqlite(local, destination)
            else:
                await restore_postgres(
                    local, PostgresTarget.from_url(database_url), clean=replace, bin_dir=pg_bin_dir
                )
        except (errors.BackupError, OSError) as exc:
            raise FoundryRestoreError(f"restore failed, the database is unchanged: {exc}") from None


def keyring_problem(manifest: Manifest, keyring: crypto.Keyring | None) -> str | None:
    """Why the configured keys cannot decrypt this backup (before downloading it), or None."""
    if manifest.encryption is None:
        return None
    key_id = manifest.encryption.key_id
    if keyring is None:
        return (
            f"backup {backup_id(manifest)} is encrypted with key {key_id!r}: set "
            "NEST_BACKUP_ENCRYPTION_KEYS to a keyring holding it"
        )
    try:
        keyring.key(key_id)
    except errors.UnknownKey:
        return (
            f"backup {backup_id(manifest)} is encrypted with key {key_id!r}, which "
            "NEST_BACKUP_ENCRYPTION_KEYS does not hold"
        )
    return None
