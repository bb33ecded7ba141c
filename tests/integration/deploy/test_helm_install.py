"""The Helm chart installed by the real `helm` into the real management cluster of the harness.

Every rendered object must be accepted by the real API server (not a dry run: installed), the
Deployments must roll out (their pods are marked ready by the harness's node agents, which run
nothing), and uninstall must remove the release.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support import helm
from tests.support.kube.api import Api
from tests.support.kube.session import ManagementCluster

pytestmark = pytest.mark.timeout(600)

CHART = Path(__file__).resolve().parents[3] / "deploy" / "helm" / "nest"
SECRETS: dict[str, dict[str, str]] = {
    "nest-database": {"database-url": "postgresql://nest@postgres.nest.svc/nest"},
    "nest-secrets-key": {"secrets-key": "0" * 64},
    "nest-s3": {"AWS_ACCESS_KEY_ID": "nest", "AWS_SECRET_ACCESS_KEY": "secret-key-of-nest"},
    "nest-backup-keys": {"keys": "k1:" + "1" * 64},
}
VALUES: dict[str, Any] = {
    "nats": {"url": "nats://nats.nats.svc:4222"},
    "database": {"existingSecret": "nest-database"},
    "secretsKey": {"existingSecret": "nest-secrets-key"},
    "backup": {
        "s3": {
            "enabled": True,
            "endpoint": "https://s3.example.com:9000",
            "bucket": "nest-backups",
            "existingSecret": "nest-s3",
            "accessKeyIdKey": "AWS_ACCESS_KEY_ID",
            "secretAccessKeyKey": "AWS_SECRET_ACCESS_KEY",
        },
        "encryption": {"existingSecret": "nest-backup-keys", "key": "keys"},
    },
    "api": {"replicas": 2},
}
_PATHS = {
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
    "Service": "/api/v1/namespaces/{ns}/services/{name}",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps/{name}",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts/{name}",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/{name}",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{name}",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/{name}",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings/{name}",
}


async def _create_secrets(api: Api, namespace: str) -> None:
    await api.create(
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
    )
    for name, data in SECRETS.items():
        await api.create(
            f"/api/v1/namespaces/{namespace}/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": namespace},
                "stringData": data,
            },
        )


async def test_the_chart_installs_rolls_out_and_uninstalls(
    kube_cluster: ManagementCluster, tmp_path: Path
) -> None:
    namespace = f"nest-helm-{uuid.uuid4().hex[:6]}"
    release = f"nest-{uuid.uuid4().hex[:6]}"
    async with kube_cluster.api() as api:
        await _create_secrets(api, namespace)
        installed = await asyncio.to_thread(
            helm.install,
            CHART,
            VALUES,
            release=release,
            namespace=namespace,
            kubeconfig=kube_cluster.kubeconfig,
            wait=True,
            timeout=240,
        )
        assert installed.status == "deployed", installed
        objects = installed.objects()
        kinds = {o["kind"] for o in objects}
        assert {"Deployment", "Service", "ServiceAccount", "ClusterRole"} <= kinds
        # Every rendered object is in the cluster as the API server stored it.
        for obj in objects:
            path = _PATHS[obj["kind"]].format(ns=namespace, name=obj["metadata"]["name"])
            stored = await api.get(path)
            assert stored is not None, f"{obj['kind']} {obj['metadata']['name']} not stored"
        deployments = [o for o in objects if o["kind"] == "Deployment"]
        assert len(deployments) >= 3  # api, provisioner, backup
        for deployment in deployments:
            path = _PATHS["Deployment"].format(ns=namespace, name=deployment["metadata"]["name"])
            stored = await api.get(path)
            assert stored is not None
            status = stored.get("status") or {}
            assert status.get("readyReplicas") == deployment["spec"].get("replicas", 1), status

        await asyncio.to_thread(
            helm.uninstall,
            release,
            namespace=namespace,
            kubeconfig=kube_cluster.kubeconfig,
            wait=True,
        )
        for obj in objects:
            path = _PATHS[obj["kind"]].format(ns=namespace, name=obj["metadata"]["name"])
            assert await api.get(path) is None, f"{obj['kind']} {obj['metadata']['name']} left"
        await api.delete(f"/api/v1/namespaces/{namespace}")
