"""Every failure the backup domain reports: one exception type per kind a user can act on.

The transport layer (API problem+json, BackupFailed events) maps these once, by type; `reason`
is the stable machine-readable name used as a condition reason.
"""

from __future__ import annotations


class BackupError(Exception):
    """Base of every backup-domain failure."""

    reason = "BackupError"


# --- object stores -------------------------------------------------------------------------


class StoreError(BackupError):
    """The object store failed in a way not covered by a more specific type."""

    reason = "StoreError"


class EndpointForbidden(StoreError):
    """The S3 endpoint resolves to a link-local or cloud-metadata address (or is not http/s)."""

    reason = "EndpointForbidden"


class EndpointUnreachable(StoreError):
    """The S3 endpoint could not be reached (DNS, connection refused, timeout)."""

    reason = "EndpointUnreachable"


class EndpointUntrusted(StoreError):
    """The endpoint's TLS certificate is not trusted (give its CA: NEST_BACKUP_S3_CA_BUNDLE)."""

    reason = "EndpointUntrusted"


class BucketNotFound(StoreError):
    """The configured bucket does not exist."""

    reason = "BucketNotFound"


class CredentialsRejected(StoreError):
    """The store refused the access key or its signature."""

    reason = "CredentialsRejected"


class AccessDenied(StoreError):
    """The credentials are valid but not allowed to do this (bucket policy, IAM)."""

    reason = "AccessDenied"


class ObjectNotFound(StoreError):
    """No object under that key."""

    reason = "ObjectNotFound"


class ProbeMismatch(StoreError):
    """The probe object read back differs from what was written."""

    reason = "ProbeMismatch"


# --- encryption ----------------------------------------------------------------------------


class CryptoError(BackupError):
    """Encryption or decryption failed."""

    reason = "CryptoError"


class UnknownKey(CryptoError):
    """The artifact was encrypted with a key id that is not in the keyring."""

    reason = "UnknownKey"


class WrongKey(CryptoError):
    """The keyring holds a key under that id, but it is not the key the artifact was made with."""

    reason = "WrongKey"


class CiphertextCorrupt(CryptoError):
    """The encrypted stream was altered, truncated, reordered or is not a Nest artifact."""

    reason = "CiphertextCorrupt"


# --- artifacts -----------------------------------------------------------------------------


class ManifestMissing(BackupError):
    """The backup has no manifest: it is incomplete (an upload died) and must not be restored."""

    reason = "ManifestMissing"


class ManifestInvalid(BackupError):
    """The manifest is not valid JSON of the expected shape."""

    reason = "ManifestInvalid"


class IntegrityError(BackupError):
    """The stored bytes or the decrypted plaintext do not match the manifest's size or sha256."""

    reason = "IntegrityError"


# --- sources -------------------------------------------------------------------------------


class SnapshotError(BackupError):
    """etcd refused or broke off the snapshot stream."""

    reason = "SnapshotError"


class EtcdAccessUnavailable(SnapshotError):
    """No client access to the cluster's etcd could be obtained (unknown cluster, no CA yet,
    provisioner not answering)."""

    reason = "EtcdAccessUnavailable"


class SnapshotCorrupt(SnapshotError):
    """The snapshot's own sha256 trailer does not match its contents (or it is too short)."""

    reason = "SnapshotCorrupt"


class RestoreError(BackupError):
    """A restore step (etcdutl, pg_restore, the scratch etcd) failed."""

    reason = "RestoreError"


class RestoreRefused(BackupError):
    """A cluster restore must not go on; `reason` says why (SnapshotOlder, InvalidBackup, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class DrillCheckFailed(BackupError):
    """A restore drill's check failed; `reason` is the DrillFailed reason (RevisionMismatch,
    AlembicVersionMissing, NoScratchDatabase, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class DumpError(BackupError):
    """pg_dump or the SQLite backup failed."""

    reason = "DumpError"


class ToolMissing(BackupError):
    """An external program (etcdutl, pg_dump, pg_restore) is not installed."""

    reason = "ToolMissing"


# --- policies and locations ----------------------------------------------------------------


class PolicyNotFound(BackupError):
    """The run names a backup policy the backup service does not know (or it was deleted)."""

    reason = "PolicyNotFound"


class LocationNotFound(BackupError):
    """The run (or its policy) names a backup location the backup service does not know."""

    reason = "LocationNotFound"


class SecretUnreadable(BackupError):
    """A location's sealed secret does not open: NEST_SECRETS_KEY (or secrets.key) differs
    from the API's."""

    reason = "SecretUnreadable"


class EncryptionKeyMissing(BackupError):
    """The policy asks for encryption but NEST_BACKUP_ENCRYPTION_KEYS is not set."""

    reason = "EncryptionKeyMissing"
