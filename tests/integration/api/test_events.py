"""Event history and SSE on SQLite and PostgreSQL, with the real bus and a real HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest
import uvicorn

from libs.common.bus import Bus
from libs.common.contract import Envelope
from libs.common.contract.cluster import ClusterDeleted
from libs.common.settings import Settings
from services.api.auth.schemas import Scope
from services.api.events import service as events
from services.api.events.filters import EventFilter
from services.api.events.stream import Broadcaster, StreamedEvent
from services.api.models import utcnow
from tests.conftest import ADMIN_TOKEN

URL = "/api/v1/events"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"sse_heartbeat_seconds": 0.3})


@pytest.fixture
async def live(api: httpx.AsyncClient) -> AsyncIterator[str]:
    """The same in-process app behind a real HTTP server on a free loopback port (SSE needs a
    real connection: httpx's ASGI transport buffers whole responses)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        api.app,  # type: ignore[attr-defined]
        lifespan="off",
        log_level="warning",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 5)
    sock.close()


async def publish_deleted(bus: Bus, cluster_id: str) -> Envelope:
    return await bus.publish(
        ClusterDeleted(cluster_id=cluster_id, observed_generation=1),
        source="provisioner",
        correlation=f"req-{cluster_id}",
    )


async def publish_raw(bus: Bus, kind: str, subject: str | None = None) -> Envelope:
    """An event type outside today's contract (a future or admin-only domain)."""
    domain, name = kind.split(".")
    envelope = Envelope(
        source=f"/nest/{domain}",
        type=f"io.nest.{domain}.{name}.v1",
        subject=subject,
        data={"note": "hello"},
    )
    await bus.publish_envelope(f"nest.event.{domain}.{name}", envelope)
    return envelope


async def recorded(api: httpx.AsyncClient, count: int, timeout: float = 10.0) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        items = (await api.get(URL, params={"limit": 500})).json()["items"]
        if len(items) >= count:
            return items
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{len(items)} events recorded, wanted {count}")
        await asyncio.sleep(0.05)


