"""How the backup service reaches a cluster's etcd: short-lived client access from the
provisioner over request/reply (`nest.rpc.provisioner.etcd_client`), never from an intent."""

from __future__ import annotations

from libs.common.bus import Bus, RpcError
from libs.common.contract.etcd_access import ETCD_CLIENT_RPC, EtcdClientRequest
from services.backup import errors
from services.backup.snapshots.etcd import EtcdEndpoint
from services.backup.snapshots.runs import EtcdAccess


def rpc_etcd_access(bus: Bus, requester: str, *, timeout: float = 30.0) -> EtcdAccess:
    """An `EtcdAccess` asking the provisioner for a client certificate per backup."""

    async def access(cluster_id: str) -> EtcdEndpoint:
        request = EtcdClientRequest(cluster_id=cluster_id, requester=requester[:53])
        try:
            issued = await bus.call(ETCD_CLIENT_RPC, request, timeout=timeout)
        except RpcError as exc:
            raise errors.EtcdAccessUnavailable(
                f"no etcd access for cluster {cluster_id!r}: {exc.kind}: {exc.message}"
            ) from None
        return EtcdEndpoint(
            url=issued.url,
            ca_pem=issued.ca_pem.encode(),
            cert_pem=issued.cert_pem.encode(),
            key_pem=issued.key_pem.encode(),
        )

    return access
