"""`services.provisioner.kube` over HTTP against the real management API server, as the chart's
provisioner ServiceAccount through the fault proxy (so the apiserver semantics the provisioner
relies on are the real ones, and 5xx/429/timeouts come from the proxy)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.provisioner.kube import (
    KubeClient,
    KubeNotConfigured,
    KubeRejected,
    KubeUnavailable,
    Retry,
)
from tests.support.kube_harness import Management, unique

FAST = Retry(attempts=3, base_delay=0.01, max_delay=0.05, timeout=1.0)
HOLD = "test.nest.io/hold"
"""A finalizer nobody removes but the test: it keeps an object (and so its namespace's
deletion) from finishing until the test says so."""


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def configmap(ns: str, name: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "data": {"value": value},
    }


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@pytest.fixture
async def client(management: Management) -> AsyncIterator[KubeClient]:
    """Nest's client with the provisioner's identity, through the fault proxy."""
    found = await KubeClient.connect(management.kubeconfig, retry=FAST)
    try:
        yield found
    finally:
        await found.close()


@pytest.fixture
async def namespaces(management: Management) -> AsyncIterator[list[str]]:
    """Namespaces the test made; whatever is left of them is deleted at its end (a finalizer the
    test put on an object is removed first)."""
    made: list[str] = []
    yield made
    for name in made:
        for item in await management.api.list(f"/api/v1/namespaces/{name}/configmaps"):
            if HOLD in (item["metadata"].get("finalizers") or []):
                await management.api.merge_patch(
                    f"/api/v1/namespaces/{name}/configmaps/{item['metadata']['name']}",
                    {"metadata": {"finalizers": None}},
                )
        await management.api.merge_patch(
            f"/api/v1/namespaces/{name}", {"metadata": {"finalizers": None}}
        )
        await management.api.delete(f"/api/v1/namespaces/{name}")


async def test_apply_creates_then_updates_and_respects_namespaces(
    management: Management, client: KubeClient, namespaces: list[str]
) -> None:
    ns = unique("kc-apply")
    namespaces.append(ns)
    with pytest.raises(KubeRejected) as no_namespace:
        await client.apply(f"/api/v1/namespaces/{ns}/configmaps/x", configmap(ns, "x", "1"))
    assert no_namespace.value.status == 404
    created = await client.apply(f"/api/v1/namespaces/{ns}", namespace(ns, team="x"))
    assert created["status"]["phase"] == "Active"
    first = await client.apply(f"/api/v1/namespaces/{ns}/configmaps/x", configmap(ns, "x", "1"))
    second = await client.apply(f"/api/v1/namespaces/{ns}/configmaps/x", configmap(ns, "x", "2"))
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    assert second["data"] == {"value": "2"}
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    # `y` carries a finalizer of the test's, so the namespace stays Terminating until it goes.
    held = configmap(ns, "y", "1")
    held["metadata"]["finalizers"] = [HOLD]
    await client.apply(f"/api/v1/namespaces/{ns}/configmaps/y", held)
    only_y = await client.list(f"/api/v1/namespaces/{ns}/configmaps", labels={"app": "y"})
    assert [c["metadata"]["name"] for c in only_y] == ["y"]
    assert await client.get(f"/api/v1/namespaces/{ns}/configmaps/missing") is None

    assert await client.delete(f"/api/v1/namespaces/{ns}")
    with pytest.raises(KubeRejected) as terminating:
        await client.apply(f"/api/v1/namespaces/{ns}/configmaps/z", configmap(ns, "z", "1"))
    assert terminating.value.status == 403
    assert "being terminated" in str(terminating.value)

    await management.api.merge_patch(
        f"/api/v1/namespaces/{ns}/configmaps/y", {"metadata": {"finalizers": None}}
    )

    async def gone() -> bool:
        return await client.get(f"/api/v1/namespaces/{ns}") is None

    assert await eventually(gone), f"namespace {ns} was never removed"
    assert await management.list(f"/api/v1/namespaces/{ns}/configmaps") == []
    assert not await client.delete(f"/api/v1/namespaces/{ns}")


async def test_transient_failures_are_retried_then_reported(
    management: Management, client: KubeClient, namespaces: list[str]
) -> None:
    ns = unique("kc-retry")
    namespaces.append(ns)
    path = f"/api/v1/namespaces/{ns}"
    await client.apply(path, namespace(ns))
    proxy = management.proxy
    proxy.fail("GET", f"/namespaces/{ns}$", status=503, times=2)
    before = proxy.requests[("GET", path)]
    assert (await client.get(path)) is not None  # the third try answers
    assert proxy.requests[("GET", path)] - before == 3

    proxy.fail("GET", f"/namespaces/{ns}$", status=429, times=None)
    with pytest.raises(KubeUnavailable, match="429"):
        await client.get(path)
    proxy.clear()
    proxy.fail("GET", f"/namespaces/{ns}$", status=None, delay=1.5, times=None)
    with pytest.raises(KubeUnavailable, match="Timeout"):
        await client.get(path)
    proxy.clear()

    # A request the API server refuses for good is not retried.
    before = proxy.requests[("POST", "/api/v1/namespaces")]
    with pytest.raises(KubeRejected) as invalid:
        await client.request("POST", "/api/v1/namespaces", body={"kind": "Namespace"})
    assert invalid.value.status == 422
    assert "metadata.name: Required value" in str(invalid.value)
    assert proxy.requests[("POST", "/api/v1/namespaces")] - before == 1


async def test_missing_configuration_is_named(tmp_path: Path) -> None:
    with pytest.raises(KubeNotConfigured, match="NEST_KUBECONFIG"):
        await KubeClient.connect(None)
    with pytest.raises(KubeNotConfigured, match="not a readable file"):
        await KubeClient.connect(tmp_path / "nope")
    (tmp_path / "bad").write_text("::: not yaml {")
    with pytest.raises(KubeNotConfigured, match="not usable"):
        await KubeClient.connect(tmp_path / "bad")


async def test_server_side_apply_removes_a_field_the_manager_stops_applying(
    management: Management, client: KubeClient, namespaces: list[str]
) -> None:
    ns = unique("kc-ssa")
    namespaces.append(ns)
    path = f"/api/v1/namespaces/{ns}/configmaps/owned"
    await client.apply(f"/api/v1/namespaces/{ns}", namespace(ns))
    first = configmap(ns, "owned", "1")
    first["data"] = {"value": "1", "dropped": "x"}
    first["metadata"]["annotations"] = {"nest.io/a": "1", "nest.io/b": "2"}
    await client.apply(path, first)
    # Another manager's field survives; Nest's own dropped fields go. (The real API server
    # wants `apiVersion` and `kind` in every apply body: 400 "invalid object type" without.)
    theirs = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "owned", "namespace": ns},
        "data": {"theirs": "y"},
    }
    await management.api.apply(path, theirs, manager="someone-else")
    second = configmap(ns, "owned", "2")
    second["metadata"]["annotations"] = {"nest.io/a": "1"}
    applied = await client.apply(path, second)
    assert applied["data"] == {"value": "2", "theirs": "y"}
    assert applied["metadata"]["annotations"] == {"nest.io/a": "1"}
    assert applied["metadata"]["labels"] == {"app": "owned"}


async def test_a_terminating_namespace_stays_until_it_is_emptied_and_a_second_delete_waits(
    management: Management, client: KubeClient, namespaces: list[str]
) -> None:
    # The API server keeps a namespace Terminating while its content goes (pods terminating
    # gracefully, PVC protection; here a ConfigMap with a finalizer). A second DELETE meanwhile
    # answers 200 with the namespace as it is (kube-apiserver 1.35-1.37: `len(Spec.Finalizers)
    # != 0` returns the object; no 409 Conflict) and changes nothing.
    t = unique("kc-term")
    namespaces.append(t)
    created = await client.apply(f"/api/v1/namespaces/{t}", namespace(t))
    assert created["spec"]["finalizers"] == ["kubernetes"]
    held = configmap(t, "x", "1")
    held["metadata"]["finalizers"] = [HOLD]
    await client.apply(f"/api/v1/namespaces/{t}/configmaps/x", held)
    assert await client.delete(f"/api/v1/namespaces/{t}")
    terminating = await client.get(f"/api/v1/namespaces/{t}")
    assert terminating is not None and terminating["metadata"]["deletionTimestamp"]
    assert await client.delete(f"/api/v1/namespaces/{t}")
    again = await client.get(f"/api/v1/namespaces/{t}")
    assert again is not None
    assert again["metadata"]["uid"] == terminating["metadata"]["uid"]
    assert again["metadata"]["deletionTimestamp"] == terminating["metadata"]["deletionTimestamp"]
    assert again["status"]["phase"] == "Terminating"
    assert again["spec"]["finalizers"] == ["kubernetes"]
    await client.request(
        "PATCH",
        f"/api/v1/namespaces/{t}/configmaps/x",
        body={"metadata": {"finalizers": None}},
        content_type="application/merge-patch+json",
    )

    async def gone(name: str) -> bool:
        return await client.get(f"/api/v1/namespaces/{name}") is None

    assert await eventually(lambda: gone(t)), f"namespace {t} was never removed"

    # Another controller's finalizer holds it Terminating after it was emptied; a delete
    # then answers as usual, and the namespace goes when that finalizer is removed.
    h = unique("kc-held")
    namespaces.append(h)
    spec_held = namespace(h)
    spec_held["metadata"]["finalizers"] = ["example.com/hold"]
    await client.apply(f"/api/v1/namespaces/{h}", spec_held)
    assert await client.delete(f"/api/v1/namespaces/{h}")

    async def emptied() -> bool:
        found = await client.get(f"/api/v1/namespaces/{h}")
        assert found is not None
        return not found["spec"].get("finalizers")

    assert await eventually(emptied), f"the namespace controller never emptied {h}"
    found = await client.get(f"/api/v1/namespaces/{h}")
    assert found is not None and found["status"]["phase"] == "Terminating"
    assert await client.delete(f"/api/v1/namespaces/{h}")
    await client.request(
        "PATCH",
        f"/api/v1/namespaces/{h}",
        body={"metadata": {"finalizers": None}},
        content_type="application/merge-patch+json",
    )
    assert await client.get(f"/api/v1/namespaces/{h}") is None
