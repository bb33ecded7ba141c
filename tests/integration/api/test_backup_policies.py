"""Backup policies on SQLite and PostgreSQL: CRUD with ETags and pagination, validation naming
the field, the default policy, a location in use, and the intents and events staged for the
backup service (read back from the real NATS streams the outbox relay publishes to)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.common.bus import Bus
from libs.common.contract import EVENTS_STREAM, INTENTS_STREAM, Envelope
from libs.common.secrets import Sealer
from services.api.backup_locations.sync import restage_all
from services.backup.service import serve_probe_location
from tests.support.s3 import SeaweedS3, s3_server

__all__ = ["s3_server"]

URL = "/api/v1/backup-policies"
LOCATIONS = "/api/v1/backup-locations"
MERGE = {"Content-Type": "application/merge-patch+json"}


@pytest.fixture
async def responder(bus: Bus) -> AsyncIterator[None]:
    """The backup service's probe responder, so backup locations can be created."""
    subscription = await serve_probe_location(bus)
    yield
    await subscription.unsubscribe()


def fields(response: httpx.Response) -> list[str]:
    return [error["field"] for error in response.json().get("errors", [])]


async def drain(
    bus: Bus, stream: str, subject: str, durable: str, wanted: int, timeout: float = 5.0
) -> list[Envelope]:
    """Up to `wanted` messages on `subject` (acked), waiting at most `timeout` for them."""
    sub = await bus.nc.jetstream().pull_subscribe(subject, durable=durable, stream=stream)
    got: list[Envelope] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while len(got) < wanted and loop.time() < deadline:
            try:
                msgs = await sub.fetch(wanted - len(got), timeout=0.5)
            except Exception:
                continue
            for msg in msgs:
                got.append(Envelope.from_bytes(msg.data))
                await msg.ack_sync()
    finally:
        await sub.unsubscribe()
    return got


async def intents(bus: Bus, wanted: int, timeout: float = 5.0) -> list[Envelope]:
    return await drain(
        bus, INTENTS_STREAM, "nest.intent.backup.>", "test-policies", wanted, timeout
    )


async def declared(bus: Bus, wanted: int, timeout: float = 5.0) -> list[Envelope]:
    return await drain(
        bus, EVENTS_STREAM, "nest.event.cluster.declared", "test-declared", wanted, timeout
    )


