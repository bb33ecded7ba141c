"""The cluster API on SQLite and PostgreSQL, with the real bus: rules, intents, projection."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from libs.common.bus import Bus
from libs.common.contract import INTENTS_STREAM, Envelope
from libs.common.contract.cluster import ClusterDeleted, ClusterStatusChanged, Condition
from libs.common.contract.versions import NEWEST_VERSION, SUPPORTED_VERSIONS

URL = "/api/v1/clusters"


async def create(api: httpx.AsyncClient, name: str = "demo", **body: Any) -> dict[str, Any]:
    response = await api.post(URL, json={"name": name, **body})
    assert response.status_code == 201, response.text
    return response.json()


async def intents(bus: Bus, count: int, timeout: float = 5.0) -> list[Envelope]:
    """Take `count` intents off the work queue, as the provisioner would."""
    sub = await bus.nc.jetstream().pull_subscribe(
        "nest.intent.provisioner.>", durable="test-provisioner", stream=INTENTS_STREAM
    )
    got: list[Envelope] = []
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while len(got) < count and asyncio.get_running_loop().time() < deadline:
            try:
                msgs = await sub.fetch(count - len(got), timeout=0.5)
            except Exception:
                continue
            for msg in msgs:
                got.append(Envelope.from_bytes(msg.data))
                await msg.ack_sync()
    finally:
        await sub.unsubscribe()
    return got


def status_event(
    cluster_id: str, generation: int, phase: str = "Ready", **extra: Any
) -> ClusterStatusChanged:
    return ClusterStatusChanged(
        cluster_id=cluster_id,
        observed_generation=generation,
        phase=phase,  # type: ignore[arg-type]
        conditions=[
            Condition(
                type="ControlPlaneReady",
                status="True",
                reason="Available",
                message="2/2 replicas ready",
                last_transition_time=datetime.now(UTC),
            )
        ],
        **extra,
    )


async def wait_for(
    api: httpx.AsyncClient, cluster_id: str, predicate: Any, timeout: float = 5.0
) -> httpx.Response:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await api.get(f"{URL}/{cluster_id}")
        if predicate(response):
            return response
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached: {response.status_code} {response.text}")
        await asyncio.sleep(0.05)


class TestCreate:
    async def test_name_only_gets_every_default(self, api: httpx.AsyncClient) -> None:
        cluster = await create(api)
        assert cluster["generation"] == 1
        assert cluster["spec"]["kubernetesVersion"] == NEWEST_VERSION
        assert cluster["spec"]["controlPlane"] == {"replicas": 2}
        assert cluster["spec"]["datastore"]["replicas"] == 3
        assert cluster["spec"]["network"]["serviceType"] == "LoadBalancer"
        assert cluster["status"]["phase"] == "Pending"
        assert cluster["status"]["observedGeneration"] == 0
        assert cluster["createdAt"] == cluster["updatedAt"]
        fetched = (await api.get(f"{URL}/{cluster['id']}")).json()
        assert fetched == cluster

    async def test_create_publishes_a_self_contained_reconcile_intent(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        cluster = await create(api, labels={"team": "payments"})
        [envelope] = await intents(bus, 1)
        assert envelope.type == "io.nest.cluster.reconcile.v1"
        assert envelope.subject == cluster["id"]
        assert envelope.source == "/nest/api"
        assert envelope.correlationid
        assert envelope.data["generation"] == 1
        assert envelope.data["spec"] == cluster["spec"]
        assert envelope.data["labels"] == {"team": "payments"}

    async def test_duplicate_name_is_409(self, api: httpx.AsyncClient) -> None:
        await create(api)
        response = await api.post(URL, json={"name": "demo"})
        assert response.status_code == 409
        assert response.headers["content-type"] == "application/problem+json"
        assert "demo" in response.json()["detail"]

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"name": "Bad_Name"}, "name"),
            ({"name": "-x"}, "name"),
            ({"name": "a" * 64}, "name"),
            ({}, "name"),
            ({"name": "x", "spec": {"kubernetesVersion": "1.20.0"}}, "spec.kubernetesVersion"),
            (
                {"name": "x", "spec": {"controlPlane": {"replicas": 0}}},
                "spec.controlPlane.replicas",
            ),
            (
                {"name": "x", "spec": {"controlPlane": {"replicas": 6}}},
                "spec.controlPlane.replicas",
            ),
            ({"name": "x", "spec": {"datastore": {"replicas": 2}}}, "spec.datastore.replicas"),
            ({"name": "x", "spec": {"datastore": {"kind": "mysql"}}}, "spec.datastore.kind"),
            (
                {"name": "x", "spec": {"datastore": {"storageSize": "ten gigs"}}},
                "spec.datastore.storageSize",
            ),
            (
                {"name": "x", "spec": {"network": {"serviceType": "ClusterIP"}}},
                "spec.network.serviceType",
            ),
            (
                {"name": "x", "spec": {"network": {"podCidr": "10.0.0.0/33"}}},
                "spec.network.podCidr",
            ),
            (
                {"name": "x", "spec": {"network": {"serviceCidr": "10.0.0.1/16"}}},
                "spec.network.serviceCidr",
            ),
            ({"name": "x", "spec": {"network": {"podCidr": "10.96.0.0/16"}}}, "spec.network"),
            (
                {"name": "x", "spec": {"addons": {"coreDNS": {"enabled": "maybe"}}}},
                "spec.addons.coreDNS.enabled",
            ),
            (
                {"name": "x", "spec": {"controlPlane": {"replicas": 1, "cpu": 4}}},
                "spec.controlPlane.cpu",
            ),
            ({"name": "x", "color": "blue"}, "color"),
            ({"name": "x", "labels": {"bad key!": "v"}}, "labels"),
            ({"name": "x", "labels": {"k": "v" * 64}}, "labels"),
        ],
    )
    async def test_validation_names_the_field(
        self, api: httpx.AsyncClient, body: dict[str, Any], field: str
    ) -> None:
        response = await api.post(URL, json=body)
        assert response.status_code == 422, response.text
        problem = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        assert problem["status"] == 422
        assert field in [e["field"] for e in problem["errors"]], problem
        assert (await api.get(URL)).json()["items"] == []

    async def test_malformed_json_is_422_not_500(self, api: httpx.AsyncClient) -> None:
        response = await api.post(
            URL, content=b"{nope", headers={"content-type": "application/json"}
        )
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"

    async def test_every_supported_version_is_accepted(self, api: httpx.AsyncClient) -> None:
        for i, version in enumerate(SUPPORTED_VERSIONS):
            cluster = await create(api, f"v{i}", spec={"kubernetesVersion": f"v{version}"})
            assert cluster["spec"]["kubernetesVersion"] == version


class TestReadAndList:
    async def test_unknown_id_is_404_problem(self, api: httpx.AsyncClient) -> None:
        response = await api.get(f"{URL}/nope")
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["title"] == "Not Found"
        for method in ("PATCH", "DELETE"):
            response = await api.request(method, f"{URL}/nope", json={})
            assert response.status_code == 404

    async def test_pages_cover_everything_once_in_creation_order(
        self, api: httpx.AsyncClient
    ) -> None:
        names = [f"c{i:02d}" for i in range(7)]
        for name in names:
            await create(api, name)
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = (await api.get(URL, params=params)).json()
            seen += [item["name"] for item in page["items"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert seen == names

    async def test_bad_cursor_and_limit_are_422(self, api: httpx.AsyncClient) -> None:
        assert (await api.get(URL, params={"cursor": "!!!"})).status_code == 422
        response = await api.get(URL, params={"limit": 501})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "limit"


class TestPatch:
    async def test_spec_change_bumps_generation_and_sends_the_full_spec(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        cluster = await create(api)
        response = await api.patch(
            f"{URL}/{cluster['id']}", json={"spec": {"controlPlane": {"replicas": 3}}}
        )
        assert response.status_code == 200, response.text
        patched = response.json()
        assert patched["generation"] == 2
        assert patched["spec"]["controlPlane"]["replicas"] == 3
        assert patched["spec"]["datastore"] == cluster["spec"]["datastore"]
        assert patched["updatedAt"] > cluster["updatedAt"]
        first, second = await intents(bus, 2)
        assert [first.data["generation"], second.data["generation"]] == [1, 2]
        assert second.data["spec"] == patched["spec"]

    async def test_merge_patch_content_type_and_noop(self, api: httpx.AsyncClient) -> None:
        cluster = await create(api)
        response = await api.patch(
            f"{URL}/{cluster['id']}",
            content=b'{"spec": {"controlPlane": {"replicas": 2}}}',
            headers={"content-type": "application/merge-patch+json"},
        )
        assert response.status_code == 200
        assert response.json()["generation"] == 1  # nothing changed

    async def test_labels_merge_without_bumping_generation(self, api: httpx.AsyncClient) -> None:
        cluster = await create(api, labels={"a": "1", "b": "2"})
        response = await api.patch(f"{URL}/{cluster['id']}", json={"labels": {"b": None, "c": "3"}})
        assert response.json()["labels"] == {"a": "1", "c": "3"}
        assert response.json()["generation"] == 1

    async def test_one_minor_upgrade_and_patch_versions_are_allowed(
        self, api: httpx.AsyncClient
    ) -> None:
        cluster = await create(api, spec={"kubernetesVersion": "1.34.1"})
        response = await api.patch(
            f"{URL}/{cluster['id']}", json={"spec": {"kubernetesVersion": "1.34.2"}}
        )
        assert response.status_code == 200
        response = await api.patch(
            f"{URL}/{cluster['id']}", json={"spec": {"kubernetesVersion": "1.35.0"}}
        )
        assert response.status_code == 200
        assert response.json()["generation"] == 3

    @pytest.mark.parametrize(
        ("start", "target", "words"),
        [("1.33.5", "1.35.0", "skips a minor"), ("1.35.0", "1.34.2", "downgrade")],
    )
    async def test_skip_and_downgrade_are_refused(
        self, api: httpx.AsyncClient, start: str, target: str, words: str
    ) -> None:
        cluster = await create(api, spec={"kubernetesVersion": start})
        response = await api.patch(
            f"{URL}/{cluster['id']}", json={"spec": {"kubernetesVersion": target}}
        )
        assert response.status_code == 422
        [error] = response.json()["errors"]
        assert error["field"] == "spec.kubernetesVersion"
        assert words in error["message"]
        assert (await api.get(f"{URL}/{cluster['id']}")).json()["spec"][
            "kubernetesVersion"
        ] == start

    @pytest.mark.parametrize(
        ("patch", "field"),
        [
            ({"spec": {"network": {"podCidr": "10.200.0.0/16"}}}, "spec.network.podCidr"),
            ({"spec": {"datastore": {"replicas": 1}}}, "spec.datastore.replicas"),
            ({"spec": {"controlPlane": {"replicas": 9}}}, "spec.controlPlane.replicas"),
            ({"spec": {"unknown": 1}}, "spec.unknown"),
            ({"name": "other"}, "name"),
            ({"labels": {"k": "v" * 70}}, "labels"),
            ({"status": {"phase": "Ready"}}, "status"),
        ],
    )
    async def test_invalid_patches_name_the_field_and_change_nothing(
        self, api: httpx.AsyncClient, patch: dict[str, Any], field: str
    ) -> None:
        cluster = await create(api)
        response = await api.patch(f"{URL}/{cluster['id']}", json=patch)
        assert response.status_code == 422, response.text
        assert field in [e["field"] for e in response.json()["errors"]]
        assert (await api.get(f"{URL}/{cluster['id']}")).json() == cluster


class TestDeleteAndProjection:
    async def test_status_events_are_projected(self, api: httpx.AsyncClient, bus: Bus) -> None:
        cluster = await create(api)
        await bus.publish(
            status_event(cluster["id"], 1, endpoint={"host": "10.0.0.10", "port": 6443}),
            source="provisioner",
            subject=cluster["id"],
        )
        response = await wait_for(
            api, cluster["id"], lambda r: r.json()["status"]["phase"] == "Ready"
        )
        status = response.json()["status"]
        assert status["observedGeneration"] == 1
        assert status["endpoint"] == {"host": "10.0.0.10", "port": 6443}
        assert status["conditions"][0]["type"] == "ControlPlaneReady"
        assert status["conditions"][0]["lastTransitionTime"].endswith("Z")

    async def test_stale_events_are_ignored(self, api: httpx.AsyncClient, bus: Bus) -> None:
        cluster = await create(api)
        await api.patch(f"{URL}/{cluster['id']}", json={"spec": {"controlPlane": {"replicas": 3}}})
        await bus.publish(status_event(cluster["id"], 2, "Ready"), source="provisioner")
        await wait_for(api, cluster["id"], lambda r: r.json()["status"]["observedGeneration"] == 2)
        # An older generation's report arriving late must not overwrite the newer one.
        await bus.publish(status_event(cluster["id"], 1, "Provisioning"), source="provisioner")
        await bus.publish(
            status_event(cluster["id"], 2, "Degraded", reason="EtcdQuorumLost"),
            source="provisioner",
        )
        response = await wait_for(
            api, cluster["id"], lambda r: r.json()["status"]["phase"] == "Degraded"
        )
        assert response.json()["status"]["observedGeneration"] == 2
        assert response.json()["status"]["reason"] == "EtcdQuorumLost"

    async def test_delete_marks_deleting_and_the_row_goes_on_deleted(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        cluster = await create(api)
        response = await api.delete(f"{URL}/{cluster['id']}")
        assert response.status_code == 202
        assert response.json()["status"]["phase"] == "Deleting"
        again = await api.delete(f"{URL}/{cluster['id']}")
        assert again.status_code == 202
        reconcile, delete = await intents(bus, 2)
        assert delete.type == "io.nest.cluster.delete.v1"
        assert (await intents(bus, 1, timeout=1)) == []  # the repeated DELETE sent nothing new
        patch = await api.patch(
            f"{URL}/{cluster['id']}", json={"spec": {"controlPlane": {"replicas": 1}}}
        )
        assert patch.status_code == 409
        # A late status report does not resurrect it.
        await bus.publish(status_event(cluster["id"], 1, "Ready"), source="provisioner")
        await asyncio.sleep(0.3)
        assert (await api.get(f"{URL}/{cluster['id']}")).json()["status"]["phase"] == "Deleting"
        await bus.publish(
            ClusterDeleted(cluster_id=cluster["id"], observed_generation=1), source="provisioner"
        )
        await wait_for(api, cluster["id"], lambda r: r.status_code == 404)
        # The name is free again.
        await create(api)

    async def test_deleted_event_for_a_live_cluster_is_ignored(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        cluster = await create(api)
        await bus.publish(
            ClusterDeleted(cluster_id=cluster["id"], observed_generation=1), source="provisioner"
        )
        await bus.publish(status_event(cluster["id"], 1), source="provisioner")
        await wait_for(api, cluster["id"], lambda r: r.json()["status"]["phase"] == "Ready")

    async def test_unknown_event_types_do_not_stop_the_projector(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        cluster = await create(api)
        bogus = Envelope(source="/nest/x", type="io.nest.thing.unknown.v1", data={})
        await bus.publish_envelope("nest.event.thing.unknown", bogus)
        await bus.publish(status_event(cluster["id"], 1), source="provisioner")
        await wait_for(api, cluster["id"], lambda r: r.json()["status"]["phase"] == "Ready")


class TestHealth:
    async def test_healthz_and_readyz(self, api: httpx.AsyncClient) -> None:
        assert (await api.get("/healthz")).json() == {"status": "ok"}
        ready = await api.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {
            "database": True,
            "nats": True,
            "outboxRelay": True,
            "projector": True,
        }

    async def test_openapi_document(self, api: httpx.AsyncClient) -> None:
        document = (await api.get("/api/v1/openapi.json")).json()
        operations = {
            op["operationId"] for path in document["paths"].values() for op in path.values()
        }
        assert {
            "createCluster",
            "listClusters",
            "getCluster",
            "updateCluster",
            "deleteCluster",
        } <= operations

    async def test_correlation_id_is_echoed(self, api: httpx.AsyncClient) -> None:
        response = await api.get(URL, headers={"X-Correlation-ID": "req-123"})
        assert response.headers["x-correlation-id"] == "req-123"
