"""Request/reply: a short-lived admin kubeconfig for a cluster, signed by the provisioner.

Subject `nest.rpc.provisioner.kubeconfig` (core NATS request/reply, `Bus.request`). The
request body is `KubeconfigRequest`, the result `KubeconfigIssued`; failures come back as
`RpcError` kinds:

- `not-found`: no such cluster (unknown, deleted, or its CA does not exist yet);
- `invalid`: a bad request (ttlSeconds outside 1 s-24 h, an unprintable requester, ...);
- `unavailable`: the cluster has no endpoint yet, or the management cluster does not answer.

The certificate is `nest:admin:<requester>` in `system:masters`; the CA key never leaves the
provisioner.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from libs.common.contract.base import WireModel
from libs.common.contract.rpc import RpcMethod

KUBECONFIG_RPC_SUBJECT = "nest.rpc.provisioner.kubeconfig"
DEFAULT_TTL_SECONDS = 8 * 3600
MAX_TTL_SECONDS = 24 * 3600


class KubeconfigRequest(WireModel):
    """Ask for an admin kubeconfig of cluster `cluster_id` on behalf of `requester`."""

    cluster_id: str = Field(min_length=1)
    name: str | None = Field(default=None, description="The cluster's name, checked if given.")
    requester: str = Field(min_length=1, max_length=53, description="Who asks (in the CN).")
    ttl_seconds: int = Field(default=DEFAULT_TTL_SECONDS, ge=1, le=MAX_TTL_SECONDS)


class KubeconfigIssued(WireModel):
    """The kubeconfig (YAML text) and when its client certificate expires."""

    kubeconfig: str
    expires_at: datetime


KUBECONFIG_RPC: RpcMethod[KubeconfigRequest, KubeconfigIssued] = RpcMethod(
    KUBECONFIG_RPC_SUBJECT,
    KubeconfigRequest,
    KubeconfigIssued,
    "Sign a short-lived admin kubeconfig of a cluster.",
)
