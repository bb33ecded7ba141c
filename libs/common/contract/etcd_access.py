"""Request/reply: short-lived client access to a cluster's etcd (for backups), from the provisioner.

Subject `nest.rpc.provisioner.etcd_client` (core NATS request/reply, `Bus.request`; nothing is
stored in a stream). The request body is `EtcdClientRequest`, the result `EtcdClientIssued`: the
client URL the backup service can reach, the cluster's etcd CA, and a client certificate and key
signed by that CA for `ttl_seconds` (an hour by default, enough for a snapshot). Failures come
back as `RpcError` kinds: `not-found` (no such cluster or no etcd CA yet), `invalid`,
`unavailable` (etcd not running yet, management cluster not answering).

The provisioner answers it (it owns the PKI: `pki.issue_etcd_client`); the backup service is
its client (`services.backup.snapshots.access`).
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from libs.common.contract.base import WireModel
from libs.common.contract.rpc import RpcMethod

ETCD_CLIENT_RPC_SUBJECT = "nest.rpc.provisioner.etcd_client"


class EtcdClientRequest(WireModel):
    """Ask for client access to the etcd of cluster `cluster_id` on behalf of `requester`."""

    cluster_id: str = Field(min_length=1)
    requester: str = Field(min_length=1, max_length=53)
    ttl_seconds: int = Field(default=3600, ge=60, le=24 * 3600)


class EtcdClientIssued(WireModel):
    """Everything needed to open a mutual-TLS connection to the cluster's etcd."""

    url: str
    """An etcd client URL (https) reachable from the backup service."""
    ca_pem: str
    cert_pem: str
    key_pem: str = Field(repr=False)
    expires_at: datetime


ETCD_CLIENT_RPC: RpcMethod[EtcdClientRequest, EtcdClientIssued] = RpcMethod(
    ETCD_CLIENT_RPC_SUBJECT,
    EtcdClientRequest,
    EtcdClientIssued,
    "Short-lived mutual-TLS client access to a cluster's etcd.",
)
