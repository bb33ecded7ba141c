"""Foundry DB dumps: PostgreSQL through pg_dump, SQLite through its online backup API.

- PostgreSQL: `pg_dump --format=custom` runs as a subprocess and its stdout is streamed on as it
  comes (no temp file of the whole dump).
- SQLite: `sqlite3.Connection.backup` copies a consistent snapshot of a live database into a
  temp file (SQLite offers no streaming backup), which is then streamed and removed.

A password in the PostgreSQL URL is handed to the tools through PGPASSWORD, never on the command
line where `ps` would show it. Restoring a dump is `restores.database`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from services.backup import errors
from services.backup.stores.manifest import DatabaseDetails

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class PostgresTarget:
    """A libpq URL without the password, and the password on its own (never shown)."""

    url: str
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> PostgresTarget:
        """Accept `postgresql://`, `postgres://` and SQLAlchemy's `postgresql+asyncpg://`."""
        parts = urlsplit(url)
        scheme = parts.scheme.split("+", 1)[0]
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(f"not a PostgreSQL URL (scheme {parts.scheme!r})")
        password = unquote(parts.password) if parts.password is not None else None
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        clean = urlunsplit(("postgresql", netloc, parts.path, parts.query, ""))
        return cls(clean, password)

    @property
    def database(self) -> str:
        return unquote(urlsplit(self.url).path.lstrip("/")) or "postgres"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        return env


def find_program(name: str, bin_dir: Path | None = None) -> str:
    if bin_dir is not None and (bin_dir / name).is_file():
        return str(bin_dir / name)
    found = shutil.which(name)
    if found is None:
        raise errors.ToolMissing(
            f"{name} not found (install postgresql-client, or set NEST_BACKUP_PG_BIN_DIR)"
        )
    return found


def kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


class PostgresDump:
    """One `pg_dump --format=custom` run. Iterate `chunks()` to the end, then read `details()`."""

    def __init__(self, target: PostgresTarget, *, bin_dir: Path | None = None) -> None:
        self.target = target
        self.bin_dir = bin_dir
        self.size = 0
        self._version: str | None = None
        self._finished = False

    async def chunks(self) -> AsyncIterator[bytes]:
        program = find_program("pg_dump", self.bin_dir)
        self._version = (await _output([program, "--version"])).strip() or None
        process = await asyncio.create_subprocess_exec(
            program,
            "--format=custom",
            "--no-password",
            f"--dbname={self.target.url}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env=self.target.environment(),
            start_new_session=True,
            limit=READ_CHUNK,
        )
        assert process.stdout is not None
        assert process.stderr is not None
        stderr = asyncio.create_task(process.stderr.read())
        try:
            while chunk := await process.stdout.read(READ_CHUNK):
                self.size += len(chunk)
                yield chunk
            code = await process.wait()
            message = (await stderr).decode(errors="replace").strip()
        except BaseException:
            kill(process)
            stderr.cancel()
            await process.wait()
            raise
        if code != 0:
            last = message.splitlines()[-1] if message else f"exit status {code}"
            raise errors.DumpError(f"pg_dump of {self.target.database!r} failed: {last}")
        self._finished = True

    def details(self) -> dict[str, Any]:
        if not self._finished:
            raise errors.DumpError("dump details requested before pg_dump finished")
        return {
            "database": DatabaseDetails(
                engine="postgres", server_version=self._version, database=self.target.database
            )
        }


async def _output(command: list[str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    return out.decode(errors="replace")


# --- SQLite --------------------------------------------------------------------------------


def _sqlite_copy(source: Path, destination: Path) -> None:
    # Read-only URI: the backup never creates or changes the live database.
    live = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    try:
        copy = sqlite3.connect(destination)
        try:
            live.backup(copy, pages=4096)
        finally:
            copy.close()
    except sqlite3.Error as exc:
        raise errors.DumpError(f"SQLite backup of {source} failed: {exc}") from None
    finally:
        live.close()


class SqliteSnapshot:
    """A consistent copy of a live SQLite database, streamed from a temp file then removed."""

    def __init__(self, path: Path, *, scratch_dir: Path | None = None) -> None:
        self.path = path
        self.scratch_dir = scratch_dir
        self.size = 0
        self._finished = False

    async def chunks(self) -> AsyncIterator[bytes]:
        if not await asyncio.to_thread(self.path.is_file):
            raise errors.DumpError(f"SQLite database {self.path} does not exist")
        if self.scratch_dir is not None:
            await asyncio.to_thread(self.scratch_dir.mkdir, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="nest-sqlite-", dir=self.scratch_dir) as directory:
            copy = Path(directory) / "foundry.sqlite3"
            await asyncio.to_thread(_sqlite_copy, self.path, copy)
            handle = await asyncio.to_thread(copy.open, "rb")
            try:
                while chunk := await asyncio.to_thread(handle.read, READ_CHUNK):
                    self.size += len(chunk)
                    yield chunk
            finally:
                handle.close()
        self._finished = True

    def details(self) -> dict[str, Any]:
        if not self._finished:
            raise errors.DumpError("SQLite details requested before the copy was streamed")
        return {
            "database": DatabaseDetails(
                engine="sqlite", server_version=sqlite3.sqlite_version, database=self.path.name
            )
        }


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite://` / `sqlite+aiosqlite://` URL, or None for other URLs."""
    scheme, _, rest = url.partition("://")
    if scheme.split("+", 1)[0] != "sqlite":
        return None
    path = rest[1:] if rest.startswith("/") else rest
    return Path(path.split("?", 1)[0])
