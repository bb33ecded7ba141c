"""`nest restore`: bring data back from backups. `nest restore foundry` restores the Foundry DB
on a fresh (or stopped) appliance; the work is in services/backup/restores/foundry.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from datetime import UTC
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from cli.kit import Column, console, error, group, listing, note, say, size
from cli.kit import settings as load
from libs.common.settings import Settings

if TYPE_CHECKING:
    from services.backup.stores import crypto
    from services.backup.stores.manifest import Manifest
    from services.backup.stores.objects import ObjectStore

SECRET_ENV = "NEST_RESTORE_SECRET_ACCESS_KEY"

# The backup modules (aioboto3 and friends) are imported by the command itself, so that every
# other `nest` command starts as fast as before.
app = group("Restore from backups.")

BACKUP_COLUMNS = (
    Column("ID"),
    Column("TIME (UTC)", priority=3),
    Column("SIZE", priority=2, justify="right"),
    Column("ENGINE", priority=4),
    Column("CHECKS", priority=1, wrap=True),
    Column(""),
)


def backup_rows(manifests: list[Manifest], chosen: Manifest | None) -> list[list[str]]:
    """Newest first; the one a restore without --backup takes is marked."""
    from services.backup.restores import foundry as domain

    rows = []
    for manifest in reversed(manifests):
        checks = ["verified"] if manifest.verified_at else ["not verified"]
        if manifest.encryption:
            checks.append(f"encrypted ({manifest.encryption.key_id})")
        rows.append(
            [
                domain.backup_id(manifest),
                manifest.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                size(manifest.stored_size),
                manifest.kind,
                ", ".join(checks),
                "← default" if chosen is manifest else "",
            ]
        )
    return rows


def _secret(location: str) -> str:
    from services.backup.restores import foundry as domain

    if not domain.is_s3(location):
        return ""
    secret = os.environ.get(SECRET_ENV)
    if secret:
        return secret
    if not sys.stdin.isatty():
        raise error(f"the S3 secret access key: set {SECRET_ENV} (no terminal to prompt on)")
    value: str = typer.prompt("S3 secret access key", hide_input=True)
    return value


@app.command("foundry")
def foundry(
    location: Annotated[
        str,
        typer.Option(
            "--location",
            metavar="DIR|S3-URL",
            help="Where the backups are: an absolute directory (the local store of `nest up` "
            "is ~/.nest/backups, or backups/ in NEST_DATA_DIR) or s3://bucket/prefix.",
        ),
    ],
    endpoint_url: Annotated[
        str | None,
        typer.Option("--endpoint-url", metavar="URL", help="S3 endpoint (default: AWS)."),
    ] = None,
    region: Annotated[
        str, typer.Option("--region", metavar="REGION", help="S3 signing region.")
    ] = "us-east-1",
    path_style: Annotated[
        bool,
        typer.Option("--path-style/--no-path-style", help="Address the bucket in the path."),
    ] = True,
    access_key_id: Annotated[
        str | None,
        typer.Option(
            "--access-key-id",
            metavar="KEY-ID",
            help=f"S3 access key id; the secret comes from {SECRET_ENV}.",
        ),
    ] = None,
    backup: Annotated[
        str | None,
        typer.Option(
            "--backup", metavar="ID", help="The backup's id (default: the newest verified one)."
        ),
    ] = None,
    list_only: Annotated[
        bool, typer.Option("--list", help="List the Foundry backups there and stop.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace a database that already holds clusters or tokens."),
    ] = False,
) -> None:
    """Restore the Foundry DB from a backup, with Nest stopped.

    For a lost appliance: restore, then start Nest with `nest up`.

    The backup is downloaded and checked (sha256 of the stored bytes and of the plaintext,
    decryption with NEST_BACKUP_ENCRYPTION_KEYS) before the database named by the settings
    (NEST_DATABASE_URL, or SQLite in NEST_DATA_DIR) is replaced. Nest must be stopped. Keep the
    same NEST_SECRETS_KEY (or secrets.key file), or stored S3 secrets become unreadable.
    """
    from services.backup.config import BackupConfigError, keyring_from_settings
    from services.backup.restores import foundry as domain

    settings = load()
    s3 = None
    if domain.is_s3(location):
        s3 = domain.S3Access(
            access_key_id=access_key_id or "",
            secret_access_key=_secret(location) if access_key_id else "",
            endpoint_url=endpoint_url,
            region=region,
            path_style=path_style,
            verify=str(settings.backup_s3_ca_bundle) if settings.backup_s3_ca_bundle else True,
        )
    try:
        keyring = keyring_from_settings(settings)
    except BackupConfigError as exc:
        raise error(str(exc)) from None
    try:
        store = domain.open_location(location, s3)
    except domain.FoundryRestoreError as exc:
        raise error(str(exc)) from None
    try:
        code = asyncio.run(_foundry(settings, store, keyring, backup, list_only, force))
    except KeyboardInterrupt:
        # The database is only replaced at the very end, atomically (SQLite: a rename;
        # PostgreSQL: one transaction): it is either the old one or the restored one.
        raise error(
            "interrupted: the database was replaced completely or not at all; run the "
            "restore again to be sure"
        ) from None
    if code:
        raise typer.Exit(code)


async def _foundry(
    settings: Settings,
    store: ObjectStore,
    ring: crypto.Keyring | None,
    backup: str | None,
    list_only: bool,
    force: bool,
) -> int:
    from services.backup.restores import foundry as domain

    try:
        manifests = await domain.foundry_backups(store)
        if list_only:
            if not manifests:
                say(f"No complete Foundry backups in {store.description}.")
                return 0
            default = None
            with contextlib.suppress(domain.FoundryRestoreError):
                default = domain.choose(manifests, None)
            say("Foundry DB backups there, newest first:")
            console.print(listing(BACKUP_COLUMNS, backup_rows(manifests, default)))
            return 0
        manifest = domain.choose(manifests, backup)
        database_url = settings.resolved_database_url
        held = await domain.preflight(
            manifest,
            database_url,
            ring,
            data_dir=settings.data_dir,
            api_url=settings.api_url,
            force=force,
        )
        say(
            "Restoring Foundry backup ",
            (domain.backup_id(manifest), "bold"),
            f" ({manifest.kind}, {size(manifest.plaintext_size)}) from {store.description}",
        )
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task("download + verify", total=manifest.plaintext_size)
            await domain.restore(
                store,
                manifest,
                database_url,
                ring,
                scratch_dir=settings.data_dir,
                pg_bin_dir=settings.backup_pg_bin_dir,
                replace=bool(held),
                progress=lambda count: progress.advance(task, count),
            )
            progress.update(task, description="restored")
    except domain.FoundryRestoreError as exc:
        error(str(exc))
        return 1
    finally:
        await store.close()
    if remark := await _record_restored(database_url, manifest):
        note(("note:", "yellow"), " ", Text(remark))
    say(
        ("Foundry DB restored", "green"),
        f" from {domain.backup_id(manifest)} into {_where(database_url)}. "
        "Start Nest with `nest up`.",
    )
    return 0


async def _record_restored(database_url: str, manifest: Manifest) -> str | None:
    """The dump was taken while its own backup ran, so the restored database shows that backup
    `Running` (or not at all): record its completion from the manifest, as the API's projector
    would have. Returns a note if that was not possible (the restore itself stands)."""
    from sqlalchemy.exc import SQLAlchemyError

    from libs.common.contract.backup import BackupCompleted
    from services.api.backups import service as backups
    from services.api.kit.db import create_engine, session_factory

    event = BackupCompleted(
        target=manifest.target,
        kind="foundry",
        backup=str(manifest.ref),
        completed_at=manifest.completed_at,
        started_at=manifest.created_at,
        stored_bytes=manifest.stored_size,
        plaintext_bytes=manifest.plaintext_size,
        stored_sha256=manifest.stored_sha256,
        plaintext_sha256=manifest.plaintext_sha256,
        encrypted=manifest.encrypted,
        encryption_key_id=manifest.encryption.key_id if manifest.encryption else None,
        verified=manifest.verified_at is not None,
    )
    engine = create_engine(database_url)
    try:
        async with session_factory(engine)() as session:
            await backups.apply_completed(session, event)
            await session.commit()
    except SQLAlchemyError as exc:
        return f"the backup list was not updated ({type(exc).__name__}); the restore stands"
    finally:
        await engine.dispose()
    return None


def _where(database_url: str) -> str:
    from services.backup.snapshots.database import PostgresTarget, sqlite_path

    path = sqlite_path(database_url)
    if path is not None:
        return str(path)
    target = PostgresTarget.from_url(database_url)
    return f"PostgreSQL database {target.database!r}"
