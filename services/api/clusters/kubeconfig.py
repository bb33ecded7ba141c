"""Kubeconfig issuance: asked of the provisioner over request/reply; the CA key stays there."""

from __future__ import annotations

import re

from libs.common.bus import Bus, BusUnavailable, RpcError
from libs.common.contract.kubeconfig import (
    KUBECONFIG_RPC_SUBJECT,
    KubeconfigIssued,
    KubeconfigRequest,
)
from services.api.clusters.schemas import ClusterRead
from services.api.kit.problems import Conflict, InvalidInput, NotFound, Unavailable

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


async def issue(
    bus: Bus, cluster: ClusterRead, *, requester: str, ttl_seconds: int
) -> KubeconfigIssued:
    if cluster.status.phase == "Deleting":
        raise Conflict(f"cluster {cluster.name!r} is being deleted")
    request = KubeconfigRequest(
        cluster_id=cluster.id,
        name=cluster.name,
        requester=(_UNSAFE.sub("-", requester) or "token")[:53],
        ttl_seconds=ttl_seconds,
    )
    if not bus.connected:
        raise Unavailable("the message bus is not connected; retry shortly")
    try:
        result = await bus.request(KUBECONFIG_RPC_SUBJECT, request.wire(), timeout=15)
    except BusUnavailable as exc:
        raise Unavailable(str(exc)) from None
    except RpcError as exc:
        if exc.kind == "not-found":
            raise NotFound(exc.message) from None
        if exc.kind == "invalid":
            raise InvalidInput(exc.message) from None
        raise Unavailable(f"the provisioner could not issue a kubeconfig: {exc.message}") from None
    return KubeconfigIssued.model_validate(result)
