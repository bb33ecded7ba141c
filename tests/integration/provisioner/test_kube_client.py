"""`services.provisioner.kube` over HTTP against the emulated API server (and so the emulator's
apiserver semantics that the provisioner relies on)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from services.provisioner.kube import (
    KubeClient,
    KubeNotConfigured,
    KubeRejected,
    KubeUnavailable,
    Retry,
)
from tests.support.kube_harness import ManagementCluster

FAST = Retry(attempts=3, base_delay=0.01, max_delay=0.05, timeout=1.0)


def namespace(name: str, **labels: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def configmap(ns: str, name: str, value: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "data": {"value": value},
    }


async def test_apply_creates_then_updates_and_respects_namespaces(
    management: ManagementCluster,
) -> None:
    client = await KubeClient.connect(management.kubeconfig, retry=FAST)
    try:
        with pytest.raises(KubeRejected) as no_namespace:
            await client.apply("/api/v1/namespaces/a/configmaps/x", configmap("a", "x", "1"))
        assert no_namespace.value.status == 404
        created = await client.apply("/api/v1/namespaces/a", namespace("a", team="x"))
        assert created["status"]["phase"] == "Active"
        first = await client.apply("/api/v1/namespaces/a/configmaps/x", configmap("a", "x", "1"))
        second = await client.apply("/api/v1/namespaces/a/configmaps/x", configmap("a", "x", "2"))
        assert second["metadata"]["uid"] == first["metadata"]["uid"]
        assert second["data"] == {"value": "2"}
        assert int(second["metadata"]["resourceVersion"]) > int(
            first["metadata"]["resourceVersion"]
        )
        await client.apply("/api/v1/namespaces/a/configmaps/y", configmap("a", "y", "1"))
        only_y = await client.list("/api/v1/namespaces/a/configmaps", labels={"app": "y"})
        assert [c["metadata"]["name"] for c in only_y] == ["y"]
        assert await client.get("/api/v1/namespaces/a/configmaps/missing") is None

        assert await client.delete("/api/v1/namespaces/a")
        with pytest.raises(KubeRejected) as terminating:
            await client.apply("/api/v1/namespaces/a/configmaps/z", configmap("a", "z", "1"))
        assert terminating.value.status == 403
        for _ in range(100):
            if await client.get("/api/v1/namespaces/a") is None:
                break
            await asyncio.sleep(0.01)
        assert await client.get("/api/v1/namespaces/a") is None
        assert management.emulator.items("v1/configmaps", "a") == []
        assert not await client.delete("/api/v1/namespaces/a")
    finally:
        await client.close()


async def test_transient_failures_are_retried_then_reported(management: ManagementCluster) -> None:
    client = await KubeClient.connect(management.kubeconfig, retry=FAST)
    try:
        management.emulator.fail("GET", "/namespaces/b$", status=503, times=2)
        await client.apply("/api/v1/namespaces/b", namespace("b"))
        assert (await client.get("/api/v1/namespaces/b")) is not None  # third try answers
        management.emulator.fail("GET", "/namespaces/b$", status=429, times=None)
        with pytest.raises(KubeUnavailable, match="429"):
            await client.get("/api/v1/namespaces/b")
        management.emulator.faults.clear()
        management.emulator.fail("GET", "/namespaces/b$", status=None, delay=1.5, times=None)
        with pytest.raises(KubeUnavailable, match="Timeout"):
            await client.get("/api/v1/namespaces/b")
        management.emulator.faults.clear()
        with pytest.raises(KubeRejected) as invalid:
            await client.request("POST", "/api/v1/namespaces", body={"kind": "Namespace"})
        assert invalid.value.status == 422
    finally:
        await client.close()


async def test_missing_configuration_is_named(tmp_path: Path) -> None:
    with pytest.raises(KubeNotConfigured, match="NEST_KUBECONFIG"):
        await KubeClient.connect(None)
    with pytest.raises(KubeNotConfigured, match="not a readable file"):
        await KubeClient.connect(tmp_path / "nope")
    (tmp_path / "bad").write_text("::: not yaml {")
    with pytest.raises(KubeNotConfigured, match="not usable"):
        await KubeClient.connect(tmp_path / "bad")


async def test_server_side_apply_removes_a_field_the_manager_stops_applying(
    management: ManagementCluster,
) -> None:
    client = await KubeClient.connect(management.kubeconfig, retry=FAST)
    path = "/api/v1/namespaces/ssa/configmaps/owned"
    try:
        await client.apply("/api/v1/namespaces/ssa", namespace("ssa"))
        first = configmap("ssa", "owned", "1")
        first["data"] = {"value": "1", "dropped": "x"}
        first["metadata"]["annotations"] = {"nest.io/a": "1", "nest.io/b": "2"}  # type: ignore[index]
        await client.apply(path, first)
        # Another manager's field survives; Nest's own dropped fields go.
        async with httpx.AsyncClient(base_url=management.url) as raw:
            response = await raw.patch(
                path,
                params={"fieldManager": "someone-else"},
                content=json.dumps({"data": {"theirs": "y"}}),
                headers={"Content-Type": "application/apply-patch+yaml"},
            )
            assert response.status_code == 200, response.text
        second = configmap("ssa", "owned", "2")
        second["metadata"]["annotations"] = {"nest.io/a": "1"}  # type: ignore[index]
        applied = await client.apply(path, second)
        assert applied["data"] == {"value": "2", "theirs": "y"}
        assert applied["metadata"]["annotations"] == {"nest.io/a": "1"}
        assert applied["metadata"]["labels"] == {"app": "owned"}
    finally:
        await client.close()


async def test_a_terminating_namespace_refuses_a_second_delete_until_it_is_emptied(
    management: ManagementCluster,
) -> None:
    # The API server keeps a namespace Terminating while its content goes (pods terminating
    # gracefully, PVC protection) and answers a second DELETE meanwhile with 409 Conflict.
    management.emulator.namespace_finalize_delay = 0.5
    client = await KubeClient.connect(management.kubeconfig, retry=FAST)
    try:
        created = await client.apply("/api/v1/namespaces/t", namespace("t"))
        assert created["spec"]["finalizers"] == ["kubernetes"]
        await client.apply("/api/v1/namespaces/t/configmaps/x", configmap("t", "x", "1"))
        assert await client.delete("/api/v1/namespaces/t")
        terminating = await client.get("/api/v1/namespaces/t")
        assert terminating is not None and terminating["metadata"]["deletionTimestamp"]
        with pytest.raises(KubeRejected) as conflict:
            await client.delete("/api/v1/namespaces/t")
        assert conflict.value.status == 409
        assert "ensuring all content is removed" in str(conflict.value)
        for _ in range(200):
            if await client.get("/api/v1/namespaces/t") is None:
                break
            await asyncio.sleep(0.01)
        assert await client.get("/api/v1/namespaces/t") is None

        # Another controller's finalizer holds it Terminating after it was emptied; a delete
        # then answers as usual, and the namespace goes when that finalizer is removed.
        management.emulator.namespace_finalize_delay = 0.0
        held = namespace("h")
        held["metadata"]["finalizers"] = ["example.com/hold"]  # type: ignore[index]
        await client.apply("/api/v1/namespaces/h", held)
        assert await client.delete("/api/v1/namespaces/h")
        for _ in range(100):
            found = await client.get("/api/v1/namespaces/h")
            assert found is not None
            if not found["spec"]["finalizers"]:
                break
            await asyncio.sleep(0.01)
        assert found["status"]["phase"] == "Terminating"
        assert await client.delete("/api/v1/namespaces/h")
        await client.request(
            "PATCH",
            "/api/v1/namespaces/h",
            body={"metadata": {"finalizers": None}},
            content_type="application/merge-patch+json",
        )
        assert await client.get("/api/v1/namespaces/h") is None
    finally:
        await client.close()
