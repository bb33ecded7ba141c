"""Backups in the API on SQLite and PostgreSQL: real backup events published on the bus are
projected (in any order, more than once) and read back through GET /api/v1/backups; POST
/api/v1/backups takes a location."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.common.bus import Bus
from libs.common.contract import INTENTS_STREAM, Envelope
from libs.common.contract.backup import (
    BackupCompleted,
    BackupFailed,
    BackupStarted,
    DrillFailed,
    DrillPassed,
)
from services.backup.service import serve_probe_location
from tests.integration.api.test_conventions import as_token, new_token

URL = "/api/v1/backups"
T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)


def ref(target: str, at: datetime, ident: str) -> str:
    return f"{target}/{at.strftime('%Y%m%dT%H%M%SZ')}-{ident}"


def backup_id(reference: str) -> str:
    return reference.split("/")[1]


def started(reference: str, **extra: Any) -> BackupStarted:
    target = reference.split("/", maxsplit=1)[0]
    kind = "foundry" if target == "foundry" else "etcd"
    return BackupStarted(target=target, kind=kind, backup=reference, started_at=T0, **extra)


def completed(reference: str, **extra: Any) -> BackupCompleted:
    target = reference.split("/", maxsplit=1)[0]
    values: dict[str, Any] = {
        "target": target,
        "kind": "foundry" if target == "foundry" else "etcd",
        "backup": reference,
        "completed_at": T0 + timedelta(seconds=30),
        "stored_bytes": 4096,
        "plaintext_sha256": "a" * 64,
        "encrypted": True,
        "verified": True,
        "started_at": T0,
        "plaintext_bytes": 4000,
        "stored_sha256": "b" * 64,
        "encryption_key_id": "k1",
        "duration_seconds": 30.0,
    }
    values.update(extra)
    return BackupCompleted(**values)


async def publish(bus: Bus, *payloads: Any) -> None:
    for payload in payloads:
        await bus.publish(payload, source="backup", subject=payload.target)


async def until(
    api: httpx.AsyncClient,
    path: str,
    check: Callable[[httpx.Response], bool],
    timeout: float = 10.0,
    params: Any = None,
) -> httpx.Response:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await api.get(path, params=params)
        if check(response):
            return response
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{path}: {response.status_code} {response.text}")
        await asyncio.sleep(0.05)


def fields(response: httpx.Response) -> list[str]:
    return [error["field"] for error in response.json().get("errors", [])]


class TestProjection:
    async def test_completed_before_started_and_redelivery_give_one_completed_row(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        reference = ref("foundry", T0, "0a1b2c3d")
        ident = backup_id(reference)
        # Completed first, then Started, then both again: one row, Completed, every figure.
        await publish(bus, completed(reference, location_id="loc-1"))
        await until(api, f"{URL}/{ident}", lambda r: r.status_code == 200)
        await publish(
            bus,
            started(reference, trigger="schedule", policy_id="pol-1", location_id="loc-1"),
            completed(reference, location_id="loc-1"),
            started(reference, trigger="schedule", policy_id="pol-1", location_id="loc-1"),
        )
        body = (
            await until(api, f"{URL}/{ident}", lambda r: r.json().get("policyId") == "pol-1")
        ).json()
        await asyncio.sleep(0.3)  # let the redelivered events land too
        body = (await api.get(f"{URL}/{ident}")).json()
        assert body["state"] == "Completed"
        assert body["id"] == ident and body["ref"] == reference
        assert body["target"] == "foundry" and body["kind"] == "foundry"
        assert body["trigger"] == "schedule"
        assert body["locationId"] == "loc-1"
        assert body["createdAt"].startswith("2026-11-21T10:00:00")
        assert body["startedAt"].startswith("2026-11-21T10:00:00")
        assert body["completedAt"].startswith("2026-11-21T10:00:30")
        assert (body["storedBytes"], body["plaintextBytes"]) == (4096, 4000)
        assert (body["storedSha256"], body["plaintextSha256"]) == ("b" * 64, "a" * 64)
        assert body["encrypted"] is True and body["encryptionKeyId"] == "k1"
        assert body["verified"] is True
        assert body["lastDrill"] is None
        listing = (await api.get(URL)).json()
        assert [item["id"] for item in listing["items"]] == [ident]

    async def test_failure_pruning_and_drills(self, api: httpx.AsyncClient, bus: Bus) -> None:
        old = ref("cluster-demo", T0, "00000001")
        failed = ref("cluster-demo", T0 + timedelta(hours=1), "00000002")
        new = ref("cluster-demo", T0 + timedelta(hours=2), "00000003")
        await publish(
            bus,
            started(old, cluster_id="c-1"),
            completed(old, cluster_id="c-1", etcd_revision=41, etcd_key_count=7),
            started(failed, cluster_id="c-1"),
            BackupFailed(
                target="cluster-demo",
                kind="etcd",
                backup=failed,
                failed_at=T0 + timedelta(hours=1, seconds=5),
                reason="BucketNotFound",
                message="bucket 'x' does not exist",
                cluster_id="c-1",
            ),
            # A late Started must not turn the failure back into Running.
            started(failed, cluster_id="c-1"),
            completed(new, cluster_id="c-1", etcd_revision=99, etcd_key_count=9, pruned=[old]),
        )
        listing = (
            await until(
                api,
                URL,
                lambda r: (
                    [i["state"] for i in r.json()["items"]] == ["Pruned", "Failed", "Completed"]
                ),
            )
        ).json()
        pruned_row, failed_row, new_row = listing["items"]
        # The pruned backup's own Completed, redelivered late, does not bring it back.
        await publish(bus, completed(old, cluster_id="c-1", etcd_revision=41, etcd_key_count=7))
        await asyncio.sleep(0.3)
        assert (await api.get(f"{URL}/{backup_id(old)}")).json()["state"] == "Pruned"
        assert pruned_row["etcdRevision"] == 41 and pruned_row["prunedAt"] is not None
        assert failed_row["reason"] == "BucketNotFound"
        assert "does not exist" in failed_row["message"]
        assert new_row["etcdRevision"] == 99 and new_row["etcdKeyCount"] == 9
        assert {row["clusterId"] for row in listing["items"]} == {"c-1"}

        # Drills attach to their backup; an older drill result never replaces a newer one.
        new_id = backup_id(new)
        await publish(
            bus,
            DrillPassed(
                target="cluster-demo",
                kind="etcd",
                backup=new,
                drilled_at=T0 + timedelta(hours=4),
                duration_seconds=2.5,
                etcd_revision=99,
                etcd_key_count=9,
            ),
            DrillFailed(
                target="cluster-demo",
                kind="etcd",
                backup=new,
                drilled_at=T0 + timedelta(hours=3),
                reason="IntegrityError",
                message="older result",
            ),
            DrillFailed(
                target="cluster-demo",
                kind="etcd",
                backup=None,
                drilled_at=T0 + timedelta(hours=5),
                reason="NoBackup",
                message="no verified backup of cluster-other",
            ),
        )
        drilled = await until(api, f"{URL}/{new_id}", lambda r: r.json()["lastDrill"] is not None)
        await asyncio.sleep(0.3)
        drill = (await api.get(f"{URL}/{new_id}")).json()["lastDrill"]
        assert drilled.status_code == 200
        assert drill["passed"] is True and drill["at"].startswith("2026-11-21T14:00:00")
        assert drill["figures"] == {"durationSeconds": 2.5, "etcdRevision": 99, "etcdKeyCount": 9}

        later = DrillFailed(
            target="cluster-demo",
            kind="etcd",
            backup=new,
            drilled_at=T0 + timedelta(hours=6),
            reason="WrongKey",
            message="key 'k1' is not the key this backup was made with",
        )
        await publish(bus, later)
        drill = (
            await until(api, f"{URL}/{new_id}", lambda r: not r.json()["lastDrill"]["passed"])
        ).json()["lastDrill"]
        assert drill["reason"] == "WrongKey" and "k1" in drill["message"]
        assert len((await api.get(URL)).json()["items"]) == 3  # NoBackup made no row

    async def test_drill_of_a_backup_never_seen_creates_a_completed_row(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        reference = ref("foundry", T0, "feedf00d")
        await publish(
            bus,
            DrillPassed(
                target="foundry",
                kind="foundry",
                backup=reference,
                drilled_at=T0 + timedelta(hours=1),
                duration_seconds=1.0,
                table_rows={"clusters": 2, "api_tokens": 3},
                location_id="loc-9",
            ),
        )
        body = (
            await until(api, f"{URL}/{backup_id(reference)}", lambda r: r.status_code == 200)
        ).json()
        assert body["state"] == "Completed" and body["verified"] is True
        assert body["locationId"] == "loc-9"
        assert body["lastDrill"]["figures"]["tableRows"] == {"clusters": 2, "api_tokens": 3}
        assert body["ref"] == reference
        missing = await api.get(f"{URL}/20260101T000000Z-00000000")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")


class TestList:
    async def test_filters_and_pagination_with_link_header(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        payloads: list[Any] = []
        for index in range(5):
            at = T0 + timedelta(minutes=index)
            payloads.append(completed(ref("foundry", at, f"f000000{index}"), location_id="loc-a"))
            payloads.append(
                completed(
                    ref("cluster-demo", at, f"c000000{index}"),
                    cluster_id="c-1",
                    policy_id="pol-1",
                )
            )
        await publish(bus, *payloads)
        await until(api, URL, lambda r: len(r.json()["items"]) == 10, params={"limit": 500})

        foundry = (await api.get(URL, params={"target": "foundry"})).json()["items"]
        assert [item["id"][-8:] for item in foundry] == [f"f000000{i}" for i in range(5)]
        assert len((await api.get(URL, params={"clusterId": "c-1"})).json()["items"]) == 5
        assert len((await api.get(URL, params={"policyId": "pol-1"})).json()["items"]) == 5
        assert len((await api.get(URL, params={"locationId": "loc-a"})).json()["items"]) == 5
        assert (await api.get(URL, params={"state": "Failed"})).json()["items"] == []
        bad = await api.get(URL, params={"state": "Exploded"})
        assert bad.status_code == 422 and fields(bad) == ["state"]
        bad = await api.get(URL, params={"cursor": "not-a-cursor"})
        assert bad.status_code == 422 and fields(bad) == ["cursor"]
        # A NUL matches nothing (PostgreSQL would refuse it in a query: never a 500).
        for name in ("target", "clusterId", "policyId", "locationId"):
            nul = await api.get(URL, params={name: "a\x00b"})
            assert nul.status_code == 200 and nul.json()["items"] == [], (name, nul.text)
        assert (await api.get(f"{URL}/a%00b")).status_code == 404

        seen: list[str] = []
        response = await api.get(URL, params={"limit": 3, "target": "foundry"})
        pages = 0
        while True:
            pages += 1
            body = response.json()
            seen += [item["id"] for item in body["items"]]
            if body["next"] is None:
                assert "link" not in response.headers
                break
            link = response.headers["link"]
            assert link.endswith('>; rel="next"') and "target=foundry" in link
            response = await api.get(link[1 : link.index(">")])
        assert pages == 2
        assert [i[-8:] for i in seen] == [f"f000000{i}" for i in range(5)]

    async def test_a_viewer_may_list_but_not_back_up(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        viewer = (await new_token(api, "viewer"))["token"]
        assert (await api.get(URL, headers=as_token(api, viewer))).status_code == 200
        refused = await api.post(URL, json={"target": "foundry"}, headers=as_token(api, viewer))
        assert refused.status_code == 403


@pytest.fixture
async def responder(bus: Bus) -> AsyncIterator[None]:
    subscription = await serve_probe_location(bus)
    yield
    await subscription.unsubscribe()


async def backup_intents(bus: Bus, count: int, timeout: float = 5.0) -> list[Envelope]:
    sub = await bus.nc.jetstream().pull_subscribe(
        "nest.intent.backup.run", durable="test-backups", stream=INTENTS_STREAM
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


class TestRequest:
    @pytest.mark.usefixtures("responder")
    async def test_location_or_policy_goes_into_the_intent(
        self, api: httpx.AsyncClient, bus: Bus, tmp_path: Path
    ) -> None:
        location = await api.post(
            "/api/v1/backup-locations",
            json={"name": "disk", "spec": {"kind": "local", "path": str(tmp_path / "b")}},
        )
        assert location.status_code == 201, location.text
        location_id = location.json()["id"]
        response = await api.post(URL, json={"target": "foundry", "locationId": location_id})
        assert response.status_code == 202, response.text
        assert response.json()["locationId"] == location_id
        (envelope,) = await backup_intents(bus, 1)
        assert envelope.data["locationId"] == location_id
        assert envelope.data.get("policyId") is None

        # The first location made a default policy: a run under it names the policy.
        (policy,) = (await api.get("/api/v1/backup-policies")).json()["items"]
        response = await api.post(URL, json={"target": "foundry", "policyId": policy["id"]})
        assert response.status_code == 202, response.text
        (envelope,) = await backup_intents(bus, 1)
        assert envelope.data["policyId"] == policy["id"]
        assert envelope.data.get("locationId") is None

    async def test_unknown_policy_or_location_or_both_are_refused_naming_the_field(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        response = await api.post(URL, json={"target": "foundry", "policyId": "no-such"})
        assert response.status_code == 422 and fields(response) == ["policyId"]
        assert response.headers["content-type"].startswith("application/problem+json")
        response = await api.post(URL, json={"target": "foundry", "locationId": "no-such"})
        assert response.status_code == 422 and fields(response) == ["locationId"]
        response = await api.post(
            URL, json={"target": "foundry", "locationId": "a", "policyId": "b"}
        )
        assert response.status_code == 422 and fields(response) == ["locationId"]
        response = await api.post(URL, json={"target": "foundry", "locationId": "x" * 65})
        assert response.status_code == 422 and fields(response) == ["locationId"]
        for field, body in (
            ("policyId", {"target": "foundry", "policyId": "a\x00"}),
            ("locationId", {"target": "foundry", "locationId": "a\x00"}),
            ("clusterId", {"target": "cluster", "clusterId": "a\x00"}),
        ):
            response = await api.post(URL, json=body)
            assert response.status_code == 422 and fields(response) == [field], response.text
        assert await backup_intents(bus, 1, timeout=1.0) == []
