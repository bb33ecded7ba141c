"""The backup service's view of the settings: which store, which keys, which retention.

Every problem is reported as a `BackupConfigError` naming the NEST_ variable to fix.
"""

from __future__ import annotations

import json
from datetime import timedelta

from libs.common.cron import CronError, CronSchedule
from libs.common.settings import Settings
from services.backup.snapshots.retention import RetentionPolicy
from services.backup.stores import crypto
from services.backup.stores.local import LocalStore
from services.backup.stores.objects import ObjectStore
from services.backup.stores.s3 import S3Config, S3Store


class BackupConfigError(ValueError):
    """A backup setting is missing or wrong; the message names the environment variable."""


def store_from_settings(settings: Settings) -> ObjectStore:
    """S3 when NEST_BACKUP_S3_BUCKET is set, else the local directory store."""
    if not settings.backup_s3_bucket:
        return LocalStore(settings.backup_dir or settings.data_dir / "backups")
    if not settings.backup_s3_access_key_id or not settings.backup_s3_secret_access_key:
        raise BackupConfigError(
            "NEST_BACKUP_S3_ACCESS_KEY_ID and NEST_BACKUP_S3_SECRET_ACCESS_KEY must be set "
            "when NEST_BACKUP_S3_BUCKET is"
        )
    try:
        config = S3Config.model_validate(
            {
                "endpoint_url": settings.backup_s3_endpoint,
                "bucket": settings.backup_s3_bucket,
                "prefix": settings.backup_s3_prefix,
                "region": settings.backup_s3_region,
                "access_key_id": settings.backup_s3_access_key_id,
                "secret_access_key": settings.backup_s3_secret_access_key,
                "path_style": settings.backup_s3_path_style,
                "verify": str(settings.backup_s3_ca_bundle)
                if settings.backup_s3_ca_bundle
                else True,
            }
        )
    except ValueError as exc:
        raise BackupConfigError(f"NEST_BACKUP_S3_*: {exc}") from None
    return S3Store(config)


def keyring_from_settings(settings: Settings) -> crypto.Keyring | None:
    """The encryption keyring, or None when NEST_BACKUP_ENCRYPTION_KEYS is unset."""
    if not settings.backup_encryption_keys:
        if settings.backup_encryption_active_key:
            raise BackupConfigError(
                "NEST_BACKUP_ENCRYPTION_ACTIVE_KEY is set but NEST_BACKUP_ENCRYPTION_KEYS is not"
            )
        return None
    try:
        encoded = json.loads(settings.backup_encryption_keys)
    except ValueError:
        raise BackupConfigError(
            'NEST_BACKUP_ENCRYPTION_KEYS must be a JSON object {"<key id>": "<base64 key>"}'
        ) from None
    if not isinstance(encoded, dict) or not encoded:
        raise BackupConfigError("NEST_BACKUP_ENCRYPTION_KEYS must be a non-empty JSON object")
    if not all(isinstance(v, str) for v in encoded.values()):
        raise BackupConfigError("NEST_BACKUP_ENCRYPTION_KEYS: every key must be a string")
    active = settings.backup_encryption_active_key
    if active is None:
        if len(encoded) != 1:
            raise BackupConfigError(
                "NEST_BACKUP_ENCRYPTION_ACTIVE_KEY must name the key for new backups "
                "when NEST_BACKUP_ENCRYPTION_KEYS holds more than one"
            )
        active = next(iter(encoded))
    try:
        return crypto.Keyring.from_encoded(encoded, active)
    except ValueError as exc:
        raise BackupConfigError(f"NEST_BACKUP_ENCRYPTION_KEYS: {exc}") from None


def retention_from_settings(settings: Settings) -> RetentionPolicy:
    return RetentionPolicy(keep_last=settings.backup_keep_last, keep_days=settings.backup_keep_days)


def foundry_schedule(settings: Settings) -> CronSchedule:
    try:
        return CronSchedule.parse(settings.backup_foundry_schedule)
    except CronError as exc:
        raise BackupConfigError(f"NEST_BACKUP_FOUNDRY_SCHEDULE: {exc}") from None


def incomplete_grace(settings: Settings) -> timedelta:
    return timedelta(hours=settings.backup_incomplete_grace_hours)
