"""Backup locations and manual backups on SQLite and PostgreSQL, checked live by the backup
service's real probe responder against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from libs.common.bus import Bus
from libs.common.contract import INTENTS_STREAM, Envelope
from services.api.models import BackupLocation
from services.backup.service import serve_probe_location
from tests.support.s3 import SeaweedS3, s3_server

__all__ = ["s3_server"]

URL = "/api/v1/backup-locations"


@pytest.fixture
async def responder(bus: Bus) -> AsyncIterator[None]:
    """The backup service's probe responder, on the test's NATS."""
    subscription = await serve_probe_location(bus)
    yield
    await subscription.unsubscribe()


def s3_spec(server: SeaweedS3, bucket: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "kind": "s3",
        "endpointUrl": server.endpoint,
        "bucket": bucket,
        "prefix": "nest",
        "accessKeyId": server.access_key,
        "secretAccessKey": server.secret_key,
        "pathStyle": True,
    }
    spec.update(overrides)
    return spec


def fields(response: httpx.Response) -> list[str]:
    return [error["field"] for error in response.json().get("errors", [])]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def backup_intents(bus: Bus, count: int, timeout: float = 5.0) -> list[Envelope]:
    sub = await bus.nc.jetstream().pull_subscribe(
        "nest.intent.backup.>", durable="test-backup", stream=INTENTS_STREAM
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


@pytest.mark.usefixtures("responder")
class TestCreate:
    async def test_local_location_is_probed_and_stored(
        self, api: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        directory = tmp_path / "backups"
        response = await api.post(
            URL, json={"name": "disk", "spec": {"kind": "local", "path": str(directory)}}
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["spec"]["path"] == str(directory)
        assert response.headers["location"] == f"{URL}/{body['id']}"
        assert (await api.get(f"{URL}/{body['id']}")).json() == body
        # The probe object was written, read back and deleted.
        assert not [p for p in directory.rglob("*") if p.is_file()]

    async def test_s3_location_with_right_credentials_is_stored_without_its_secret(
        self, api: httpx.AsyncClient, s3_server: SeaweedS3
    ) -> None:
        bucket = s3_server.new_bucket()
        response = await api.post(
            URL,
            json={
                "name": "offsite",
                "labels": {"tier": "cold"},
                "spec": s3_spec(s3_server, bucket),
            },
        )
        assert response.status_code == 201, response.text
        created = response.json()
        assert created["spec"]["bucket"] == bucket
        assert created["spec"]["accessKeyId"] == s3_server.access_key
        listed = await api.get(URL)
        fetched = await api.get(f"{URL}/{created['id']}")
        for text in (response.text, listed.text, fetched.text):
            assert s3_server.secret_key not in text
            assert "secretAccessKey" not in text
        assert [item["name"] for item in listed.json()["items"]] == ["offsite"]
        assert not s3_server.keys(bucket)

        app: Any = api.app  # type: ignore[attr-defined]
        async with app.state.sessions() as session:
            row = (await session.scalars(select(BackupLocation))).one()
            stored = repr((row.spec, row.sealed_secret, row.labels))
        assert s3_server.secret_key not in stored
        assert row.sealed_secret is not None
        opened = app.state.sealer.open(row.sealed_secret, context=f"backup-location:{row.id}")
        assert opened == s3_server.secret_key

    async def test_wrong_secret_is_refused_naming_the_field(
        self, api: httpx.AsyncClient, s3_server: SeaweedS3
    ) -> None:
        spec = s3_spec(s3_server, s3_server.new_bucket(), secretAccessKey="not-the-secret-key")
        response = await api.post(URL, json={"name": "wrong", "spec": spec})
        assert response.status_code == 422, response.text
        assert fields(response) == ["spec.secretAccessKey"]
        assert "not-the-secret-key" not in response.text
        assert (await api.get(URL)).json()["items"] == []

    async def test_missing_bucket_is_refused_naming_the_field(
        self, api: httpx.AsyncClient, s3_server: SeaweedS3
    ) -> None:
        spec = s3_spec(s3_server, "nest-no-such-bucket")
        response = await api.post(URL, json={"name": "nobucket", "spec": spec})
        assert response.status_code == 422, response.text
        assert fields(response) == ["spec.bucket"]

    async def test_endpoint_that_does_not_answer_is_refused(
        self, api: httpx.AsyncClient, s3_server: SeaweedS3
    ) -> None:
        spec = s3_spec(
            s3_server, "whatever-bucket", endpointUrl=f"http://127.0.0.1:{closed_port()}"
        )
        response = await api.post(URL, json={"name": "down", "spec": spec})
        assert response.status_code == 422, response.text
        assert fields(response) == ["spec.endpointUrl"]

    @pytest.mark.parametrize(
        "endpoint",
        ["http://169.254.169.254", "http://[fe80::1]:9000", "http://metadata.google.internal"],
    )
    async def test_link_local_and_metadata_endpoints_are_refused(
        self, api: httpx.AsyncClient, s3_server: SeaweedS3, endpoint: str
    ) -> None:
        spec = s3_spec(s3_server, "some-bucket", endpointUrl=endpoint)
        response = await api.post(URL, json={"name": "imds", "spec": spec})
        assert response.status_code == 422, response.text
        assert fields(response) == ["spec.endpointUrl"]


class TestWithoutBackupService:
    async def test_no_responder_is_503(self, api: httpx.AsyncClient, tmp_path: Path) -> None:
        response = await api.post(
            URL, json={"name": "disk", "spec": {"kind": "local", "path": str(tmp_path)}}
        )
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/problem+json")


@pytest.mark.usefixtures("responder")
class TestPatchAndDelete:
    async def test_patch_rechecks_and_keeps_the_secret(
        self, api: httpx.AsyncClient, s3_server: SeaweedS3
    ) -> None:
        bucket = s3_server.new_bucket()
        created = (
            await api.post(URL, json={"name": "offsite", "spec": s3_spec(s3_server, bucket)})
        ).json()
        path = f"{URL}/{created['id']}"
        headers = {"Content-Type": "application/merge-patch+json"}

        wrong = await api.patch(
            path, json={"spec": {"secretAccessKey": "nope-nope"}}, headers=headers
        )
        assert wrong.status_code == 422, wrong.text
        assert fields(wrong) == ["spec.secretAccessKey"]
        missing = await api.patch(
            path, json={"spec": {"bucket": "nest-gone-bucket"}}, headers=headers
        )
        assert fields(missing) == ["spec.bucket"]

        # The unchanged secret is kept when another field changes.
        moved = await api.patch(path, json={"spec": {"prefix": "elsewhere"}}, headers=headers)
        assert moved.status_code == 200, moved.text
        assert moved.json()["spec"]["prefix"] == "elsewhere"
        assert moved.json()["generation"] == 2
        assert s3_server.secret_key not in moved.text

        # The first location brought the default policy, which uses it: 409 until it is gone.
        assert (await api.delete(path)).status_code == 409
        (default,) = (await api.get("/api/v1/backup-policies")).json()["items"]
        assert (await api.delete(f"/api/v1/backup-policies/{default['id']}")).status_code == 204
        assert (await api.delete(path)).status_code == 204
        assert (await api.get(path)).status_code == 404


class TestRequestBackup:
    async def test_foundry_backup_stages_a_run_intent(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        response = await api.post("/api/v1/backups", json={"target": "foundry"})
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["target"] == "foundry"
        (envelope,) = await backup_intents(bus, 1)
        assert envelope.id == accepted["intentId"]
        assert envelope.type == "io.nest.backup.run.v1"
        assert envelope.data["target"] == "foundry"
        assert envelope.data["kind"] == "foundry"

    async def test_cluster_backup_names_the_cluster(self, api: httpx.AsyncClient, bus: Bus) -> None:
        cluster = (await api.post("/api/v1/clusters", json={"name": "demo"})).json()
        response = await api.post(
            "/api/v1/backups", json={"target": "cluster", "clusterId": cluster["id"]}
        )
        assert response.status_code == 202, response.text
        (envelope,) = await backup_intents(bus, 1)
        assert envelope.data["target"] == "cluster-demo"
        assert envelope.data["kind"] == "etcd"
        assert envelope.data["clusterId"] == cluster["id"]

    async def test_unknown_cluster_or_location_is_refused(self, api: httpx.AsyncClient) -> None:
        response = await api.post(
            "/api/v1/backups", json={"target": "cluster", "clusterId": "no-such-cluster"}
        )
        assert response.status_code == 422
        assert fields(response) == ["clusterId"]
        response = await api.post(
            "/api/v1/backups", json={"target": "foundry", "locationId": "no-such-location"}
        )
        assert fields(response) == ["locationId"]
        assert (await api.post("/api/v1/backups", json={"target": "cluster"})).status_code == 422
