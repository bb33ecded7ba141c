"""Where a backup lives in a store: `<target>/<timestamp>-<id>/` holding the artifact and
`manifest.json` (the store adds its own prefix, e.g. the S3 key prefix).

Pure: names in, names out. Names sort chronologically, so a listing is already in time order.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

MANIFEST_NAME = "manifest.json"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
TARGET_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?$")
_NAME_PATTERN = re.compile(r"^(?P<ts>\d{8}T\d{6}Z)-(?P<id>[a-z0-9]{8,32})$")


def validate_target(target: str) -> str:
    """A target names what is backed up (`cluster-demo`, `foundry`): one lowercase path segment."""
    if not TARGET_PATTERN.match(target) or ".." in target:
        raise ValueError(
            f"backup target {target!r} must be 1-128 lowercase letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return target


@dataclass(frozen=True, order=True)
class BackupRef:
    """One backup's place in the store. Orders by target, then creation time."""

    target: str
    created: datetime
    backup_id: str

    @property
    def name(self) -> str:
        return f"{self.created.strftime(TIMESTAMP_FORMAT)}-{self.backup_id}"

    @property
    def prefix(self) -> str:
        """The backup's folder, ending in `/`."""
        return f"{self.target}/{self.name}/"

    @property
    def manifest_key(self) -> str:
        return self.prefix + MANIFEST_NAME

    def key(self, filename: str) -> str:
        return self.prefix + filename

    def __str__(self) -> str:
        return f"{self.target}/{self.name}"


def new_ref(target: str, now: datetime) -> BackupRef:
    """A fresh backup reference created at `now` (truncated to whole seconds, UTC)."""
    created = now.astimezone(UTC).replace(microsecond=0)
    return BackupRef(validate_target(target), created, secrets.token_hex(4))


def parse_name(target: str, name: str) -> BackupRef | None:
    """The reference for a backup folder name, or None if the name is not one of ours."""
    match = _NAME_PATTERN.match(name)
    if not match:
        return None
    try:
        created = datetime.strptime(match["ts"], TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None
    return BackupRef(target, created, match["id"])


def parse_key(key: str) -> tuple[BackupRef, str] | None:
    """(backup, file name) for an object key inside a backup folder; None for anything else."""
    parts = key.split("/")
    if len(parts) != 3 or not TARGET_PATTERN.match(parts[0]) or not parts[2]:
        return None
    ref = parse_name(parts[0], parts[1])
    return None if ref is None else (ref, parts[2])


def parse_ref(text: str) -> BackupRef:
    """Parse `<target>/<timestamp>-<id>` as printed by `str(ref)`; ValueError if malformed."""
    target, _, name = text.strip("/").partition("/")
    ref = parse_name(validate_target(target), name)
    if ref is None:
        raise ValueError(f"{text!r} is not a backup reference of the form <target>/<time>-<id>")
    return ref
