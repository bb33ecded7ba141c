"""Settings -> store, keyring, retention, schedule; every error names the variable to fix."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from libs.common.settings import Settings
from services.backup.config import (
    BackupConfigError,
    foundry_schedule,
    keyring_from_settings,
    retention_from_settings,
    store_from_settings,
)
from services.backup.snapshots.database import sqlite_path
from services.backup.stores import crypto
from services.backup.stores.local import LocalStore
from services.backup.stores.s3 import S3Store


def test_local_store_by_default(tmp_path: Path) -> None:
    store = store_from_settings(Settings(data_dir=tmp_path))
    assert isinstance(store, LocalStore)
    assert store.root == tmp_path / "backups"


def test_s3_store_when_a_bucket_is_set(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        backup_s3_bucket="nest-backups",
        backup_s3_endpoint="https://s3.example.com",
        backup_s3_access_key_id="AKIAEXAMPLE",
        backup_s3_secret_access_key="very-secret",
    )
    store = store_from_settings(settings)
    assert isinstance(store, S3Store)
    assert "very-secret" not in repr(store) + repr(settings)
    with pytest.raises(BackupConfigError, match="NEST_BACKUP_S3_ACCESS_KEY_ID"):
        store_from_settings(Settings(data_dir=tmp_path, backup_s3_bucket="nest-backups"))


def test_keyring_from_settings() -> None:
    first, second = crypto.generate_key(), secrets.token_bytes(32).hex()
    assert keyring_from_settings(Settings()) is None
    single = keyring_from_settings(Settings(backup_encryption_keys=json.dumps({"k1": first})))
    assert single is not None
    assert single.active == "k1"
    both = json.dumps({"k1": first, "k2": second})
    with pytest.raises(BackupConfigError, match="NEST_BACKUP_ENCRYPTION_ACTIVE_KEY"):
        keyring_from_settings(Settings(backup_encryption_keys=both))
    ring = keyring_from_settings(
        Settings(backup_encryption_keys=both, backup_encryption_active_key="k2")
    )
    assert ring is not None
    assert ring.active == "k2"
    assert set(ring.keys) == {"k1", "k2"}
    for bad in ("not json", "[]", json.dumps({"k": "short"})):
        with pytest.raises(BackupConfigError, match="NEST_BACKUP_ENCRYPTION_KEYS"):
            keyring_from_settings(Settings(backup_encryption_keys=bad))


def test_retention_and_schedule() -> None:
    policy = retention_from_settings(Settings(backup_keep_last=3, backup_keep_days=None))
    assert (policy.keep_last, policy.keep_days) == (3, None)
    assert foundry_schedule(Settings()).expression == "0 * * * *"
    with pytest.raises(BackupConfigError, match=r"NEST_BACKUP_FOUNDRY_SCHEDULE.*hour field"):
        foundry_schedule(Settings(backup_foundry_schedule="0 25 * * *"))


def test_sqlite_path_from_database_urls() -> None:
    assert sqlite_path("sqlite+aiosqlite:////var/lib/nest/nest.db") == Path("/var/lib/nest/nest.db")
    assert sqlite_path("sqlite:///nest.db") == Path("nest.db")
    assert sqlite_path("postgresql+asyncpg://db/nest") is None
