"""Deleting a cluster whose namespace takes its time on the real management cluster: content
that goes only when another controller lets it (a finalizer on an object inside), another
controller's finalizer on the namespace itself, or someone else deleting the namespace at the
same moment (which the API server answers, since Kubernetes 1.17, with the terminating
namespace rather than a 409 Conflict). The deletion is under way in each case; the cluster
goes as soon as its namespace does, and the delete intent never ends in the dead-letter
stream.

The clusters run fake pods (nothing here needs a running control plane); no resync runs during
these tests, so what finishes a deletion is the provisioner following it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from libs.common.bus import Bus
from libs.common.contract import DLQ_STREAM, INTENTS_STREAM
from libs.common.settings import Settings
from services.provisioner import names
from tests.support.kube_harness import (
    SMALL,
    Management,
    phase,
    provisioner_settings,
    unique,
    wait_cluster,
)

from .test_provisioner import create, management_side_ready, provisioner_without_resync

HOLD_FINALIZER = "example.com/hold"
HOLDER = "held-by-another-controller"


async def dead_letters(bus: Bus) -> list[object]:
    sub = await bus.nc.jetstream().pull_subscribe("nest.dlq.provisioner", stream=DLQ_STREAM)
    try:
        return list(await sub.fetch(100, timeout=0.5))
    except Exception:
        return []
    finally:
        await sub.unsubscribe()


async def intents_published(bus: Bus) -> int:
    """The sequence of the last intent published so far."""
    return int((await bus.nc.jetstream().stream_info(INTENTS_STREAM)).state.last_seq)


async def intents_done(bus: Bus, after: int) -> None:
    """Wait until an intent was published after sequence `after` and every intent is off the
    work-queue stream: acked, because it was done or because it was dead-lettered."""
    for _ in range(1200):
        state = (await bus.nc.jetstream().stream_info(INTENTS_STREAM)).state
        if state.last_seq > after and state.messages == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the provisioner never finished with the delete intent")


def gone(cluster: dict[str, object]) -> bool:
    return cluster.get("status") == 404


@pytest.fixture
async def namespaces(management: Management) -> AsyncIterator[list[str]]:
    """Namespaces of the test's clusters: released (the test's finalizers removed) and deleted
    at its end, whatever happened."""
    found: list[str] = []
    yield found
    for namespace in found:
        await release(management, namespace)
        await management.api.merge_patch(
            f"/api/v1/namespaces/{namespace}", {"metadata": {"finalizers": None}}
        )
        await management.api.delete(f"/api/v1/namespaces/{namespace}")


async def hold_content(management: Management, namespace: str) -> None:
    """An object in the namespace that another controller has not finalized yet: the
    namespace's deletion waits for it (its `spec.finalizers` stay until it is gone)."""
    await management.api.create(
        f"/api/v1/namespaces/{namespace}/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": HOLDER, "finalizers": [HOLD_FINALIZER]},
        },
    )


async def release(management: Management, namespace: str) -> None:
    """That controller is done: the object (and so the namespace) may go."""
    await management.api.merge_patch(
        f"/api/v1/namespaces/{namespace}/configmaps/{HOLDER}", {"metadata": {"finalizers": None}}
    )


async def created_cluster(
    api: httpx.AsyncClient, namespaces: list[str], prefix: str
) -> tuple[dict[str, Any], str]:
    """A cluster (fake pods) whose objects are all in place, and its namespace."""
    name = unique(prefix)
    namespace = names.namespace_for(name)
    namespaces.append(namespace)
    created = await create(api, name, **SMALL)
    await wait_cluster(api, created["id"], management_side_ready)
    return created, namespace


