"""Restoring a Foundry DB backup from a verified local file: PostgreSQL with `pg_restore
--single-transaction` (all or nothing), SQLite by checking the file (`PRAGMA integrity_check`)
and atomically replacing the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

from services.backup import errors
from services.backup.snapshots.database import PostgresTarget, find_program, kill


async def restore_postgres(
    dump: Path,
    target: PostgresTarget,
    *,
    clean: bool = False,
    bin_dir: Path | None = None,
    timeout: float = 3600.0,
) -> None:
    """`pg_restore` a custom-format dump into `target` in one transaction (all or nothing).

    `clean` drops the dump's objects first (for restoring over an existing Foundry DB)."""
    program = find_program("pg_restore", bin_dir)
    command = [
        program,
        "--no-password",
        "--single-transaction",
        "--exit-on-error",
        "--no-owner",
        f"--dbname={target.url}",
        *(["--clean", "--if-exists"] if clean else []),
        str(dump),
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=target.environment(),
        start_new_session=True,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout)
    except BaseException:
        kill(process)
        await process.wait()
        raise
    if process.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        detail = next(
            (line for line in lines if "error" in line.lower()), lines[-1] if lines else ""
        )
        raise errors.RestoreError(f"pg_restore into {target.database!r} failed: {detail}")


def _check_and_replace(source: Path, destination: Path) -> None:
    try:
        connection = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        try:
            result = connection.execute("PRAGMA integrity_check").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise errors.RestoreError(f"restored file is not a SQLite database: {exc}") from None
    if not result or result[0] != "ok":
        raise errors.RestoreError(f"restored SQLite database fails integrity_check: {result}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = destination.with_name(f".{destination.name}.restoring")
    shutil.copyfile(source, temp)
    with temp.open("rb+") as handle:
        os.fsync(handle.fileno())
    # Stale WAL/SHM files of the old database would be replayed onto the restored one.
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            destination.with_name(destination.name + suffix).unlink()
    os.replace(temp, destination)


async def restore_sqlite(snapshot: Path, destination: Path) -> None:
    """Check a downloaded SQLite snapshot and atomically put it at `destination`.
    Nothing may have the destination database open (stop the API first)."""
    await asyncio.to_thread(_check_and_replace, snapshot, destination)
