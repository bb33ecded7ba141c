"""Cluster restores in the API on SQLite and PostgreSQL: POST checks the backup against the
backups the API projected (422 naming backupId), refuses a second restore and a cluster being
deleted (409), stages PrepareRestore through the outbox; real RestoreProgressed events on the bus
are projected onto the restore, never backwards from a finished one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from libs.common.bus import Bus
from libs.common.contract.backup import BackupCompleted, BackupStarted
from libs.common.contract.restore import RestoreProgressed
from tests.integration.api.test_conventions import as_token, new_token

T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)


def reference(target: str, minute: int, ident: str) -> str:
    return f"{target}/{(T0 + timedelta(minutes=minute)).strftime('%Y%m%dT%H%M%SZ')}-{ident}"


async def until(
    api: httpx.AsyncClient, path: str, check: Callable[[httpx.Response], bool]
) -> httpx.Response:
    deadline = asyncio.get_running_loop().time() + 10.0
    while True:
        response = await api.get(path)
        if check(response):
            return response
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{path}: {response.status_code} {response.text}")
        await asyncio.sleep(0.05)


async def completed_backup(
    api: httpx.AsyncClient, bus: Bus, ref: str, *, kind: str = "etcd", complete: bool = True
) -> str:
    target = ref.split("/", maxsplit=1)[0]
    await bus.publish(
        BackupStarted(target=target, kind=kind, backup=ref, started_at=T0),  # type: ignore[arg-type]
        source="backup",
        subject=target,
    )
    if complete:
        await bus.publish(
            BackupCompleted(
                target=target,
                kind=kind,  # type: ignore[arg-type]
                backup=ref,
                completed_at=T0,
                stored_bytes=10,
                plaintext_sha256="a" * 64,
                encrypted=False,
                verified=True,
                etcd_revision=77 if kind == "etcd" else None,
                location_id="loc-1" if kind == "etcd" else None,
            ),
            source="backup",
            subject=target,
        )
    ident = ref.split("/")[1]
    state = "Completed" if complete else "Running"
    await until(
        api,
        f"/api/v1/backups/{ident}",
        lambda r: r.status_code == 200 and r.json()["state"] == state,
    )
    return ident


async def new_cluster(api: httpx.AsyncClient, name: str) -> str:
    response = await api.post("/api/v1/clusters", json={"name": name})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def fields(response: httpx.Response) -> list[str]:
    return [error["field"] for error in response.json().get("errors", [])]


def progressed(restore: dict[str, Any], phase: str, **extra: Any) -> RestoreProgressed:
    return RestoreProgressed(
        restore_id=restore["id"],
        cluster_id=restore["clusterId"],
        backup=restore["backupRef"],
        phase=phase,  # type: ignore[arg-type]
        at=datetime.now(UTC),
        **extra,
    )


class TestRestores:
    async def test_request_validation_conflicts_and_the_staged_intent(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        cluster_id = await new_cluster(api, "demo")
        url = f"/api/v1/clusters/{cluster_id}/restores"
        good = await completed_backup(api, bus, reference("cluster-demo", 0, "0a1b2c3d"))
        running = await completed_backup(
            api, bus, reference("cluster-demo", 1, "0a1b2c3e"), complete=False
        )
        foundry = await completed_backup(
            api, bus, reference("foundry", 2, "0a1b2c3f"), kind="foundry"
        )
        other = await completed_backup(api, bus, reference("cluster-other", 3, "0a1b2c40"))

        for body, message in (
            ({}, "Field required"),
            ({"backupId": "not-an-id"}, "pattern"),
            ({"backupId": good, "force": "maybe"}, "boolean"),
            ({"backupId": "20260101T000000Z-ffffffff"}, "does not exist"),
            ({"backupId": running}, "Running"),
            ({"backupId": foundry}, "foundry backup"),
            ({"backupId": other}, "set force"),
        ):
            response = await api.post(url, json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert fields(response) in (["backupId"], ["force"]), response.text
            assert message in response.text, response.text
        missing = await api.post(
            "/api/v1/clusters/no-such-cluster/restores", json={"backupId": good}
        )
        assert missing.status_code == 404
        # A NUL matches nothing (PostgreSQL would refuse it in a query: never a 500).
        nul = await api.post("/api/v1/clusters/a%00b/restores", json={"backupId": good})
        assert nul.status_code == 404, nul.text
        assert (await api.get("/api/v1/clusters/a%00b/restores")).status_code == 404
        assert (await api.get(f"{url}/a%00b")).status_code == 404
        nul_id = await api.post(url, json={"backupId": "20260101T000000Z-0a1b2c3d\x00"})
        assert nul_id.status_code == 422 and fields(nul_id) == ["backupId"], nul_id.text

        intents: list[dict[str, Any]] = []

        async def collect(msg: Any) -> None:
            intents.append(json.loads(msg.data))

        subscription = await bus.nc.subscribe("nest.intent.backup.restore_prepare", cb=collect)
        try:
            response = await api.post(url, json={"backupId": good})
            assert response.status_code == 202, response.text
            restore = response.json()
            assert response.headers["location"] == f"{url}/{restore['id']}"
            assert restore["phase"] == "Pending" and restore["clusterId"] == cluster_id
            assert restore["backupId"] == good
            assert restore["backupRef"] == f"cluster-demo/{good}"
            assert restore["locationId"] == "loc-1" and restore["force"] is False
            assert [step["phase"] for step in restore["history"]] == ["Pending"]

            again = await api.post(url, json={"backupId": good})
            assert again.status_code == 409, again.text
            assert restore["id"] in again.json()["detail"]

            for _ in range(100):
                if intents:
                    break
                await asyncio.sleep(0.05)
        finally:
            await subscription.unsubscribe()
        (envelope,) = intents
        assert envelope["type"] == "io.nest.restore.prepare.v1"
        assert envelope["data"] == {
            "restoreId": restore["id"],
            "clusterId": cluster_id,
            "clusterName": "demo",
            "backup": f"cluster-demo/{good}",
            "locationId": "loc-1",
            "force": False,
        }

        # Another cluster's backup goes with force; a cluster being deleted is refused.
        other_cluster = await new_cluster(api, "second")
        forced = await api.post(
            f"/api/v1/clusters/{other_cluster}/restores", json={"backupId": other, "force": True}
        )
        assert forced.status_code == 202, forced.text
        doomed = await new_cluster(api, "doomed")
        assert (await api.delete(f"/api/v1/clusters/{doomed}")).status_code == 202
        refused = await api.post(f"/api/v1/clusters/{doomed}/restores", json={"backupId": good})
        assert refused.status_code == 409, refused.text

        # Reading: a viewer may, the restore is only found under its own cluster.
        viewer = await new_token(api, "viewer")
        headers = as_token(api, viewer["token"])
        listing = await api.get(url, headers=headers)
        assert listing.status_code == 200
        assert [item["id"] for item in listing.json()["items"]] == [restore["id"]]
        one = await api.get(f"{url}/{restore['id']}", headers=headers)
        assert one.status_code == 200 and one.json()["id"] == restore["id"]
        wrong = await api.get(f"/api/v1/clusters/{other_cluster}/restores/{restore['id']}")
        assert wrong.status_code == 404
        denied = await api.post(url, json={"backupId": good}, headers=headers)
        assert denied.status_code == 403

    async def test_progress_is_projected_forward_only(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        cluster_id = await new_cluster(api, "demo")
        url = f"/api/v1/clusters/{cluster_id}/restores"
        good = await completed_backup(api, bus, reference("cluster-demo", 0, "1a1b2c3d"))
        restore = (await api.post(url, json={"backupId": good})).json()
        path = f"{url}/{restore['id']}"

        for event in (
            progressed(restore, "Verifying"),
            progressed(restore, "Staged", etcd_revision=80),
            progressed(restore, "Verifying"),  # late duplicate: ignored
            progressed(restore, "ScalingDown"),
        ):
            await bus.publish(event, source="backup", subject=restore["id"])
        body = (await until(api, path, lambda r: r.json()["phase"] == "ScalingDown")).json()
        await asyncio.sleep(0.3)
        body = (await api.get(path)).json()
        assert [s["phase"] for s in body["history"]] == [
            "Pending",
            "Verifying",
            "Staged",
            "ScalingDown",
        ]
        assert body["etcdRevision"] == 80 and body["finishedAt"] is None

        await bus.publish(
            progressed(restore, "Failed", reason="JobFailed", message="restore Job failed"),
            source="provisioner",
            subject=restore["id"],
        )
        body = (await until(api, path, lambda r: r.json()["phase"] == "Failed")).json()
        assert (body["reason"], body["message"]) == ("JobFailed", "restore Job failed")
        assert body["finishedAt"] is not None
        # Nothing moves a finished restore, not even a later phase.
        await bus.publish(progressed(restore, "Succeeded"), source="provisioner", subject="x")
        await asyncio.sleep(0.3)
        final = (await api.get(path)).json()
        assert final["phase"] == "Failed" and final["reason"] == "JobFailed"
        assert [s["phase"] for s in final["history"]][-1] == "Failed"
        assert "Succeeded" not in [s["phase"] for s in final["history"]]

        # Finished: the cluster may be restored again, and that one can succeed.
        second = await api.post(url, json={"backupId": good, "force": True})
        assert second.status_code == 202, second.text
        again = second.json()
        for phase in ("Verifying", "Staged", "ScalingDown", "Restoring", "ScalingUp", "Succeeded"):
            await bus.publish(progressed(again, phase), source="provisioner", subject=again["id"])
        done = (
            await until(api, f"{url}/{again['id']}", lambda r: r.json()["phase"] == "Succeeded")
        ).json()
        assert [s["phase"] for s in done["history"]][-1] == "Succeeded"
        listing = (await api.get(url)).json()
        assert [item["id"] for item in listing["items"]] == [restore["id"], again["id"]]
        paged = await api.get(url, params={"limit": 1})
        assert [item["id"] for item in paged.json()["items"]] == [restore["id"]]
        assert paged.json()["next"] and 'rel="next"' in paged.headers["link"]
