"""The Foundry DB: the engine, migrations, and the unit of work every request and loop uses.

Why not one async ORM session per request: through SQLAlchemy's async layer every statement
is several hops to the driver's thread (aiosqlite) and a session ends with a ROLLBACK, so a
read cost five thread round trips and ~1 ms of CPU. A `Session` here is a unit of work that:

- reads on the driver directly (one round trip per query; on SQLite on a read-only connection
  of its own, so reads never queue behind a write and never see an uncommitted one);
- writes in one transaction on the pooled connection (`BEGIN IMMEDIATE` on SQLite), with
  everything that must commit with the change (outbox rows, the audit row, history rows) added
  by `before_commit` hooks, so a request costs one fsync'd commit;
- hands work that must follow the commit (waking the outbox relay, the SSE broadcaster) to
  `after_commit` callbacks: run after COMMIT, dropped on rollback;
- still offers the ORM (`await session.orm()`) on the same connection and transaction, for
  the admin resources where it pays in clarity and costs nothing that matters.

SQL text uses `:name` parameters; `sql()` rewrites it to `$n` for asyncpg once per statement.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=30000",
)

_PING = text("SELECT 1")
Row = tuple[Any, ...]
Hook = Callable[["Session"], Awaitable[None]]


class IntegrityError(Exception):
    """A write broke a constraint (a unique name, a foreign key): the caller maps it to 409."""


_INTEGRITY_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.IntegrityError,
    asyncpg.IntegrityConstraintViolationError,
    SAIntegrityError,
)


def create_engine(url: str) -> AsyncEngine:
    """An engine tuned per backend: SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        # One connection: SQLite allows one writer at a time, and waiting for the pooled
        # connection in asyncio is far cheaper than SQLite's sleeping busy handler. Nothing
        # is left open on return (the Session ends every transaction), so no reset ROLLBACK.
        engine = create_async_engine(
            url,
            connect_args={"timeout": 30},
            pool_size=1,
            max_overflow=0,
            pool_timeout=60,
            pool_reset_on_return=None,
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
            cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
            for pragma in SQLITE_PRAGMAS:
                cursor.execute(pragma)
            cursor.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=20, pool_recycle=1800)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Plain ORM sessions on the engine (migrations, tests, one-off tools)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (idempotent; run at every start)."""
    if engine.url.get_backend_name() == "sqlite" and engine.url.database:
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class Sql:
    """A statement with `:name` parameters, prepared once for both drivers."""

    __slots__ = ("names", "numbered", "text")

    def __init__(self, text: str) -> None:
        self.text = " ".join(text.split())
        self.names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.names:
                self.names.append(name)
            return f"${self.names.index(name) + 1}"

        self.numbered = _NAMED.sub(number, self.text)


def sql(text: str) -> Sql:
    return Sql(text)


class Database:
    """The Foundry DB of one process: engine, read connection, hooks every unit of work runs."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.dialect = self.engine.dialect.name
        self.sqlite = self.dialect == "sqlite"
        self.orm_sessions = session_factory(self.engine)
        self.before_commit: list[Hook] = []
        """Run inside every writing unit of work right before COMMIT (e.g. the outbox)."""
        self._reader: aiosqlite.Connection | None = None

    async def migrate(self) -> None:
        await migrate(self.engine)

    async def dispose(self) -> None:
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        await self.engine.dispose()

    def session(self) -> Session:
        return Session(self)

    async def reader(self) -> aiosqlite.Connection | None:
        """SQLite: a read-only connection of its own (WAL readers never wait for the writer)."""
        if not self.sqlite or not self.engine.url.database:
            return None
        if self._reader is None:
            reader = await aiosqlite.connect(self.engine.url.database, timeout=30)
            for pragma in (*SQLITE_PRAGMAS[2:], "PRAGMA query_only=ON"):
                await reader.execute(pragma)
            self._reader = reader
        return self._reader

    # Values as each driver stores them.

    def stamp(self, moment: datetime) -> Any:
        """A timestamp as a parameter: aware on PostgreSQL, SQLAlchemy's UTC text on SQLite."""
        moment = moment.astimezone(UTC)
        if self.sqlite:
            return moment.strftime("%Y-%m-%d %H:%M:%S.%f")
        return moment

    @staticmethod
    def moment(value: Any) -> datetime:
        """A stored timestamp read back, timezone-aware (SQLite drops the zone)."""
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]

    @staticmethod
    def moment_or_none(value: Any) -> datetime | None:
        return None if value is None else Database.moment(value)

    @staticmethod
    def dumps(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"))

    @staticmethod
    def loads(value: Any) -> Any:
        """A JSON column read back (text on SQLite, already decoded on PostgreSQL)."""
        return json.loads(value) if isinstance(value, str | bytes) else value


class Session:
    """One unit of work: reads, at most one write transaction, hooks around its commit.

    Use as `async with db.session() as session:`; leaving without `commit()` rolls back.
    In a request, the unit-of-work middleware commits it once the endpoint has answered.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: AsyncConnection | None = None
        self._driver: Any = None
        self._pg_tx: Any = None
        self._orm: AsyncSession | None = None
        self.writing = False
        self._tx_open = False
        self._before: list[Hook] = []
        self._deferred: list[tuple[Sql, dict[str, Any]]] = []
        self._after: list[Callable[[], None]] = []
        self.staged: list[tuple[str, Any]] = []
        """(NATS subject, envelope) to add to the outbox at commit (see kit.outbox.stage)."""
        self.state: dict[str, Any] = {}
        """Per-unit-of-work scratch space for hooks (e.g. the audit target of a request)."""

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Connections

    async def _writer(self) -> Any:
        if self._driver is None:
            self._conn = await self.db.engine.connect()
            raw = await self._conn.get_raw_connection()
            self._driver = raw.driver_connection
        return self._driver

    async def _begin(self) -> Any:
        driver = await self._writer()
        if self._tx_open:
            return driver
        if self._orm is not None:
            # The ORM owns the transaction; make sure it has begun on the connection
            # (asyncpg's BEGIN goes with the first statement) before a lean write joins it.
            await self._orm.connection()
            if not self.db.sqlite:
                await self._orm.execute(_PING)
        elif self.db.sqlite:
            await driver.execute("BEGIN IMMEDIATE")
        else:
            self._pg_tx = driver.transaction()
            await self._pg_tx.start()
        self.writing = True
        self._tx_open = True
        return driver

    async def orm(self) -> AsyncSession:
        """An ORM session on this unit of work's connection and transaction."""
        if self._orm is None:
            if self.writing:
                raise RuntimeError("call orm() before the first lean write of a unit of work")
            await self._writer()
            assert self._conn is not None
            self._orm = AsyncSession(bind=self._conn, expire_on_commit=False, autoflush=True)
        self.writing = True
        return self._orm

    # Queries

    async def fetch(self, statement: Sql, params: dict[str, Any] | None = None) -> list[Row]:
        """Every row; on the read connection unless this unit of work is writing."""
        params = params or {}
        try:
            if self.db.sqlite:
                reader = None if self.writing else await self.db.reader()
                target = reader or await self._writer()
                if self._orm is not None:
                    await self._orm.flush()
                rows = await target.execute_fetchall(statement.text, params)
                return [tuple(row) for row in rows]
            if self._orm is not None:
                await self._orm.flush()
            driver = await self._writer()
            records = await driver.fetch(statement.numbered, *(params[n] for n in statement.names))
            return [tuple(record) for record in records]
        except _INTEGRITY_ERRORS as exc:
            raise IntegrityError(str(exc)) from exc

    async def fetchrow(self, statement: Sql, params: dict[str, Any] | None = None) -> Row | None:
        rows = await self.fetch(statement, params)
        return rows[0] if rows else None

    async def fetchval(self, statement: Sql, params: dict[str, Any] | None = None) -> Any:
        row = await self.fetchrow(statement, params)
        return None if row is None else row[0]

    def _lean_sqlite(self) -> bool:
        return self.db.sqlite and self._orm is None

    async def _in_thread(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """SQLite: run `work(connection)` on the driver's thread in ONE round trip (aiosqlite's
        queue, as SQLAlchemy's own adapter uses it), opening the transaction first if needed."""
        driver = await self._writer()
        opening = not self._tx_open

        def run() -> Any:
            conn: sqlite3.Connection = driver._conn
            if opening:
                conn.execute("BEGIN IMMEDIATE")
            return work(conn)

        try:
            result = await driver._execute(run)
        except _INTEGRITY_ERRORS as exc:
            raise IntegrityError(str(exc)) from exc
        finally:
            if opening and driver._conn.in_transaction:
                self.writing = self._tx_open = True
        return result

    def defer(self, statement: Sql, params: dict[str, Any]) -> None:
        """A write whose result nobody needs: sent with the COMMIT (SQLite: in its round trip)."""
        self._deferred.append((statement, params))

    async def execute(self, statement: Sql, params: dict[str, Any] | None = None) -> int:
        """Run a write in this unit of work's transaction; returns the rows it changed."""
        params = params or {}
        if self._lean_sqlite():
            bound = params

            def one(conn: sqlite3.Connection) -> int:
                return int(conn.execute(statement.text, bound).rowcount)

            return int(await self._in_thread(one))
        driver = await self._begin()
        try:
            if self._orm is not None:
                await self._orm.flush()
            if self.db.sqlite:
                cursor = await driver.execute(statement.text, params)
                count = cursor.rowcount
                await cursor.close()
                return int(count)
            status: str = await driver.execute(
                statement.numbered, *(params[n] for n in statement.names)
            )
            tail = status.rsplit(" ", 1)[-1]
            return int(tail) if tail.isdigit() else 0
        except _INTEGRITY_ERRORS as exc:
            raise IntegrityError(str(exc)) from exc

    async def returning(self, statement: Sql, params: dict[str, Any] | None = None) -> list[Row]:
        """A write with RETURNING: its rows."""
        if self._lean_sqlite():
            bound = params or {}

            def rows(conn: sqlite3.Connection) -> list[Row]:
                return [tuple(r) for r in conn.execute(statement.text, bound).fetchall()]

            result: list[Row] = await self._in_thread(rows)
            return result
        await self._begin()
        return await self.fetch(statement, params)

    async def lock(self) -> None:
        """Open the write transaction now (SQLite: take the write lock before reading)."""
        await self._begin()

    # Commit and hand-off

    def before_commit(self, hook: Hook) -> None:
        """Run `hook(session)` inside the transaction, right before COMMIT."""
        self._before.append(hook)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once the transaction has committed (dropped on rollback)."""
        if callback not in self._after:
            self._after.append(callback)

    @property
    def pending(self) -> bool:
        """Whether committing would write anything."""
        return self.writing or bool(self.staged) or bool(self._before) or bool(self._deferred)

    async def commit(self) -> None:
        """Run the hooks, COMMIT, then the after-commit callbacks. Nothing to write: no-op."""
        hooks = [*self._before, *self.db.before_commit] if self.pending else []
        self._before = []
        for hook in hooks:
            await hook(self)
        deferred, self._deferred = self._deferred, []
        if deferred and self._lean_sqlite():

            def flush_and_commit(conn: sqlite3.Connection) -> None:
                for statement, params in deferred:
                    conn.execute(statement.text, params)
                conn.commit()

            try:
                await self._in_thread(flush_and_commit)
            except IntegrityError:
                await self.rollback()
                raise
            self.writing = self._tx_open = False
        else:
            for statement, params in deferred:
                await self.execute(statement, params)
        if self.writing:
            try:
                if self._orm is not None:
                    await self._orm.commit()
                elif self.db.sqlite:
                    await self._driver.commit()
                else:
                    await self._pg_tx.commit()
                    self._pg_tx = None
            except _INTEGRITY_ERRORS as exc:
                await self.rollback()
                raise IntegrityError(str(exc)) from exc
            self.writing = False
            self._tx_open = False
        callbacks, self._after = self._after, []
        self.staged = []
        for callback in callbacks:
            callback()

    async def rollback(self) -> None:
        """Undo the transaction; staged work and after-commit callbacks are dropped."""
        self._before, self._after, self.staged = [], [], []
        self._deferred = []
        if not self.writing:
            return
        self.writing = False
        self._tx_open = False
        try:
            if self._orm is not None:
                await self._orm.rollback()
            elif self.db.sqlite:
                await self._driver.rollback()
            elif self._pg_tx is not None:
                await self._pg_tx.rollback()
        finally:
            self._pg_tx = None

    async def close(self) -> None:
        """Roll back anything uncommitted and give the connection back."""
        try:
            await self.rollback()
        finally:
            if self._orm is not None:
                await self._orm.close()
                self._orm = None
            if self._conn is not None:
                conn, self._conn, self._driver = self._conn, None, None
                await conn.close()


async def run_in_transaction(
    db: Database, work: Callable[[Session], Awaitable[Any]], *, attempts: int = 1
) -> Any:
    """`work(session)` in its own unit of work, committed; retried on IntegrityError."""
    for attempt in range(attempts):
        async with db.session() as session:
            try:
                result = await work(session)
                await session.commit()
            except IntegrityError:
                if attempt == attempts - 1:
                    raise
                continue
            return result
    return None


def rows_to_dicts(names: Sequence[str], rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [dict(zip(names, row, strict=True)) for row in rows]