async def new_location(api: httpx.AsyncClient, tmp_path: Path, name: str) -> dict[str, Any]:
    response = await api.post(
        LOCATIONS, json={"name": name, "spec": {"kind": "local", "path": str(tmp_path / name)}}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def policy_body(location_id: str, **spec: Any) -> dict[str, Any]:
    return {
        "name": spec.pop("name", "nightly"),
        "labels": {"tier": "gold"},
        "spec": {
            "schedule": "0 2 * * *",
            "targets": {"foundry": True},
            "locationId": location_id,
            **spec,
        },
    }


@pytest.mark.usefixtures("responder")
class TestDefaultPolicy:
    async def test_first_location_brings_the_default_policy_second_does_not(
        self, api: httpx.AsyncClient, bus: Bus, tmp_path: Path
    ) -> None:
        first = await new_location(api, tmp_path, "disk")
        listed = (await api.get(URL)).json()["items"]
        assert [p["name"] for p in listed] == ["default"]
        default = listed[0]
        assert default["spec"] == {
            "schedule": "0 * * * *",
            "targets": {"foundry": True, "allClusters": True, "clusterIds": []},
            "locationId": first["id"],
            "retention": {"keepLast": 24, "keepDays": 7},
            "encrypted": False,
            "rpoMinutes": None,
            "drillSchedule": "0 3 * * 0",
        }
        assert default["generation"] == 1
        await new_location(api, tmp_path, "other")
        assert [p["name"] for p in (await api.get(URL)).json()["items"]] == ["default"]

        staged = await intents(bus, 4)
        assert [e.type for e in staged] == [
            "io.nest.backup.location_apply.v1",
            "io.nest.backup.policy_apply.v1",
            "io.nest.backup.location_apply.v1",
        ]
        assert staged[0].data["locationId"] == first["id"]
        assert staged[0].data["location"]["spec"]["path"] == str(tmp_path / "disk")
        assert staged[1].data["policyId"] == default["id"]
        assert staged[1].data["spec"]["targets"]["allClusters"] is True

        # The default's location cannot go while the policy uses it; the other one can.
        refused = await api.delete(f"{LOCATIONS}/{first['id']}")
        assert refused.status_code == 409, refused.text
        assert "'default'" in refused.json()["detail"]
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert (await api.get(f"{LOCATIONS}/{first['id']}")).status_code == 200


@pytest.mark.usefixtures("responder")
class TestCrud:
    async def test_create_read_patch_delete_with_etags_and_intents(
        self, api: httpx.AsyncClient, bus: Bus, tmp_path: Path
    ) -> None:
        location = await new_location(api, tmp_path, "disk")
        spare = await new_location(api, tmp_path, "spare")
        cluster = (await api.post("/api/v1/clusters", json={"name": "demo"})).json()
        response = await api.post(
            URL,
            json=policy_body(
                location["id"],
                targets={"foundry": True, "clusterIds": [cluster["id"]]},
                retention={"keepLast": 3},
                encrypted=True,
                rpoMinutes=1500,
            ),
        )
        assert response.status_code == 201, response.text
        created = response.json()
        path = f"{URL}/{created['id']}"
        assert response.headers["location"] == path
        assert response.headers["etag"] == '"1"'
        assert created["spec"]["targets"]["clusterIds"] == [cluster["id"]]
        assert created["spec"]["encrypted"] is True
        fetched = await api.get(path)
        assert fetched.json() == created
        assert fetched.headers["etag"] == '"1"'

        taken = await api.post(URL, json=policy_body(location["id"]))
        assert taken.status_code == 409

        # Pages of one with a Link header to the next (default, then nightly).
        first = await api.get(URL, params={"limit": 1})
        assert [p["name"] for p in first.json()["items"]] == ["default"]
        assert 'rel="next"' in first.headers["link"]
        second = await api.get(URL, params={"limit": 1, "cursor": first.json()["next"]})
        assert [p["name"] for p in second.json()["items"]] == ["nightly"]
        assert second.json()["next"] is None

        stale = await api.patch(
            path, json={"spec": {"schedule": "0 4 * * *"}}, headers={**MERGE, "If-Match": '"7"'}
        )
        assert stale.status_code == 412
        labelled = await api.patch(
            path, json={"labels": {"tier": None, "team": "db"}}, headers=MERGE
        )
        assert labelled.status_code == 200, labelled.text
        assert labelled.json()["labels"] == {"team": "db"}
        assert labelled.json()["generation"] == 1  # labels are not spec
        assert labelled.headers["etag"] == '"2"'
        moved = await api.patch(
            path,
            json={"spec": {"schedule": "0 */6 * * *", "locationId": spare["id"]}},
            headers={**MERGE, "If-Match": '"2"'},
        )
        assert moved.status_code == 200, moved.text
        assert moved.json()["generation"] == 2
        assert moved.json()["spec"]["schedule"] == "0 */6 * * *"
        assert moved.json()["spec"]["retention"] == {"keepLast": 3, "keepDays": None}
        unchanged = await api.patch(path, json={"spec": {"encrypted": True}}, headers=MERGE)
        assert unchanged.json()["generation"] == 2
        assert (await api.patch(path, json={"name": "x"}, headers=MERGE)).status_code == 422

        # The spare location is now in use, the first one is still the default's.
        assert (await api.delete(f"{LOCATIONS}/{spare['id']}")).status_code == 409
        assert (await api.delete(path, headers={"If-Match": '"1"'})).status_code == 412
        assert (await api.delete(path)).status_code == 204
        assert (await api.get(path)).status_code == 404
        assert (await api.delete(path)).status_code == 404
        assert (await api.delete(f"{LOCATIONS}/{spare['id']}")).status_code == 204

        policy_intents = [
            e
            for e in await intents(bus, 7)
            if e.subject == created["id"] or e.subject == spare["id"]
        ]
        assert [(e.type.split(".")[3], e.data["generation"]) for e in policy_intents] == [
            ("location_apply", 1),  # spare
            ("policy_apply", 1),
            ("policy_apply", 2),
            ("policy_delete", 2),
            ("location_delete", 1),
        ]
        assert policy_intents[2].data["spec"]["locationId"] == spare["id"]

    async def test_viewer_reads_admin_writes(self, api: httpx.AsyncClient, tmp_path: Path) -> None:
        await new_location(api, tmp_path, "disk")
        viewer = (
            await api.post("/api/v1/tokens", json={"name": "v", "spec": {"scope": "viewer"}})
        ).json()["token"]
        operator = (
            await api.post("/api/v1/tokens", json={"name": "o", "spec": {"scope": "operator"}})
        ).json()["token"]
        listed = await api.get(URL, headers={"Authorization": f"Bearer {viewer}"})
        assert listed.status_code == 200
        policy_id = listed.json()["items"][0]["id"]
        got = await api.get(f"{URL}/{policy_id}", headers={"Authorization": f"Bearer {viewer}"})
        assert got.status_code == 200
        for token in (viewer, operator):
            refused = await api.patch(
                f"{URL}/{policy_id}",
                json={"labels": {"a": "b"}},
                headers={**MERGE, "Authorization": f"Bearer {token}"},
            )
            assert refused.status_code == 403


@pytest.mark.usefixtures("responder")
class TestValidation:
    async def test_each_bad_field_is_named(self, api: httpx.AsyncClient, tmp_path: Path) -> None:
        location = await new_location(api, tmp_path, "disk")
        cluster = (await api.post("/api/v1/clusters", json={"name": "demo"})).json()

        async def refused(body: dict[str, Any]) -> list[str]:
            response = await api.post(URL, json=body)
            assert response.status_code == 422, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            return fields(response)

        assert await refused(policy_body(location["id"], schedule="0 25 * * *")) == [
            "spec.schedule"
        ]
        assert await refused(policy_body(location["id"], drillSchedule="every sunday")) == [
            "spec.drillSchedule"
        ]
        assert await refused(policy_body("no-such-location")) == ["spec.locationId"]
        # Ids no row can have never reach the database (PostgreSQL refuses a NUL): still 422.
        assert await refused(policy_body("loc\u0000x")) == ["spec.locationId"]
        assert await refused(
            policy_body(location["id"], targets={"clusterIds": ["c\u0000", "x" * 300]})
        ) == ["spec.targets.clusterIds.0", "spec.targets.clusterIds.1"]
        assert await refused(
            policy_body(location["id"], targets={"clusterIds": [cluster["id"], "nope"]})
        ) == ["spec.targets.clusterIds.1"]
        assert await refused(policy_body(location["id"], targets={})) == ["spec.targets"]
        assert await refused(policy_body(location["id"], retention={"keepLast": 0})) == [
            "spec.retention.keepLast"
        ]
        assert await refused(policy_body(location["id"], rpoMinutes="soon")) == ["spec.rpoMinutes"]
        assert await refused({**policy_body(location["id"]), "name": "Not A Name"}) == ["name"]
        # Several at once, each named.
        assert sorted(
            await refused(policy_body("nowhere", schedule="61 * * * *", drillSchedule="* *"))
        ) == ["spec.drillSchedule", "spec.locationId", "spec.schedule"]

        default_id = (await api.get(URL)).json()["items"][0]["id"]
        path = f"{URL}/{default_id}"
        for patch, field in (
            ({"spec": {"schedule": "@fortnightly"}}, "spec.schedule"),
            ({"spec": {"locationId": "gone"}}, "spec.locationId"),
            ({"spec": {"targets": {"clusterIds": ["gone"]}}}, "spec.targets.clusterIds.0"),
            ({"spec": {"encrypted": "yes please"}}, "spec.encrypted"),
            ({"labels": {"bad key!": "x"}}, "labels"),
        ):
            response = await api.patch(path, json=patch, headers=MERGE)
            assert response.status_code == 422, (patch, response.text)
            assert fields(response) == [field]
        assert (await api.get(path)).json()["generation"] == 1

        # A cluster already named by the policy may be deleted without locking the policy.
        named = await api.patch(
            path, json={"spec": {"targets": {"clusterIds": [cluster["id"]]}}}, headers=MERGE
        )
        assert named.status_code == 200, named.text
        assert (await api.delete(f"/api/v1/clusters/{cluster['id']}")).status_code == 202
        relabelled = await api.patch(path, json={"spec": {"schedule": "5 * * * *"}}, headers=MERGE)
        assert relabelled.status_code == 200, relabelled.text


@pytest.mark.usefixtures("responder")
class TestBackupServiceFeed:
    async def test_s3_location_travels_sealed_and_everything_is_restaged(
        self, api: httpx.AsyncClient, bus: Bus, s3_server: SeaweedS3
    ) -> None:
        bucket = s3_server.new_bucket()
        spec = {
            "kind": "s3",
            "endpointUrl": s3_server.endpoint,
            "bucket": bucket,
            "accessKeyId": s3_server.access_key,
            "secretAccessKey": s3_server.secret_key,
            "pathStyle": True,
        }
        created = await api.post(LOCATIONS, json={"name": "offsite", "spec": spec})
        assert created.status_code == 201, created.text
        location_id = created.json()["id"]
        staged = await intents(bus, 2)
        assert [e.type for e in staged] == [
            "io.nest.backup.location_apply.v1",
            "io.nest.backup.policy_apply.v1",
        ]
        for envelope in staged:
            assert s3_server.secret_key not in envelope.to_bytes().decode()
        location = staged[0].data["location"]
        assert location["spec"].get("secretAccessKey") is None
        app: Any = api.app  # type: ignore[attr-defined]
        sealer: Sealer = app.state.sealer
        opened = sealer.open(
            location["sealedSecretAccessKey"], context=f"backup-location:{location_id}"
        )
        assert opened == s3_server.secret_key

        # What API start does: everything staged again, location first.
        assert await restage_all(app.state.db) == 2
        app.state.relay.notify()
        again = await intents(bus, 2)
        assert [(e.type, e.subject) for e in again] == [(e.type, e.subject) for e in staged]
        assert [e.data for e in again] == [e.data for e in staged]

    async def test_cluster_declared_on_create_spec_change_and_deletion(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        cluster = (await api.post("/api/v1/clusters", json={"name": "demo"})).json()
        path = f"/api/v1/clusters/{cluster['id']}"
        labels = await api.patch(path, json={"labels": {"a": "b"}}, headers=MERGE)
        assert labels.status_code == 200
        scaled = await api.patch(
            path, json={"spec": {"controlPlane": {"replicas": 3}}}, headers=MERGE
        )
        assert scaled.status_code == 200
        assert (await api.delete(path)).status_code == 202
        events = await declared(bus, 4, timeout=3.0)
        assert [(e.subject, e.data["generation"], e.data["deletionRequested"]) for e in events] == [
            (cluster["id"], 1, False),
            (cluster["id"], 2, False),
            (cluster["id"], 2, True),
        ]
        assert events[0].data["name"] == "demo"
        assert events[0].data["kubernetesVersion"] == cluster["spec"]["kubernetesVersion"]
        assert events[1].data["labels"] == {"a": "b"}
