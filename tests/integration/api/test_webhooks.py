"""Webhooks on SQLite and PostgreSQL: subscriptions, signed deliveries to real HTTP receivers,
retries with backoff, and isolation from receivers that are down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from aiohttp import web

from libs.common.bus import Bus
from libs.common.contract import Envelope
from libs.common.contract.cluster import ClusterDeleted
from libs.common.settings import Settings
from services.api.models import EventRecord, Webhook, WebhookDelivery, utcnow
from services.api.webhooks import repository
from services.api.webhooks.signing import verify_signature

URL = "/api/v1/webhooks"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "webhook_backoff_seconds": 0.1,
            "webhook_poll_seconds": 0.1,
            "webhook_timeout_seconds": 30.0,
            "webhook_max_attempts": 3,
        }
    )


@dataclass
class Receiver:
    """A real HTTP endpoint on a free loopback port that answers with scripted statuses."""

    statuses: list[int] = field(default_factory=list)
    hang: bool = False
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    got: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        self.got.set()
        if self.hang:
            await asyncio.sleep(60)
        status = self.statuses.pop(0) if self.statuses else 204
        return web.Response(status=status)

    def events(self) -> list[dict[str, Any]]:
        import json

        return [json.loads(body) for _, body in self.requests]


@pytest.fixture
async def receivers() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(**options: Any) -> Receiver:
        receiver = Receiver(**options)
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        receiver.url = f"http://127.0.0.1:{port}/hook"
        runners.append(runner)
        return receiver

    yield start
    for runner in runners:
        await runner.cleanup()


async def create(api: httpx.AsyncClient, name: str, url: str, **spec: Any) -> dict[str, Any]:
    response = await api.post(URL, json={"name": name, "spec": {"url": url, **spec}})
    assert response.status_code == 201, response.text
    return response.json()


async def publish(bus: Bus, cluster_id: str = "c-1") -> Envelope:
    return await bus.publish(
        ClusterDeleted(cluster_id=cluster_id, observed_generation=1), source="provisioner"
    )


async def deliveries(
    api: httpx.AsyncClient, webhook_id: str, predicate: Any, timeout: float = 10.0
) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await api.get(f"{URL}/{webhook_id}/deliveries")
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        if predicate(items):
            return items
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"deliveries not as expected: {items}")
        await asyncio.sleep(0.05)


class TestSubscriptions:
    async def test_secret_is_shown_once_and_never_again(
        self, api: httpx.AsyncClient, receivers: Any
    ) -> None:
        receiver = await receivers()
        created = await create(api, "sink", receiver.url)
        assert created["secret"].startswith("whsec_")
        assert created["spec"] == {"url": receiver.url, "eventTypes": ["*"], "enabled": True}
        assert created["generation"] == 1
        given = await create(api, "given", receiver.url, secret="s" * 20)
        assert given["secret"] == "s" * 20
        for response in (
            await api.get(f"{URL}/{created['id']}"),
            await api.get(URL),
            await api.patch(
                f"{URL}/{created['id']}", json={"spec": {"secret": "t" * 20, "enabled": False}}
            ),
        ):
            assert response.status_code == 200, response.text
            assert "secret" not in response.text
            assert created["secret"] not in response.text and "t" * 20 not in response.text

    async def test_secrets_are_stored_sealed_and_clear_ones_get_sealed_at_start(
        self, api: httpx.AsyncClient, receivers: Any
    ) -> None:
        from sqlalchemy import select

        from services.api.webhooks import service

        app = api.app  # type: ignore[attr-defined]
        receiver = await receivers()
        created = await create(api, "sealed", receiver.url, secret="q" * 24)
        rotated = await api.patch(f"{URL}/{created['id']}", json={"spec": {"secret": "r" * 24}})
        assert rotated.status_code == 200
        async with app.state.sessions() as session:
            session.add(
                Webhook(
                    id="legacy",
                    name="legacy",
                    labels={},
                    url=receiver.url,
                    event_types=["*"],
                    secret="l" * 24,
                    enabled=False,
                    generation=1,
                    consecutive_failures=0,
                )
            )
            await session.commit()
        async with app.state.sessions() as session:
            assert await service.seal_clear_secrets(session, app.state.sealer) == 1
        async with app.state.sessions() as session:
            rows = {row.id: row for row in await session.scalars(select(Webhook))}
            stored = repr([(r.secret, r.sealed_secret, r.url, r.labels) for r in rows.values()])
        for clear in ("q" * 24, "r" * 24, "l" * 24):
            assert clear not in stored
        for webhook_id, clear in ((created["id"], "r" * 24), ("legacy", "l" * 24)):
            row = rows[webhook_id]
            assert row.secret is None and row.sealed_secret is not None
            opened = app.state.sealer.open(
                row.sealed_secret, context=service.secret_context(webhook_id)
            )
            assert opened == clear

    async def test_patch_list_and_delete(self, api: httpx.AsyncClient, receivers: Any) -> None:
        receiver = await receivers()
        hook = await create(api, "sink", receiver.url, eventTypes=["io.nest.cluster."])
        response = await api.patch(
            f"{URL}/{hook['id']}",
            json={"labels": {"team": "a"}, "spec": {"eventTypes": ["io.nest.backup.*"]}},
        )
        assert response.status_code == 200, response.text
        patched = response.json()
        assert patched["labels"] == {"team": "a"}
        assert patched["spec"]["eventTypes"] == ["io.nest.backup.*"]
        assert patched["generation"] == 2
        assert (
            await api.post(URL, json={"name": "sink", "spec": {"url": receiver.url}})
        ).status_code == 409
        page = (await api.get(URL)).json()
        assert [h["name"] for h in page["items"]] == ["sink"] and page["next"] is None
        assert (await api.delete(f"{URL}/{hook['id']}")).status_code == 204
        assert (await api.get(f"{URL}/{hook['id']}")).status_code == 404
        assert (await api.get(f"{URL}/{hook['id']}/deliveries")).status_code == 404
        operator = await api.post(
            "/api/v1/tokens", json={"name": "op", "spec": {"scope": "operator"}}
        )
        headers = {"Authorization": f"Bearer {operator.json()['token']}"}
        assert (await api.get(URL, headers=headers)).status_code == 403

    async def test_bad_urls_are_422_naming_spec_url(self, api: httpx.AsyncClient) -> None:
        for url in (
            "ftp://example.com/hook",
            "file:///etc/passwd",
            "not a url",
            "http://169.254.169.254/latest/meta-data/",
            "http://169.254.10.1/hook",
            "http://[fe80::1]/hook",
            "http://[::ffff:169.254.169.254]/hook",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://metadata/hook",
            "http:///nohost",
        ):
            response = await api.post(URL, json={"name": "bad", "spec": {"url": url}})
            assert response.status_code == 422, (url, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert "spec.url" in [e["field"] for e in response.json()["errors"]], url
        assert (await api.get(URL)).json()["items"] == []
        # Loopback and private addresses stay allowed (receivers on the appliance's network).
        for i, url in enumerate(("http://127.0.0.1:9/h", "https://10.0.0.5/h", "http://[::1]:9/")):
            await create(api, f"ok{i}", url)
        response = await api.post(
            URL, json={"name": "x", "spec": {"url": "http://127.0.0.1:9/", "eventTypes": ["a b"]}}
        )
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"].startswith("spec.eventTypes")
        hook = (await api.get(URL)).json()["items"][0]
        response = await api.patch(
            f"{URL}/{hook['id']}", json={"spec": {"url": "http://169.254.169.254/"}}
        )
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "spec.url"


class TestDelivery:
    async def test_signed_cloudevent_reaches_the_receiver(
        self, api: httpx.AsyncClient, bus: Bus, receivers: Any
    ) -> None:
        receiver = await receivers()
        hook = await create(api, "sink", receiver.url, eventTypes=["io.nest.cluster.deleted.v1"])
        other = Envelope(source="/nest/backup", type="io.nest.backup.completed.v1", data={})
        await bus.publish_envelope("nest.event.backup.completed", other)
        sent = await publish(bus)
        items = await deliveries(api, hook["id"], lambda d: d and d[0]["status"] == "delivered")
        assert items[0]["attempts"] == 1
        assert items[0]["responseCode"] == 204
        assert items[0]["eventId"] == sent.id
        # Only the subscribed type was queued and sent.
        assert [d["eventId"] for d in items] == [sent.id]
        [(headers, body)] = receiver.requests
        assert headers["Content-Type"] == "application/cloudevents+json"
        assert verify_signature(hook["secret"], headers["Nest-Signature"], body)
        assert not verify_signature("wrong-secret-000000", headers["Nest-Signature"], body)
        assert not verify_signature(hook["secret"], headers["Nest-Signature"], body + b" ")
        event = receiver.events()[0]
        assert event["id"] == sent.id and event["type"] == "io.nest.cluster.deleted.v1"
        assert event["specversion"] == "1.0"
        status = (await api.get(f"{URL}/{hook['id']}")).json()["status"]
        assert status["lastOutcome"] == "delivered" and status["consecutiveFailures"] == 0

    async def test_5xx_is_retried_with_backoff_until_it_succeeds(
        self, api: httpx.AsyncClient, bus: Bus, receivers: Any
    ) -> None:
        receiver = await receivers(statuses=[500, 503, 200])
        hook = await create(api, "sink", receiver.url)
        await publish(bus)
        items = await deliveries(api, hook["id"], lambda d: d and d[0]["status"] == "delivered")
        assert items[0]["attempts"] == 3
        assert items[0]["responseCode"] == 200
        assert len(receiver.requests) == 3
        # The same event each time, each signed afresh.
        assert len({body for _, body in receiver.requests}) == 1

    async def test_gives_up_after_max_attempts_and_4xx_is_final(
        self, api: httpx.AsyncClient, bus: Bus, receivers: Any
    ) -> None:
        failing = await receivers(statuses=[500, 500, 500, 500])
        refusing = await receivers(statuses=[400])
        throttled = await receivers(statuses=[429, 200])
        hooks = [
            await create(api, "failing", failing.url),
            await create(api, "refusing", refusing.url),
            await create(api, "throttled", throttled.url),
        ]
        await publish(bus)
        done = lambda d: d and d[0]["status"] != "pending"  # noqa: E731
        [failed] = await deliveries(api, hooks[0]["id"], done)
        assert failed["status"] == "failed" and failed["attempts"] == 3
        assert failed["responseCode"] == 500 and "500" in failed["lastError"]
        assert failed["nextAttemptAt"] is None
        [refused] = await deliveries(api, hooks[1]["id"], done)
        assert refused["status"] == "failed" and refused["attempts"] == 1
        [throttled_delivery] = await deliveries(api, hooks[2]["id"], done)
        assert throttled_delivery["status"] == "delivered" and throttled_delivery["attempts"] == 2
        failed_only = await api.get(
            f"{URL}/{hooks[0]['id']}/deliveries", params={"status": "failed"}
        )
        assert len(failed_only.json()["items"]) == 1

    async def test_a_dead_or_hanging_receiver_does_not_delay_a_healthy_one(
        self, api: httpx.AsyncClient, bus: Bus, receivers: Any
    ) -> None:
        hanging = await receivers(hang=True)
        healthy = await receivers()
        down = await receivers()
        port = down.url.rsplit(":", 1)[1].split("/")[0]
        await create(api, "down", down.url.replace(f":{port}/", ":1/"))
        stuck = await create(api, "hanging", hanging.url)
        ok = await create(api, "healthy", healthy.url)
        for i in range(10):
            await publish(bus, f"c{i}")
        await deliveries(
            api, ok["id"], lambda d: len(d) == 10 and all(x["status"] == "delivered" for x in d)
        )
        assert len(healthy.requests) == 10
        # Everything reached the healthy receiver while the hanging one still holds its first
        # requests (the receiver timeout is 30 s): nothing waited for it, and it got no more
        # requests at once than its concurrency allows.
        assert hanging.got.is_set()
        assert 1 <= len(hanging.requests) <= 4
        waiting = (await api.get(f"{URL}/{stuck['id']}/deliveries")).json()["items"]
        assert len(waiting) == 10 and all(d["status"] == "pending" for d in waiting)
        assert all(d["responseCode"] is None for d in waiting)

    async def test_no_delivery_while_disabled_then_resumes(
        self, api: httpx.AsyncClient, bus: Bus, receivers: Any
    ) -> None:
        receiver = await receivers()
        hook = await create(api, "sink", receiver.url, enabled=False)
        await publish(bus)
        await asyncio.sleep(0.5)
        # Disabled webhooks queue nothing new.
        assert (await api.get(f"{URL}/{hook['id']}/deliveries")).json()["items"] == []
        await api.patch(f"{URL}/{hook['id']}", json={"spec": {"enabled": True}})
        await publish(bus)
        await deliveries(api, hook["id"], lambda d: d and d[0]["status"] == "delivered")
        assert len(receiver.requests) == 1


class TestLeases:
    async def test_one_replica_at_a_time_attempts_a_delivery(self, api: httpx.AsyncClient) -> None:
        sessions = api.app.state.sessions  # type: ignore[attr-defined]
        # Due an hour from now, so this app's own worker leaves it alone.
        due = utcnow() + timedelta(hours=1)
        async with sessions() as session:
            session.add(
                Webhook(
                    id="w1",
                    name="w1",
                    labels={},
                    url="http://127.0.0.1:9/",
                    event_types=["*"],
                    secret="s" * 20,
                    enabled=True,
                    generation=1,
                    consecutive_failures=0,
                )
            )
            session.add(
                EventRecord(
                    position=1,
                    id="e1",
                    type="io.nest.x.y.v1",
                    source="/nest/x",
                    time=utcnow(),
                    stream_sequence=1,
                    envelope={"id": "e1"},
                )
            )
            await session.flush()
            session.add(
                WebhookDelivery(
                    id="d1",
                    webhook_id="w1",
                    event_position=1,
                    event_id="e1",
                    event_type="io.nest.x.y.v1",
                    status="pending",
                    attempts=0,
                    next_attempt_at=due,
                )
            )
            await session.commit()

        async def claim(owner: str, now: datetime) -> list[str]:
            async with sessions() as session:
                won = await repository.claim(
                    session, ["d1"], owner, now, now + timedelta(seconds=60)
                )
                await session.commit()
                return won

        now = due + timedelta(seconds=1)
        results = await asyncio.gather(*(claim(f"replica-{i}", now) for i in range(4)))
        assert sorted(len(r) for r in results) == [0, 0, 0, 1]
        winner = f"replica-{[len(r) for r in results].index(1)}"
        # While the lease holds nobody else gets it; once it expires another replica may.
        assert await claim("replica-late", now + timedelta(seconds=30)) == []
        assert await claim("replica-late", now + timedelta(seconds=61)) == ["d1"]
        async with sessions() as session:
            # The first holder lost its lease: its outcome is not recorded over the new one's.
            assert not await repository.finish(session, "d1", winner, {"status": "delivered"})
            assert await repository.finish(session, "d1", "replica-late", {"status": "failed"})
            await session.commit()
            row = await session.get(WebhookDelivery, "d1")
            assert row is not None and row.status == "failed" and row.attempts == 2
