"""Nest's identities in the harness's management cluster, exactly as the Helm chart grants them.

The chart (`deploy/helm/nest`) is rendered by the real `helm`, and its ServiceAccounts and RBAC
objects are applied to the management cluster; tests then run Nest's services with a token of
those ServiceAccounts (from the TokenRequest API), never with an administrator's credential, so
a permission the chart forgets fails a test with the API server's 403.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support import helm
from tests.support.kube import pki
from tests.support.kube.api import Api
from tests.support.kube.session import ManagementCluster

CHART = Path(__file__).resolve().parents[3] / "deploy" / "helm" / "nest"
NAMESPACE = "nest-system"
RELEASE = "nest"
VALUES: dict[str, Any] = {
    "nats": {"url": "nats://nats.nats.svc:4222"},
    "database": {"existingSecret": "nest-database"},
    "secretsKey": {"existingSecret": "nest-secrets-key"},
}
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
_PLURALS = {
    "ServiceAccount": "serviceaccounts",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Role": "roles",
    "RoleBinding": "rolebindings",
}


def rbac_objects() -> list[dict[str, Any]]:
    """The chart's ServiceAccounts and RBAC objects, rendered by helm for NAMESPACE."""
    return [
        o
        for o in helm.template(CHART, VALUES, NAMESPACE, release=RELEASE)
        if o["kind"] in RBAC_KINDS
    ]


def object_path(obj: dict[str, Any]) -> str:
    kind = obj["kind"]
    group = "/api/v1" if kind == "ServiceAccount" else "/apis/rbac.authorization.k8s.io/v1"
    name = obj["metadata"]["name"]
    if kind in ("ClusterRole", "ClusterRoleBinding"):
        return f"{group}/{_PLURALS[kind]}/{name}"
    return f"{group}/namespaces/{NAMESPACE}/{_PLURALS[kind]}/{name}"


def service_account_of(objects: list[dict[str, Any]], component: str) -> str:
    """The name of the chart's ServiceAccount for `component` (e.g. `provisioner`)."""
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        if (
            obj["kind"] == "ServiceAccount"
            and labels.get("app.kubernetes.io/component") == component
        ):
            return str(obj["metadata"]["name"])
    raise LookupError(f"the chart has no ServiceAccount for {component}")


async def install_rbac(api: Api) -> list[dict[str, Any]]:
    """Apply the chart's RBAC to the cluster (idempotent); returns what was applied."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    await api.apply(f"/api/v1/namespaces/{NAMESPACE}", namespace)
    objects = rbac_objects()
    for obj in objects:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            obj["metadata"]["namespace"] = NAMESPACE
        await api.apply(object_path(obj), obj)
    return objects


async def token(api: Api, service_account: str, seconds: int = 86400) -> str:
    answer = await api.create(
        f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{service_account}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        },
    )
    return str(answer["status"]["token"])


async def provisioner_kubeconfig(
    cluster: ManagementCluster, path: Path, server: str | None = None
) -> Path:
    """A kubeconfig for the provisioner: the chart's provisioner ServiceAccount, against the
    cluster (or `server`, e.g. a fault proxy in front of it)."""
    async with cluster.api() as api:
        objects = await install_rbac(api)
        secret = await token(api, service_account_of(objects, "provisioner"))
    certs = pki.load(cluster.directory / "pki")
    return pki.kubeconfig(
        path, server or cluster.url, certs.ca.cert, user="nest-provisioner", token=secret
    )
