"""The manifest: what a backup holds and how to check it. Written last; its presence is what makes
a backup complete.

JSON names are camelCase, like every other Nest document. Fields are only ever added.
"""

from __future__ import annotations

from datetime import datetime
from importlib import metadata
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError

from libs.common.contract.base import WireModel
from services.backup import errors
from services.backup.stores.layout import BackupRef, parse_name

FORMAT_VERSION = 1
ENCRYPTION_ALGORITHM = "AES-256-GCM-STREAM-1MiB-v1"

Kind = Literal["etcd", "postgres", "sqlite"]


def nest_version() -> str:
    try:
        return metadata.version("nest")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


class Encryption(WireModel):
    """How the stored bytes were encrypted (`services.backup.crypto`)."""

    algorithm: str = ENCRYPTION_ALGORITHM
    key_id: str
    chunk_size: int


class EtcdDetails(WireModel):
    """What the etcd snapshot contained."""

    revision: int
    """The store revision when the snapshot started."""
    revision_exact: bool
    """True when the revision did not move during the snapshot, i.e. `revision` is exact."""
    key_count: int
    """Live keys at `revision`."""
    etcd_version: str | None = None
    snapshot_sha256: str
    """etcd's own sha256 trailer (of the snapshot without its last 32 bytes), verified."""


class DatabaseDetails(WireModel):
    """What the Foundry DB dump contained."""

    engine: Literal["postgres", "sqlite"]
    server_version: str | None = None
    database: str | None = None


class Manifest(WireModel):
    """Everything needed to trust, find and restore one backup.

    Unknown fields are ignored, not refused: a manifest written by a newer Nest (fields are
    only ever added) must stay readable by an older replica during a rolling upgrade."""

    model_config = ConfigDict(extra="ignore")

    format_version: int = FORMAT_VERSION
    target: str
    backup_id: str
    kind: Kind
    created_at: datetime
    completed_at: datetime
    nest_version: str = Field(default_factory=nest_version)
    kubernetes_version: str | None = None
    artifact: str
    """File name of the artifact inside the backup folder."""
    stored_size: int
    stored_sha256: str
    """sha256 of the bytes as stored (after encryption)."""
    plaintext_size: int
    plaintext_sha256: str
    """sha256 of the artifact before encryption (= stored when not encrypted)."""
    encryption: Encryption | None = None
    verified_at: datetime | None = None
    """When the stored artifact was read back and matched; None if upload verification was off."""
    etcd: EtcdDetails | None = None
    database: DatabaseDetails | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def ref(self) -> BackupRef:
        ref = parse_name(
            self.target, f"{self.created_at.strftime('%Y%m%dT%H%M%SZ')}-{self.backup_id}"
        )
        if ref is None:
            raise errors.ManifestInvalid(f"manifest names an invalid backup {self.backup_id!r}")
        return ref

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "?"
            raise errors.ManifestInvalid(
                f"manifest {where} is invalid: {field}: {first['msg']}"
            ) from None
