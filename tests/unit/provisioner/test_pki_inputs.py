"""PKI inputs that depend on how the cluster is exposed: the API port inside the pod, and the
konnectivity server's kubeconfig."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

from cryptography import x509

from libs.common.contract.cluster import ClusterSpec
from services.provisioner import names, pki

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def server_of(result: pki.PKIResult, secret: str) -> str:
    config = json.loads(result.secrets[secret][pki.KUBECONFIG])
    return str(config["clusters"][0]["cluster"]["server"])


def test_internal_kubeconfigs_dial_the_port_the_api_server_listens_on() -> None:
    inputs = pki.PKIInputs(cluster_name="demo", namespace="nest-demo", apiserver_port=31443)
    result = pki.reconcile_pki({}, inputs, now=NOW)
    for secret in (names.SECRET_CONTROLLER_MANAGER_KUBECONFIG, names.SECRET_SCHEDULER_KUBECONFIG):
        assert server_of(result, secret) == "https://localhost:31443"
    # Moving the port re-issues the kubeconfigs and nothing else.
    moved = pki.reconcile_pki(
        result.secrets,
        pki.PKIInputs(cluster_name="demo", namespace="nest-demo", apiserver_port=6443),
        now=NOW,
    )
    assert moved.report.changed == {
        names.SECRET_CONTROLLER_MANAGER_KUBECONFIG,
        names.SECRET_SCHEDULER_KUBECONFIG,
    }
    assert server_of(moved, names.SECRET_SCHEDULER_KUBECONFIG) == pki.INTERNAL_SERVER_URL


def test_konnectivity_gets_its_own_kubeconfig_when_enabled() -> None:
    spec = ClusterSpec()
    inputs = pki.PKIInputs.for_cluster("demo", spec, apiserver_port=6443)
    assert inputs.konnectivity
    result = pki.reconcile_pki({}, inputs, now=NOW)
    assert tuple(result.secrets) == (*pki.PKI_SECRETS, *pki.KONNECTIVITY_SECRETS)
    assert pki.SECRET_TYPES[names.SECRET_KONNECTIVITY_KUBECONFIG] == "Opaque"
    config = json.loads(result.secrets[names.SECRET_KONNECTIVITY_KUBECONFIG][pki.KUBECONFIG])
    user = config["users"][0]["user"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(user["client-certificate-data"]))
    assert cert.subject.rfc4514_string() == "CN=system:konnectivity-server"
    off = ClusterSpec.model_validate({"addons": {"konnectivity": {"enabled": False}}})
    without = pki.reconcile_pki({}, pki.PKIInputs.for_cluster("demo", off), now=NOW)
    assert names.SECRET_KONNECTIVITY_KUBECONFIG not in without.secrets
