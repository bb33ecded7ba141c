"""What each Nest service may do in the management cluster, as the Helm chart grants it, checked
by the real API server's authorizer (SubjectAccessReview) against what each service needs.

The provisioner tests and the end-to-end test run the provisioner with this ServiceAccount's
token, so a request outside this list fails them too; this list says why each is needed.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest

from tests.support.kube import identities
from tests.support.kube.session import ManagementCluster


class Need(NamedTuple):
    verb: str
    group: str
    resource: str
    subresource: str = ""
    why: str = ""


_OWNED = (
    ("", "namespaces", "one per cluster; deleted with the cluster"),
    ("", "secrets", "the cluster's PKI and kubeconfigs; the restore URL"),
    ("", "configmaps", "the egress-selector configuration"),
    ("", "services", "the etcd headless Service and the endpoint Service"),
    ("apps", "statefulsets", "etcd"),
    ("apps", "deployments", "the control plane"),
    ("policy", "poddisruptionbudgets", "etcd's and the control plane's"),
)
PROVISIONER: tuple[Need, ...] = (
    *(
        Need(verb, group, resource, why=why)
        # get/list/watch: readiness and drift are watched; patch: server-side apply (which
        # creates a missing object); delete: a cluster's namespace and a restore's leftovers.
        for group, resource, why in _OWNED
        for verb in ("get", "list", "watch", "create", "patch", "delete")
    ),
    Need("get", "apps", "statefulsets", "scale", "a restore scales etcd to 0 and back"),
    Need("patch", "apps", "statefulsets", "scale", "a restore scales etcd to 0 and back"),
    Need("get", "apps", "deployments", "scale", "a restore scales the control plane"),
    Need("patch", "apps", "deployments", "scale", "a restore scales the control plane"),
    Need("create", "batch", "jobs", why="one restore Job per etcd member"),
    Need("patch", "batch", "jobs", why="restore Jobs are applied server-side"),
    Need("get", "batch", "jobs", why="a restore waits for its Jobs"),
    Need("delete", "batch", "jobs", why="a restore's Jobs are removed after it"),
    Need("list", "", "pods", why="a restore waits until no etcd pod is left"),
)
FORBIDDEN: tuple[Need, ...] = (
    Need("create", "", "pods", why="it never runs pods itself"),
    Need("create", "rbac.authorization.k8s.io", "clusterrolebindings", why="no escalation"),
)


async def _allowed(cluster: ManagementCluster, user: str, need: Need, namespace: str) -> bool:
    attributes = {
        "verb": need.verb,
        "group": need.group,
        "resource": need.resource,
        "subresource": need.subresource,
    }
    if need.resource != "namespaces":
        attributes["namespace"] = namespace
    async with cluster.api() as api:
        review = await api.create(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": user,
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{identities.NAMESPACE}",
                    ],
                    "resourceAttributes": attributes,
                },
            },
        )
    return bool(review["status"].get("allowed"))


@pytest.fixture(scope="module")
async def chart_objects(kube_cluster: ManagementCluster) -> list[dict[str, object]]:
    async with kube_cluster.api() as api:
        return await identities.install_rbac(api)


async def test_the_provisioner_may_do_everything_it_needs(
    kube_cluster: ManagementCluster, chart_objects: list[dict[str, object]]
) -> None:
    account = identities.service_account_of(chart_objects, "provisioner")  # type: ignore[arg-type]
    user = f"system:serviceaccount:{identities.NAMESPACE}:{account}"
    missing = [
        need
        for need in PROVISIONER
        if not await _allowed(kube_cluster, user, need, "nest-some-cluster")
    ]
    assert missing == [], "the chart does not grant the provisioner:\n" + "\n".join(
        f"  {n.verb} {n.group or 'core'}/{n.resource}{'/' + n.subresource if n.subresource else ''}"
        f" — {n.why}"
        for n in missing
    )


async def test_the_provisioner_may_not_run_pods_or_grant_itself_more(
    kube_cluster: ManagementCluster, chart_objects: list[dict[str, object]]
) -> None:
    account = identities.service_account_of(chart_objects, "provisioner")  # type: ignore[arg-type]
    user = f"system:serviceaccount:{identities.NAMESPACE}:{account}"
    for need in FORBIDDEN:
        assert not await _allowed(kube_cluster, user, need, "nest-some-cluster"), need


async def test_the_api_and_backup_services_get_no_kubernetes_access(
    kube_cluster: ManagementCluster, chart_objects: list[dict[str, object]]
) -> None:
    """The backup service reaches etcd through the provisioner's short-lived client
    certificates, never through the Kubernetes API: its ServiceAccount has no token mounted
    and no permission at all."""
    shared = [
        o
        for o in chart_objects
        if o["kind"] == "ServiceAccount"
        and (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") != "provisioner"  # type: ignore[union-attr]
    ]
    assert shared, chart_objects
    for account in shared:
        assert account.get("automountServiceAccountToken") is False
        user = f"system:serviceaccount:{identities.NAMESPACE}:{account['metadata']['name']}"  # type: ignore[index]
        for need in PROVISIONER:
            assert not await _allowed(kube_cluster, user, need, "nest-some-cluster"), need