@dataclass
class SseReader:
    """A minimal EventSource: parses frames and comment lines from a streaming response."""

    response: httpx.Response
    events: list[dict[str, Any]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    _lines: AsyncIterator[str] | None = None

    async def next_event(self, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            if self._lines is None:
                self._lines = self.response.aiter_lines()
            frame: dict[str, Any] = {}
            async for line in self._lines:
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line == "":
                    if "data" in frame:
                        frame["data"] = json.loads(frame["data"])
                        self.events.append(frame)
                        return frame
                    frame = {}
                else:
                    key, _, value = line.partition(":")
                    frame[key] = value.removeprefix(" ")
        raise AssertionError("stream ended")

    async def take(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return [await self.next_event(timeout) for _ in range(count)]


@contextlib.asynccontextmanager
async def sse(
    base: str, token: str = ADMIN_TOKEN, headers: dict[str, str] | None = None, **params: Any
) -> AsyncIterator[SseReader]:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        all_headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "text/event-stream",
            **(headers or {}),
        }
        async with client.stream(
            "GET", f"{URL}/stream", params=params, headers=all_headers
        ) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            yield SseReader(response)


async def viewer_token(api: httpx.AsyncClient) -> str:
    response = await api.post("/api/v1/tokens", json={"name": "watcher"})
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


class TestHistory:
    async def test_every_event_is_recorded_once_as_a_cloudevent(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        first = await publish_deleted(bus, "c-1")
        await publish_raw(bus, "backup.completed", subject="c-1")
        # The same envelope stored twice in the stream (a redelivery): recorded once.
        await bus.publish_raw("nest.event.cluster.deleted", first.to_bytes(), "other-msg-id")
        await publish_deleted(bus, "c-2")
        items = await recorded(api, 3)
        await asyncio.sleep(0.3)
        items = (await api.get(URL)).json()["items"]
        assert [i["type"] for i in items] == [
            "io.nest.cluster.deleted.v1",
            "io.nest.backup.completed.v1",
            "io.nest.cluster.deleted.v1",
        ]
        event = items[0]
        assert event["id"] == first.id
        assert event["specversion"] == "1.0"
        assert event["source"] == "/nest/provisioner"
        assert event["data"]["clusterId"] == "c-1"
        assert event["correlationid"] == "req-c-1"
        assert items[1]["data"] == {"note": "hello"}

    async def test_filters_by_type_exact_and_prefix_and_subject(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        await publish_raw(bus, "cluster.status_changed", subject="a")
        await publish_raw(bus, "cluster.deleted", subject="b")
        await publish_raw(bus, "backup.completed", subject="a")
        await publish_raw(bus, "clusterx.odd", subject="a")
        await recorded(api, 4)

        async def types(**params: Any) -> list[str]:
            response = await api.get(URL, params=params)
            assert response.status_code == 200, response.text
            return [i["type"] for i in response.json()["items"]]

        assert await types(type="io.nest.cluster.deleted.v1") == ["io.nest.cluster.deleted.v1"]
        assert await types(type="io.nest.cluster.") == [
            "io.nest.cluster.status_changed.v1",
            "io.nest.cluster.deleted.v1",
        ]
        assert await types(type="io.nest.cluster*") == [
            "io.nest.cluster.status_changed.v1",
            "io.nest.cluster.deleted.v1",
            "io.nest.clusterx.odd.v1",
        ]
        # '_' is a LIKE wildcard: a prefix must match it literally.
        assert await types(type="io.nest.cluster.status_*") == ["io.nest.cluster.status_changed.v1"]
        assert await types(type="io.nest.cluster.s_atus*") == []
        assert await types(subject="a") == [
            "io.nest.cluster.status_changed.v1",
            "io.nest.backup.completed.v1",
            "io.nest.clusterx.odd.v1",
        ]
        both = await api.get(
            URL, params=[("type", "io.nest.backup."), ("type", "io.nest.clusterx.")]
        )
        assert [i["type"] for i in both.json()["items"]] == [
            "io.nest.backup.completed.v1",
            "io.nest.clusterx.odd.v1",
        ]
        bad = await api.get(URL, params={"type": "io nest"})
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["field"] == "type"

    async def test_pages_cover_everything_once_in_order(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        sent = [await publish_deleted(bus, f"c{i}") for i in range(7)]
        await recorded(api, 7)
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = (await api.get(URL, params=params)).json()
            seen += [item["id"] for item in page["items"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert seen == [e.id for e in sent]
        assert (await api.get(URL, params={"cursor": "!!"})).status_code == 422

    async def test_viewer_does_not_see_admin_only_types(
        self, api: httpx.AsyncClient, bus: Bus
    ) -> None:
        await publish_raw(bus, "token.created")
        await publish_deleted(bus, "c-1")
        await publish_raw(bus, "webhook.created")
        await recorded(api, 3)
        token = await viewer_token(api)
        response = await api.get(URL, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert [i["type"] for i in response.json()["items"]] == ["io.nest.cluster.deleted.v1"]
        asked = await api.get(
            URL, params={"type": "io.nest.token."}, headers={"Authorization": f"Bearer {token}"}
        )
        assert asked.json()["items"] == []
        assert (await api.get(URL, headers={"Authorization": ""})).status_code == 401

    async def test_retention_prunes_old_events(self, api: httpx.AsyncClient, bus: Bus) -> None:
        await publish_deleted(bus, "c-1")
        await recorded(api, 1)
        db = api.app.state.db  # type: ignore[attr-defined]
        assert await events.prune(db, utcnow() - timedelta(days=1)) == 0
        assert await events.prune(db, utcnow() + timedelta(seconds=1)) == 1
        assert (await api.get(URL)).json()["items"] == []


class TestStream:
    async def test_live_then_resume_with_last_event_id_without_gaps_or_duplicates(
        self, api: httpx.AsyncClient, bus: Bus, live: str
    ) -> None:
        before = await publish_deleted(bus, "old")
        await recorded(api, 1)
        async with sse(live) as stream:
            live_sent = [await publish_deleted(bus, f"live{i}") for i in range(3)]
            got = await stream.take(3)
        # Only what happened after connecting, in order, with positions as ids.
        assert [e["data"]["id"] for e in got] == [e.id for e in live_sent]
        assert [e["event"] for e in got] == ["io.nest.cluster.deleted.v1"] * 3
        positions = [int(e["id"]) for e in got]
        assert positions == sorted(positions)
        assert before.id not in [e["data"]["id"] for e in got]

        missed = [await publish_deleted(bus, f"missed{i}") for i in range(4)]
        await recorded(api, 8)
        async with sse(live, headers={"Last-Event-ID": got[-1]["id"]}) as stream:
            replayed = await stream.take(4)
            marker = await publish_deleted(bus, "marker")
            after = await stream.next_event()
        assert [e["data"]["id"] for e in replayed] == [e.id for e in missed]
        assert after["data"]["id"] == marker.id
        assert int(after["id"]) > int(replayed[-1]["id"])

        # `since` replays from a position too (0: everything), then goes live.
        async with sse(live, since=0) as stream:
            everything = await stream.take(9)
        assert [e["data"]["id"] for e in everything] == [
            before.id,
            *(e.id for e in live_sent),
            *(e.id for e in missed),
            marker.id,
        ]

    async def test_resume_while_events_keep_coming_loses_nothing(
        self, api: httpx.AsyncClient, bus: Bus, live: str
    ) -> None:
        sent: list[str] = []

        async def produce() -> None:
            for i in range(40):
                sent.append((await publish_deleted(bus, f"c{i}")).id)
                await asyncio.sleep(0.005)

        producer = asyncio.create_task(produce())
        got: list[dict[str, Any]] = []
        async with sse(live, since=0) as stream:
            got += await stream.take(10)
        while len(got) < 40:
            async with sse(live, headers={"Last-Event-ID": got[-1]["id"]}) as stream:
                got += await stream.take(min(7, 40 - len(got)))
        await producer
        assert [e["data"]["id"] for e in got] == sent

    async def test_heartbeats_and_filters(
        self, api: httpx.AsyncClient, bus: Bus, live: str
    ) -> None:
        async with sse(live, type="io.nest.backup.", subject="c-1") as stream:
            await publish_deleted(bus, "c-1")
            await publish_raw(bus, "backup.completed", subject="c-2")
            wanted = await publish_raw(bus, "backup.completed", subject="c-1")
            event = await stream.next_event()
            assert event["data"]["id"] == wanted.id
            await asyncio.sleep(0.8)
            await publish_raw(bus, "backup.completed", subject="c-1")
            await stream.next_event()
            assert "heartbeat" in stream.comments

    async def test_viewer_stream_leaves_out_admin_only_types(
        self, api: httpx.AsyncClient, bus: Bus, live: str
    ) -> None:
        token = await viewer_token(api)
        async with sse(live, token=token) as viewer, sse(live) as admin:
            await publish_raw(bus, "token.created")
            await publish_raw(bus, "audit.recorded")
            visible = await publish_deleted(bus, "c-1")
            assert (await viewer.next_event())["data"]["id"] == visible.id
            assert [e["event"] for e in await admin.take(3)] == [
                "io.nest.token.created.v1",
                "io.nest.audit.recorded.v1",
                "io.nest.cluster.deleted.v1",
            ]

    async def test_a_revoked_token_loses_its_stream(
        self, api: httpx.AsyncClient, bus: Bus, live: str
    ) -> None:
        created = (await api.post("/api/v1/tokens", json={"name": "leaving"})).json()
        async with sse(live, token=created["token"]) as stream:
            first = await publish_deleted(bus, "c-1")
            assert (await stream.next_event())["data"]["id"] == first.id
            response = await api.delete(f"/api/v1/tokens/{created['id']}")
            assert response.status_code == 200
            with pytest.raises(AssertionError, match="stream ended"):
                await stream.next_event(timeout=10)
            assert "the token is no longer valid" in stream.comments

    async def test_bad_resume_position_is_422_and_sse_must_be_asked_for(
        self, api: httpx.AsyncClient
    ) -> None:
        sse_only = {"Accept": "text/event-stream"}
        response = await api.get(f"{URL}/stream", headers={"Last-Event-ID": "abc", **sse_only})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "Last-Event-ID"
        response = await api.get(f"{URL}/stream", params={"since": "-1"}, headers=sse_only)
        assert response.status_code == 422
        # Only a client that asks for an event stream gets one.
        response = await api.get(f"{URL}/stream")
        assert response.status_code == 406
        assert response.headers["content-type"] == "application/problem+json"


class TestBroadcaster:
    """Fan-out rules without a DB: a full queue drops only its own subscriber."""

    def event(self, position: int) -> StreamedEvent:
        return StreamedEvent(position, "io.nest.cluster.deleted.v1", None, b"x")

    async def test_a_slow_subscriber_is_dropped_and_the_others_get_everything(self) -> None:
        broadcaster = Broadcaster(None, queue_size=10)  # type: ignore[arg-type]
        broadcaster.position = 0
        slow, _ = broadcaster.subscribe(EventFilter())
        fast, head = broadcaster.subscribe(EventFilter())
        assert head == 0
        received: list[int] = []
        for position in range(1, 31):
            broadcaster.publish([self.event(position)])
            while not fast.queue.empty():
                item = fast.queue.get_nowait()
                assert item is not None
                received.append(item.position)
        assert received == list(range(1, 31))
        assert slow.dropped.is_set() and slow.reason == "lagging"
        assert slow not in broadcaster.subscribers
        assert broadcaster.dropped == 1

    async def test_filtered_events_do_not_fill_a_queue(self) -> None:
        broadcaster = Broadcaster(None, queue_size=10)  # type: ignore[arg-type]
        broadcaster.position = 0
        picky, _ = broadcaster.subscribe(EventFilter.for_reader(Scope.ADMIN, ["io.nest.backup."]))
        broadcaster.publish([self.event(p) for p in range(1, 100)])
        assert not picky.dropped.is_set()
        assert picky.queue.empty()
