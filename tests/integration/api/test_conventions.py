"""The API's shared conventions on SQLite and PostgreSQL: tokens and scopes, audit log,
idempotency, ETags, filters and pagination, limits, kubeconfig issuance."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import text, update

from libs.common.bus import Bus, RpcError
from libs.common.contract.kubeconfig import KUBECONFIG_RPC_SUBJECT
from libs.common.settings import Settings
from services.api.auth import tokens
from services.api.models import ApiToken, utcnow
from tests.conftest import ADMIN_TOKEN

CLUSTERS = "/api/v1/clusters"

# The scope every operation needs. A new operation must be added here (the test fails otherwise).
REQUIRED_SCOPE = {
    "createCluster": "operator",
    "listClusters": "viewer",
    "getCluster": "viewer",
    "updateCluster": "operator",
    "deleteCluster": "operator",
    "getClusterKubeconfig": "operator",
    "createToken": "admin",
    "listTokens": "admin",
    "getToken": "admin",
    "revokeToken": "admin",
    "listAuditEvents": "admin",
    "listEvents": "viewer",
    "streamEvents": "viewer",
    "createWebhook": "admin",
    "listWebhooks": "admin",
    "getWebhook": "admin",
    "updateWebhook": "admin",
    "deleteWebhook": "admin",
    "listWebhookDeliveries": "admin",
    "createBackupLocation": "admin",
    "listBackupLocations": "admin",
    "getBackupLocation": "admin",
    "updateBackupLocation": "admin",
    "deleteBackupLocation": "admin",
    "createBackupPolicy": "admin",
    "listBackupPolicies": "viewer",
    "getBackupPolicy": "viewer",
    "updateBackupPolicy": "admin",
    "deleteBackupPolicy": "admin",
    "createBackup": "operator",
    "listBackups": "viewer",
    "getBackup": "viewer",
    "createClusterRestore": "admin",
    "listClusterRestores": "viewer",
    "getClusterRestore": "viewer",
}
RANK = {"viewer": 0, "operator": 1, "admin": 2}


async def new_token(api: httpx.AsyncClient, scope: str, name: str | None = None) -> dict[str, Any]:
    response = await api.post(
        "/api/v1/tokens", json={"name": name or f"{scope}-token", "spec": {"scope": scope}}
    )
    assert response.status_code == 201, response.text
    return response.json()


def as_token(api: httpx.AsyncClient, secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {"Authorization": ""}


class TestTokens:
    async def test_token_shape_is_recognisable_and_checksummed(
        self, api: httpx.AsyncClient
    ) -> None:
        created = await new_token(api, "viewer")
        secret = created["token"]
        assert secret.startswith("nest_") and len(secret) == tokens.TOKEN_LENGTH
        assert tokens.well_formed(secret)
        assert not tokens.well_formed(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
        assert created["status"]["prefix"] == secret[:9]
        assert created["spec"]["scope"] == "viewer"

    async def test_secret_is_shown_once_and_stored_only_hashed(
        self, api: httpx.AsyncClient
    ) -> None:
        created = await new_token(api, "operator")
        secret = created["token"]
        fetched = (await api.get(f"/api/v1/tokens/{created['id']}")).json()
        assert "token" not in fetched
        listed = (await api.get("/api/v1/tokens")).json()["items"]
        assert all("token" not in item for item in listed)
        async with api.app.state.sessions() as session:  # type: ignore[attr-defined]
            rows = (await session.execute(text("SELECT * FROM api_tokens"))).all()
            audit = (await session.execute(text("SELECT * FROM audit_events"))).all()
        dump = repr(rows) + repr(audit)
        assert secret not in dump and ADMIN_TOKEN not in dump
        assert tokens.digest(secret) in dump

    @pytest.mark.parametrize("scope", ["viewer", "operator", "admin"])
    async def test_scope_matrix(self, api: httpx.AsyncClient, scope: str) -> None:
        secret = (await new_token(api, scope))["token"]
        routes = [
            r
            for r in api.app.routes  # type: ignore[attr-defined]
            if isinstance(r, APIRoute) and r.path.startswith("/api/v1") and r.include_in_schema
        ]
        assert {r.operation_id for r in routes} <= set(REQUIRED_SCOPE), (
            "add new operations to REQUIRED_SCOPE"
        )
        for route in routes:
            path = route.path
            for name in route.param_convertors:
                path = path.replace("{" + name + "}", "does-not-exist")
            for method in route.methods:
                kwargs: dict[str, Any] = {"json": {}} if method in {"POST", "PATCH"} else {}
                anonymous = await api.request(method, path, headers=as_token(api, None), **kwargs)
                assert anonymous.status_code == 401, (method, path)
                assert anonymous.headers["www-authenticate"].startswith("Bearer")
                response = await api.request(method, path, headers=as_token(api, secret), **kwargs)
                allowed = RANK[scope] >= RANK[REQUIRED_SCOPE[route.operation_id]]
                if allowed:
                    assert response.status_code not in (401, 403), (method, path, response.text)
                else:
                    assert response.status_code == 403, (method, path, response.status_code)
                    assert response.headers["content-type"] == "application/problem+json"

    async def test_unknown_malformed_expired_and_revoked_tokens_are_401(
        self, api: httpx.AsyncClient
    ) -> None:
        for bad in ("nope", tokens.generate(), "Bearer"):
            response = await api.get(CLUSTERS, headers={"Authorization": f"Bearer {bad}"})
            assert response.status_code == 401
        expired = await new_token(api, "admin", "soon-expired")
        async with api.app.state.sessions() as session:  # type: ignore[attr-defined]
            await session.execute(
                update(ApiToken)
                .where(ApiToken.id == expired["id"])
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )
            await session.commit()
        response = await api.get(CLUSTERS, headers=as_token(api, expired["token"]))
        assert response.status_code == 401
        assert "expired" in response.json()["detail"]

        revoked = await new_token(api, "admin", "to-revoke")
        assert (await api.get(CLUSTERS, headers=as_token(api, revoked["token"]))).status_code == 200
        response = await api.delete(f"/api/v1/tokens/{revoked['id']}")
        assert response.json()["status"]["active"] is False
        assert (await api.get(CLUSTERS, headers=as_token(api, revoked["token"]))).status_code == 401

    async def test_token_validation_names_the_field(self, api: httpx.AsyncClient) -> None:
        response = await api.post("/api/v1/tokens", json={"name": "x", "spec": {"scope": "root"}})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "spec.scope"
        response = await api.post(
            "/api/v1/tokens", json={"name": "x", "spec": {"expiresInDays": 0}}
        )
        assert response.json()["errors"][0]["field"] == "spec.expiresInDays"


class TestAudit:
    async def test_every_mutating_call_is_audited_without_secrets(
        self, api: httpx.AsyncClient
    ) -> None:
        cluster = (await api.post(CLUSTERS, json={"name": "audited"})).json()
        await api.patch(f"{CLUSTERS}/{cluster['id']}", json={"labels": {"a": "b"}})
        await api.post(CLUSTERS, json={"name": "BAD"})
        token = await new_token(api, "viewer")
        denied = await api.delete(
            f"{CLUSTERS}/{cluster['id']}", headers=as_token(api, token["token"])
        )
        assert denied.status_code == 403
        await api.delete(f"{CLUSTERS}/{cluster['id']}", headers={"X-Correlation-ID": "req-42"})
        await api.get(CLUSTERS)  # reads are not audited
        page = (await api.get("/api/v1/audit-events", params={"resource": "clusters"})).json()
        actions = [(e["action"], e["status"]) for e in reversed(page["items"])]
        assert actions == [
            ("clusters.create", 201),
            ("clusters.update", 200),
            ("clusters.create", 422),
            ("clusters.delete", 403),
            ("clusters.delete", 202),
        ]
        newest = page["items"][0]
        assert newest["resourceId"] == cluster["id"]
        assert newest["correlationId"] == "req-42"
        assert newest["tokenName"] == "initial-admin"
        assert page["items"][1]["tokenName"] == "viewer-token"
        assert page["items"][-1]["resourceId"] == cluster["id"]  # from the Location header
        tokens_page = (await api.get("/api/v1/audit-events", params={"resource": "tokens"})).json()
        assert [e["action"] for e in tokens_page["items"]] == ["tokens.create"]
        assert token["token"] not in repr(tokens_page)

    async def test_audit_needs_admin_and_filters_by_time(self, api: httpx.AsyncClient) -> None:
        await api.post(CLUSTERS, json={"name": "t1"})
        later = (utcnow() + timedelta(hours=1)).isoformat()
        assert (await api.get("/api/v1/audit-events", params={"since": later})).json()[
            "items"
        ] == []
        bad = await api.get("/api/v1/audit-events", params={"since": "yesterday"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "since"


class TestIdempotency:
    async def test_retry_replays_without_a_second_effect(self, api: httpx.AsyncClient) -> None:
        headers = {"Idempotency-Key": "create-demo-1"}
        first = await api.post(CLUSTERS, json={"name": "demo"}, headers=headers)
        second = await api.post(CLUSTERS, json={"name": "demo"}, headers=headers)
        assert first.status_code == second.status_code == 201
        assert second.json() == first.json()
        assert second.headers["idempotent-replayed"] == "true"
        assert second.headers["location"] == first.headers["location"]
        assert len((await api.get(CLUSTERS)).json()["items"]) == 1

    async def test_same_key_other_body_is_refused(self, api: httpx.AsyncClient) -> None:
        headers = {"Idempotency-Key": "k-1"}
        await api.post(CLUSTERS, json={"name": "one"}, headers=headers)
        response = await api.post(CLUSTERS, json={"name": "two"}, headers=headers)
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "Idempotency-Key"
        assert [c["name"] for c in (await api.get(CLUSTERS)).json()["items"]] == ["one"]

    async def test_keys_are_scoped_per_token_and_errors_are_replayed(
        self, api: httpx.AsyncClient
    ) -> None:
        operator = (await new_token(api, "operator"))["token"]
        headers = {"Idempotency-Key": "shared"}
        bad = await api.post(CLUSTERS, json={"name": "Bad"}, headers=headers)
        again = await api.post(CLUSTERS, json={"name": "Bad"}, headers=headers)
        assert bad.status_code == again.status_code == 422
        other = await api.post(
            CLUSTERS, json={"name": "ok"}, headers={**headers, **as_token(api, operator)}
        )
        assert other.status_code == 201

    async def test_replayed_secrets_are_not_stored_readably(self, api: httpx.AsyncClient) -> None:
        headers = {"Idempotency-Key": "token-once"}
        body = {"name": "ci", "spec": {"scope": "viewer"}}
        first = await api.post("/api/v1/tokens", json=body, headers=headers)
        again = await api.post("/api/v1/tokens", json=body, headers=headers)
        secret = first.json()["token"]
        assert again.json()["token"] == secret  # the retry gets its answer
        async with api.app.state.sessions() as session:  # type: ignore[attr-defined]
            rows = (await session.execute(text("SELECT * FROM idempotency_records"))).all()
        assert rows and secret not in repr(rows)
        assert len((await api.get("/api/v1/tokens")).json()["items"]) == 2  # admin + ci

    async def test_invalid_key_is_rejected(self, api: httpx.AsyncClient) -> None:
        response = await api.post(
            CLUSTERS, json={"name": "x"}, headers={"Idempotency-Key": "a" * 300}
        )
        assert response.status_code == 422


class TestConcurrency:
    async def test_etag_and_if_match(self, api: httpx.AsyncClient) -> None:
        created = await api.post(CLUSTERS, json={"name": "etag"})
        etag = created.headers["etag"]
        cluster_id = created.json()["id"]
        assert etag == f'"{created.json()["resourceVersion"]}"'
        ok = await api.patch(
            f"{CLUSTERS}/{cluster_id}", json={"labels": {"a": "1"}}, headers={"If-Match": etag}
        )
        assert ok.status_code == 200 and ok.headers["etag"] != etag
        stale = await api.patch(
            f"{CLUSTERS}/{cluster_id}", json={"labels": {"a": "2"}}, headers={"If-Match": etag}
        )
        assert stale.status_code == 412
        assert stale.headers["content-type"] == "application/problem+json"
        assert (await api.get(f"{CLUSTERS}/{cluster_id}")).json()["labels"] == {"a": "1"}
        stale_delete = await api.delete(f"{CLUSTERS}/{cluster_id}", headers={"If-Match": etag})
        assert stale_delete.status_code == 412
        star = await api.delete(f"{CLUSTERS}/{cluster_id}", headers={"If-Match": "*"})
        assert star.status_code == 202

    async def test_concurrent_patches_lose_no_update(self, api: httpx.AsyncClient) -> None:
        cluster = (await api.post(CLUSTERS, json={"name": "race"})).json()
        responses = await asyncio.gather(
            *(
                api.patch(f"{CLUSTERS}/{cluster['id']}", json={"labels": {f"k{i}": "v"}})
                for i in range(8)
            )
        )
        assert all(r.status_code == 200 for r in responses)
        labels = (await api.get(f"{CLUSTERS}/{cluster['id']}")).json()["labels"]
        assert labels == {f"k{i}": "v" for i in range(8)}

    async def test_concurrent_if_match_patches_one_wins(self, api: httpx.AsyncClient) -> None:
        created = await api.post(CLUSTERS, json={"name": "race2"})
        etag, cluster_id = created.headers["etag"], created.json()["id"]
        responses = await asyncio.gather(
            *(
                api.patch(
                    f"{CLUSTERS}/{cluster_id}",
                    json={"spec": {"controlPlane": {"replicas": r}}},
                    headers={"If-Match": etag},
                )
                for r in (1, 3, 4, 5)
            )
        )
        assert sorted(r.status_code for r in responses) == [200, 412, 412, 412]


class TestLists:
    async def test_label_selector_and_phase_filters(self, api: httpx.AsyncClient, bus: Bus) -> None:
        specs = {
            "a": {"team": "pay", "env": "prod"},
            "b": {"team": "pay", "env": "dev"},
            "c": {"team": "ops"},
            "d": {},
        }
        ids = {}
        for name, labels in specs.items():
            ids[name] = (await api.post(CLUSTERS, json={"name": name, "labels": labels})).json()[
                "id"
            ]

        async def names(selector: str) -> list[str]:
            response = await api.get(CLUSTERS, params={"labelSelector": selector})
            assert response.status_code == 200, response.text
            return [c["name"] for c in response.json()["items"]]

        assert await names("team=pay") == ["a", "b"]
        assert await names("team==pay,env=dev") == ["b"]
        assert await names("env!=prod") == ["b", "c", "d"]
        assert await names("team in (pay, ops)") == ["a", "b", "c"]
        assert await names("team notin (pay)") == ["c", "d"]
        assert await names("env") == ["a", "b"]
        assert await names("!team") == ["d"]
        bad = await api.get(CLUSTERS, params={"labelSelector": "team in ()"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "labelSelector"
        assert [
            c["name"]
            for c in (await api.get(CLUSTERS, params={"phase": "Pending"})).json()["items"]
        ] == list("abcd")
        assert (await api.get(CLUSTERS, params={"phase": "Ready"})).json()["items"] == []
        assert (await api.get(CLUSTERS, params={"phase": "Bogus"})).status_code == 422

    async def test_pagination_across_inserts_and_link_header(self, api: httpx.AsyncClient) -> None:
        for i in range(5):
            await api.post(CLUSTERS, json={"name": f"p{i}", "labels": {"set": "x"}})
        first = await api.get(CLUSTERS, params={"limit": 2, "labelSelector": "set=x"})
        link = first.headers["link"]
        assert 'rel="next"' in link and "labelSelector=set%3Dx" in link
        await api.post(
            CLUSTERS, json={"name": "p5", "labels": {"set": "x"}}
        )  # inserted mid-listing
        seen = [c["name"] for c in first.json()["items"]]
        cursor = first.json()["next"]
        while cursor:
            page = await api.get(
                CLUSTERS, params={"limit": 2, "labelSelector": "set=x", "cursor": cursor}
            )
            seen += [c["name"] for c in page.json()["items"]]
            cursor = page.json()["next"]
            if not cursor:
                assert "link" not in page.headers
        assert seen == [f"p{i}" for i in range(6)]


class TestLimits:
    async def test_body_over_one_mib_is_413(self, api: httpx.AsyncClient) -> None:
        response = await api.post(
            CLUSTERS,
            content=b'{"name": "' + b"x" * (1024 * 1024 + 10) + b'"}',
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"

    async def test_rate_limit_answers_429_with_retry_after(self, settings: Settings) -> None:
        from services.api.app import create_app

        app = create_app(
            settings.model_copy(update={"rate_limit_per_second": 1.0, "rate_limit_burst": 3})
        )
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport,
                base_url="http://nest",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as client:
                codes = [(await client.get(CLUSTERS)).status_code for _ in range(5)]
                assert codes[:3] == [200, 200, 200]
                limited = await client.get(CLUSTERS)
                assert limited.status_code == 429
                assert int(limited.headers["retry-after"]) >= 1
                assert (await client.get("/healthz")).status_code == 200


class TestKubeconfig:
    @contextlib.asynccontextmanager
    async def provisioner(
        self, bus: Bus, fail: str | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        calls: list[dict[str, Any]] = []

        async def answer(body: dict[str, Any]) -> dict[str, Any]:
            calls.append(body)
            if fail:
                raise RpcError(fail, f"{fail} for test")
            return {
                "kubeconfig": "apiVersion: v1\nkind: Config\n",
                "expiresAt": "2030-01-01T00:00:00Z",
            }

        sub = await bus.serve(KUBECONFIG_RPC_SUBJECT, answer, queue="provisioner")
        try:
            yield calls
        finally:
            await sub.unsubscribe()

    async def test_kubeconfig_is_issued_by_the_provisioner_and_audited(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        cluster = (await api.post(CLUSTERS, json={"name": "kc"})).json()
        async with self.provisioner(bus) as calls:
            response = await api.get(
                f"{CLUSTERS}/{cluster['id']}/kubeconfig", params={"ttlSeconds": 3600}
            )
        assert response.status_code == 200, response.text
        assert response.json()["kubeconfig"].startswith("apiVersion: v1")
        assert response.headers["cache-control"] == "no-store"
        assert calls == [
            {
                "clusterId": cluster["id"],
                "name": "kc",
                "requester": "initial-admin",
                "ttlSeconds": 3600,
            }
        ]
        audit = (
            await api.get("/api/v1/audit-events", params={"resourceId": cluster["id"]})
        ).json()["items"]
        assert audit[0]["action"] == "clusters.kubeconfig.read"
        assert "apiVersion" not in repr(audit)

    async def test_kubeconfig_errors(self, api: httpx.AsyncClient, bus: Bus) -> None:
        cluster = (await api.post(CLUSTERS, json={"name": "kc2"})).json()
        assert (
            await api.get(f"{CLUSTERS}/{cluster['id']}/kubeconfig", params={"ttlSeconds": 90000})
        ).status_code == 422
        async with self.provisioner(bus, fail="unavailable"):
            response = await api.get(f"{CLUSTERS}/{cluster['id']}/kubeconfig")
        assert response.status_code == 503
        assert (await api.get(f"{CLUSTERS}/nope/kubeconfig")).status_code == 404


async def test_a_key_left_in_flight_by_a_crash_can_be_retried(api: httpx.AsyncClient) -> None:
    from services.api.idempotency import service as idempotency
    from services.api.models import IdempotencyRecord

    body = b'{"name": "after-crash"}'
    owner = idempotency.owner_of(f"Bearer {ADMIN_TOKEN}")
    async with api.app.state.sessions() as session:  # type: ignore[attr-defined]
        session.add(
            IdempotencyRecord(
                owner=owner,
                key="crashed",
                method="POST",
                path=CLUSTERS,
                body_hash=idempotency.request_hash("POST", CLUSTERS, body),
                status=None,
                created_at=utcnow() - timedelta(minutes=5),
                expires_at=utcnow() + timedelta(hours=1),
            )
        )
        await session.commit()
    headers = {"Idempotency-Key": "crashed", "content-type": "application/json"}
    response = await api.post(CLUSTERS, content=body, headers=headers)
    assert response.status_code == 201
    again = await api.post(CLUSTERS, content=body, headers=headers)
    assert again.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize("path", ["/api/v1/tokens", "/api/v1/audit-events", "/api/v1/events"])
async def test_every_collection_links_its_next_page(
    api: httpx.AsyncClient, bus: Bus, path: str
) -> None:
    from libs.common.contract.cluster import ClusterDeleted

    await new_token(api, "viewer", "one")
    await new_token(api, "viewer", "two")
    for i in range(2):
        await bus.publish(ClusterDeleted(cluster_id=f"c{i}", observed_generation=1), source="test")
    for _ in range(100):
        first = await api.get(path, params={"limit": 1})
        if first.json()["next"]:
            break
        await asyncio.sleep(0.05)
    assert first.status_code == 200
    link = first.headers["link"]
    assert link.endswith('; rel="next"') and "limit=1" in link and "cursor=" in link
    second = await api.get(link[1 : link.index(">")])
    assert second.status_code == 200 and second.json()["items"] != first.json()["items"]