async def test_a_namespace_terminating_past_the_delete_timeout_is_waited_for(
    api: httpx.AsyncClient,
    bus: Bus,
    settings: Settings,
    nats_url: str,
    management: Management,
    namespaces: list[str],
) -> None:
    # Few deliveries and a short wait per delivery: a delete that treated a namespace still
    # terminating as a failure would reach the dead-letter stream within a second.
    configured = provisioner_settings(settings, management.kubeconfig, max_deliver=2)
    async with provisioner_without_resync(configured, nats_url, delete_timeout_seconds=0.3):
        created, namespace = await created_cluster(api, namespaces, "slowgone")
        await hold_content(management, namespace)
        published = await intents_published(bus)
        assert (await api.delete(f"/api/v1/clusters/{created['id']}")).status_code in (200, 202)
        # The delete intent is done with (not dead-lettered: see the end) while the
        # namespace is still there.
        await intents_done(bus, published)
        terminating = await management.get(f"/api/v1/namespaces/{namespace}")
        assert terminating is not None and terminating["metadata"]["deletionTimestamp"]
        assert terminating["spec"]["finalizers"] == ["kubernetes"]  # content still there
        await wait_cluster(api, created["id"], phase("Deleting"))
        await release(management, namespace)
        await wait_cluster(api, created["id"], gone)
        assert await management.get(f"/api/v1/namespaces/{namespace}") is None
    assert await dead_letters(bus) == []


async def test_a_namespace_held_by_a_finalizer_is_waited_for_until_it_goes(
    api: httpx.AsyncClient,
    bus: Bus,
    settings: Settings,
    nats_url: str,
    management: Management,
    namespaces: list[str],
) -> None:
    configured = provisioner_settings(settings, management.kubeconfig, max_deliver=2)
    async with provisioner_without_resync(configured, nats_url, delete_timeout_seconds=0.3):
        created, namespace = await created_cluster(api, namespaces, "held")
        path = f"/api/v1/namespaces/{namespace}"
        # Another controller keeps the namespace until it has cleaned up after itself.
        await management.api.merge_patch(
            path, {"metadata": {"finalizers": ["example.com/cleanup"]}}
        )
        published = await intents_published(bus)
        await api.delete(f"/api/v1/clusters/{created['id']}")
        await intents_done(bus, published)
        held = await management.get(path)
        assert held is not None and held["status"]["phase"] == "Terminating"
        await wait_cluster(api, created["id"], phase("Deleting"))
        await management.api.merge_patch(path, {"metadata": {"finalizers": None}})
        # The provisioner notices by itself (no resync runs in this test).
        await wait_cluster(api, created["id"], gone)
    assert await dead_letters(bus) == []


async def test_someone_else_deleting_the_namespace_at_the_same_moment_is_waited_for(
    api: httpx.AsyncClient,
    bus: Bus,
    settings: Settings,
    nats_url: str,
    management: Management,
    namespaces: list[str],
) -> None:
    configured = provisioner_settings(settings, management.kubeconfig, max_deliver=2)
    async with provisioner_without_resync(configured, nats_url):
        created, namespace = await created_cluster(api, namespaces, "raced")
        path = f"/api/v1/namespaces/{namespace}"
        await hold_content(management, namespace)  # the namespace terminates for a while
        # The provisioner's DELETE is held back (and then dropped, so it sends it again) while
        # an administrator deletes the namespace: the provisioner's next DELETE finds it
        # terminating already.
        held = management.proxy.fail("DELETE", f"^{path}$", status=None, delay=0.5)
        await api.delete(f"/api/v1/clusters/{created['id']}")
        for _ in range(1200):
            if held.hits:
                break
            await asyncio.sleep(0.01)
        assert held.hits == 1
        assert await management.api.delete(path)
        # What that next DELETE gets from the API server (since Kubernetes 1.17, not a 409
        # Conflict): the namespace, terminating.
        again = await management.api.request("DELETE", path)
        assert again is not None and again["metadata"]["deletionTimestamp"]
        assert again["status"]["phase"] == "Terminating"
        for _ in range(1200):
            if management.proxy.requests[("DELETE", path)] >= 2:
                break
            await asyncio.sleep(0.01)
        assert management.proxy.requests[("DELETE", path)] == 2
        await wait_cluster(api, created["id"], phase("Deleting"))
        await release(management, namespace)
        await wait_cluster(api, created["id"], gone)
    assert await dead_letters(bus) == []
