"""The test harness's management cluster itself: real control plane, node agents that pretend
(fake), hold, or really run pods, volumes, Services reachable from the host, DNS."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support.kube.agent import HOLD_ANNOTATION, MODE_LABEL
from tests.support.kube.api import Api
from tests.support.kube.session import ManagementCluster

pytestmark = pytest.mark.timeout(240)

ETCD_IMAGE = "registry.k8s.io/etcd:3.7.0-0"


@pytest.fixture
async def api(kube_cluster: ManagementCluster) -> AsyncIterator[Api]:
    async with kube_cluster.api() as client:
        yield client


async def namespace(api: Api, mode: str, **annotations: str) -> str:
    name = f"h-{uuid.uuid4().hex[:8]}"
    await api.create(
        "/api/v1/namespaces",
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {MODE_LABEL: mode}, "annotations": annotations},
        },
    )
    return name


async def eventually(check: Any, timeout: float = 60.0, interval: float = 0.2) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"not reached within {timeout}s; last: {last}")


def etcd_statefulset(ns: str, replicas: int = 1) -> dict[str, Any]:
    """An etcd StatefulSet (a PVC per member) behind a headless Service, as a real app is."""
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "etcd", "namespace": ns},
        "spec": {
            "serviceName": "etcd",
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "etcd"}},
            "template": {
                "metadata": {"labels": {"app": "etcd"}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "etcd",
                            "image": ETCD_IMAGE,
                            "command": ["etcd"],
                            "args": [
                                "--name=$(POD_NAME)",
                                "--data-dir=/var/lib/etcd/data",
                                "--listen-client-urls=http://0.0.0.0:2379",
                                f"--advertise-client-urls=http://$(POD_NAME).etcd.{ns}.svc:2379",
                                "--listen-peer-urls=http://0.0.0.0:2380",
                                f"--initial-advertise-peer-urls=http://$(POD_NAME).etcd.{ns}.svc:2380",
                                "--initial-cluster="
                                + ",".join(
                                    f"etcd-{i}=http://etcd-{i}.etcd.{ns}.svc:2380"
                                    for i in range(replicas)
                                ),
                                "--listen-metrics-urls=http://0.0.0.0:2381",
                            ],
                            "env": [
                                {
                                    "name": "POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                }
                            ],
                            "ports": [{"name": "client", "containerPort": 2379}],
                            "readinessProbe": {
                                "httpGet": {"path": "/readyz", "port": 2381},
                                "periodSeconds": 2,
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}],
                        }
                    ],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1Gi"}},
                    },
                }
            ],
        },
    }


def service(ns: str, name: str, kind: str, *, headless: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": {"app": "etcd"},
        "ports": [{"name": "client", "port": 2379, "targetPort": "client"}],
    }
    if headless:
        spec |= {"clusterIP": "None", "publishNotReadyAddresses": True}
    else:
        spec["type"] = kind
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


async def available(api: Api, path: str, replicas: int) -> bool:
    found = await api.get(path)
    return bool(found and (found.get("status") or {}).get("readyReplicas") == replicas)


class TestFakePods:
    async def test_a_deployment_becomes_available_without_running_anything(self, api: Api) -> None:
        ns = await namespace(api, "fake")
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [{"name": "web", "image": "example.com/not/runnable:1"}]
                    },
                },
            },
        }
        await api.create(f"/apis/apps/v1/namespaces/{ns}/deployments", deployment)
        path = f"/apis/apps/v1/namespaces/{ns}/deployments/web"
        await eventually(lambda: available(api, path, 3))
        pods = await api.list(f"/api/v1/namespaces/{ns}/pods")
        assert {p["status"]["phase"] for p in pods} == {"Running"}
        assert len({p["status"]["podIP"] for p in pods}) == 3

        await api.delete(f"/api/v1/namespaces/{ns}")
        await eventually(lambda: _gone(api, f"/api/v1/namespaces/{ns}"))

    async def test_held_pods_stay_pending_until_released(self, api: Api) -> None:
        ns = await namespace(api, "fake", **{HOLD_ANNOTATION: "true"})
        await api.create(f"/apis/apps/v1/namespaces/{ns}/statefulsets", etcd_statefulset(ns))
        path = f"/apis/apps/v1/namespaces/{ns}/statefulsets/etcd"
        await eventually(lambda: _pods(api, ns, 1))
        await asyncio.sleep(1.0)
        assert not await available(api, path, 1)
        (pod,) = await api.list(f"/api/v1/namespaces/{ns}/pods")
        assert pod["status"]["phase"] == "Pending"

        await api.merge_patch(
            f"/api/v1/namespaces/{ns}", {"metadata": {"annotations": {HOLD_ANNOTATION: None}}}
        )
        await eventually(lambda: available(api, path, 1))
        await api.delete(f"/api/v1/namespaces/{ns}")


class TestRealPods:
    async def test_etcd_runs_for_real_with_its_volume_dns_and_services(
        self, api: Api, kube_cluster: ManagementCluster
    ) -> None:
        ns = await namespace(api, "real")
        for body in (
            service(ns, "etcd", "ClusterIP", headless=True),
            service(ns, "etcd-lb", "LoadBalancer"),
            service(ns, "etcd-np", "NodePort"),
        ):
            await api.create(f"/api/v1/namespaces/{ns}/services", body)
        await api.create(f"/apis/apps/v1/namespaces/{ns}/statefulsets", etcd_statefulset(ns, 3))
        await eventually(
            lambda: available(api, f"/apis/apps/v1/namespaces/{ns}/statefulsets/etcd", 3),
            timeout=120,
        )
        # Three real members found each other through the cluster's DNS and formed a quorum.
        lb = await eventually(lambda: _ingress(api, ns, "etcd-lb"))
        async with httpx.AsyncClient(timeout=5) as client:
            put = await client.post(
                f"http://{lb}:2379/v3/kv/put", json={"key": "YQ==", "value": "Yg=="}
            )
            assert put.status_code == 200, put.text
            members = (
                await client.post(f"http://{lb}:2379/v3/cluster/member/list", json={})
            ).json()
            assert len(members["members"]) == 3
            node_port = (await api.get(f"/api/v1/namespaces/{ns}/services/etcd-np"))["spec"][
                "ports"
            ][0]["nodePort"]
            for node_ip in kube_cluster.node_ips:
                got = await client.post(
                    f"http://{node_ip}:{node_port}/v3/kv/range", json={"key": "YQ=="}
                )
                assert got.json()["kvs"][0]["value"] == "Yg=="
        assert kube_cluster.resolve(f"etcd-0.etcd.{ns}.svc") is not None
        assert kube_cluster.resolve(f"etcd-0.etcd.{ns}.svc.cluster.local") is not None

        # Each member's data is on its own claim, bound to a volume of the harness.
        claims = await api.list(f"/api/v1/namespaces/{ns}/persistentvolumeclaims")
        assert sorted(c["metadata"]["name"] for c in claims) == [f"data-etcd-{i}" for i in range(3)]
        assert {c["status"]["phase"] for c in claims} == {"Bound"}

        # A member deleted behind the StatefulSet's back is restarted on the same data.
        await api.delete(f"/api/v1/namespaces/{ns}/pods/etcd-1")
        await eventually(
            lambda: available(api, f"/apis/apps/v1/namespaces/{ns}/statefulsets/etcd", 3),
            timeout=120,
        )

        await api.delete(f"/api/v1/namespaces/{ns}")
        await eventually(lambda: _gone(api, f"/api/v1/namespaces/{ns}"), timeout=120)
        volumes = await api.list("/api/v1/persistentvolumes")
        assert not [v for v in volumes if v["spec"]["claimRef"]["namespace"] == ns]


async def _gone(api: Api, path: str) -> bool:
    return await api.get(path) is None


async def _pods(api: Api, ns: str, count: int) -> bool:
    return len(await api.list(f"/api/v1/namespaces/{ns}/pods")) == count


async def _ingress(api: Api, ns: str, name: str) -> str | None:
    found = await api.get(f"/api/v1/namespaces/{ns}/services/{name}")
    ingress = ((found or {}).get("status") or {}).get("loadBalancer", {}).get("ingress") or []
    return ingress[0]["ip"] if ingress else None
