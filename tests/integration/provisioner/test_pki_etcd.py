"""A real etcd accepts the certificates Nest issues for its cluster and refuses everyone else's."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import httpx
import pytest

from services.provisioner import names, pki
from tests.integration.provisioner.conftest import Etcd


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def pair(data: dict[str, bytes]) -> tuple[bytes, bytes]:
    return data[pki.TLS_CRT], data[pki.TLS_KEY]


def put_and_get(client: httpx.Client, key: str, value: str) -> str:
    put = client.post("/v3/kv/put", json={"key": b64(key), "value": b64(value)})
    assert put.status_code == 200, put.text
    found = client.post("/v3/kv/range", json={"key": b64(key)})
    assert found.status_code == 200, found.text
    return base64.b64decode(found.json()["kvs"][0]["value"]).decode()


@pytest.fixture(scope="module")
def other_cluster() -> pki.PKIResult:
    inputs = pki.PKIInputs(cluster_name="other", namespace="nest-other", etcd_replicas=1)
    return pki.reconcile_pki({}, inputs, now=datetime.now(UTC))


def test_apiserver_etcd_client_writes_and_reads(etcd: Etcd) -> None:
    secret = etcd.pki.secrets[names.SECRET_APISERVER_ETCD_CLIENT]
    with etcd.client("apiserver", pair(secret)) as client:
        assert put_and_get(client, "/registry/nest/probe", "hello") == "hello"
        members = client.post("/v3/cluster/member/list", json={}).json()["members"]
    # The member advertises the peer URL it serves with the peer certificate Nest issued.
    assert [member["peerURLs"] for member in members] == [[etcd.peer_url]]


def test_backup_client_certificate_reads_and_writes(etcd: Etcd) -> None:
    issued = pki.issue_etcd_client(
        etcd.pki.secrets[names.SECRET_ETCD_CA], common_name="nest-backup", now=datetime.now(UTC)
    )
    with etcd.client("backup", (issued.cert_pem, issued.key_pem)) as client:
        assert put_and_get(client, "/nest/backup-probe", "snapshot me") == "snapshot me"


def test_client_certificate_from_another_clusters_ca_is_refused(
    etcd: Etcd, other_cluster: pki.PKIResult
) -> None:
    secret = other_cluster.secrets[names.SECRET_APISERVER_ETCD_CLIENT]
    with etcd.client("other", pair(secret)) as client, pytest.raises(httpx.TransportError):
        client.post("/v3/kv/range", json={"key": b64("/registry/nest/probe")})


def test_client_without_certificate_is_refused(etcd: Etcd) -> None:
    with etcd.client("anonymous", None) as client, pytest.raises(httpx.TransportError):
        client.post("/v3/kv/range", json={"key": b64("/registry/nest/probe")})


def test_server_is_not_trusted_by_another_clusters_ca(
    etcd: Etcd, other_cluster: pki.PKIResult
) -> None:
    secret = etcd.pki.secrets[names.SECRET_APISERVER_ETCD_CLIENT]
    trust = other_cluster.secrets[names.SECRET_ETCD_CA][pki.TLS_CRT]
    with (
        etcd.client("wrong-trust", pair(secret), trust=trust) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.get("/health")
