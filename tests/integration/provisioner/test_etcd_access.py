"""`nest.rpc.provisioner.etcd_client`: the backup service's access to a cluster's etcd, checked
against the cluster's own etcd, which runs for real in the management cluster with the PKI the
provisioner wrote, reached at the address the cluster's DNS gives the URL's name."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from libs.common.bus import Bus, RpcError
from libs.common.contract.etcd_access import ETCD_CLIENT_RPC_SUBJECT
from services.provisioner import names
from services.provisioner.service import ProvisionerService
from tests.support.kube_harness import (
    REAL,
    SMALL,
    Management,
    condition,
    unique,
    wait_cluster,
)
from tests.support.restoring import EtcdAccess, delete_cluster


def datastore_ready(cluster: dict[str, Any]) -> bool:
    conditions = (cluster.get("status") or {}).get("conditions") or []
    return any(c["type"] == "DatastoreReady" and c["status"] == "True" for c in conditions)


async def test_a_backup_gets_a_short_lived_client_that_real_etcd_accepts(
    api: httpx.AsyncClient,
    bus: Bus,
    provisioner: ProvisionerService,
    management: Management,
) -> None:
    name = unique("snap")
    namespace = names.namespace_for(name)
    response = await api.post(
        "/api/v1/clusters", json={"name": name, "labels": REAL, "spec": SMALL}
    )
    assert response.status_code == 201, response.text
    cluster_id = response.json()["id"]
    try:
        cluster = await wait_cluster(api, cluster_id, datastore_ready, timeout=120.0)
        assert condition(cluster, "DatastoreReady")["status"] == "True"
        access = await EtcdAccess.issue(bus, cluster_id, requester="backup", ttl_seconds=600)
        assert access.url == f"https://etcd.{namespace}.svc.cluster.local:2379"
        cert = x509.load_pem_x509_certificate(access.cert_pem)
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert cert.subject.rfc4514_string() == "CN=nest:backup"
        expires = datetime.fromisoformat(access.expires_at)
        assert timedelta(minutes=9) < expires - datetime.now(UTC) <= timedelta(minutes=10)
        etcd_ca = await management.get(
            f"/api/v1/namespaces/{namespace}/secrets/{names.SECRET_ETCD_CA}"
        )
        assert etcd_ca is not None
        assert access.ca_pem == base64.b64decode(etcd_ca["data"]["tls.crt"])

        # The cluster's etcd pod, at the address its Service name resolves to, takes the
        # certificate (and its own server certificate is valid for that name).
        put = await access.post(
            management,
            "/v3/kv/put",
            {"key": base64.b64encode(b"k").decode(), "value": base64.b64encode(b"v").decode()},
        )
        assert put.status_code == 200, put.text
        _, keys = await access.keys(management)
        assert keys[b"k"] == b"v"
        # Without a client certificate etcd refuses the connection.
        with pytest.raises(httpx.HTTPError):
            await access.post(management, "/v3/kv/range", {"key": "aw=="}, client_certificate=False)
    finally:
        await delete_cluster(api, management, cluster_id, namespace)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"clusterId": "nope", "requester": "backup"}, "not-found"),
        ({"clusterId": "x", "requester": "backup", "ttlSeconds": 5}, "invalid"),
    ],
)
async def test_refusals(
    bus: Bus, provisioner: ProvisionerService, body: dict[str, Any], kind: str
) -> None:
    with pytest.raises(RpcError) as refused:
        await bus.request(ETCD_CLIENT_RPC_SUBJECT, body)
    assert refused.value.kind == kind
