"""The bus against a real nats-server: dedup, nak, DLQ, restarts, malformed input, RPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from libs.common.bus import (
    HEADER_DELIVERIES,
    HEADER_ERROR,
    Bus,
    ConsumerSpec,
    Delivery,
    Reject,
    RpcError,
)
from libs.common.contract import DLQ_STREAM, INTENTS_STREAM, Envelope, envelope_for
from libs.common.contract.cluster import ClusterSpec, ReconcileCluster
from libs.common.nats_server import EmbeddedNats


def intent(name: str = "demo", generation: int = 1) -> tuple[str, Envelope]:
    payload = ReconcileCluster(
        cluster_id=f"id-{name}", name=name, generation=generation, spec=ClusterSpec()
    )
    return envelope_for(payload, source="test", subject=payload.cluster_id)


def spec(**overrides: object) -> ConsumerSpec:
    values: dict[str, object] = {
        "stream": INTENTS_STREAM,
        "durable": "test-provisioner",
        "filter_subject": "nest.intent.provisioner.>",
        "service": "provisioner",
        "max_deliver": 3,
        "backoff_seconds": (0.05, 0.05, 0.05),
        "ack_wait_seconds": 5,
    }
    values.update(overrides)
    return ConsumerSpec(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(
    bus: Bus, consumer_spec: ConsumerSpec, handler: Callable[[Envelope, Delivery], Awaitable[None]]
) -> AsyncIterator[None]:
    consumer = bus.consumer(consumer_spec, handler)
    task = asyncio.create_task(consumer.run())
    try:
        yield
    finally:
        await consumer.drain(2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def dlq_messages(bus: Bus, service: str = "provisioner") -> list:
    sub = await bus.nc.jetstream().pull_subscribe(f"nest.dlq.{service}", stream=DLQ_STREAM)
    try:
        return await sub.fetch(100, timeout=1)
    except Exception:
        return []
    finally:
        await sub.unsubscribe()


async def test_streams_are_declared_idempotently(bus: Bus) -> None:
    await bus.ensure_streams()
    await bus.ensure_streams()
    names = {s.config.name for s in await bus.nc.jetstream().streams_info()}
    assert {"NEST_INTENTS", "NEST_EVENTS", "NEST_DLQ"} <= names
    info = await bus.nc.jetstream().stream_info(INTENTS_STREAM)
    assert str(getattr(info.config.retention, "value", info.config.retention)) == "workqueue"


async def test_same_id_published_twice_is_delivered_once(bus: Bus) -> None:
    subject, envelope = intent()
    assert await bus.publish_envelope(subject, envelope) is False
    assert await bus.publish_envelope(subject, envelope) is True  # stored as a duplicate
    seen: list[str] = []

    async def handler(env: Envelope, delivery: Delivery) -> None:
        seen.append(env.id)

    async with running(bus, spec(), handler):
        await eventually(lambda: len(seen) == 1)
        await asyncio.sleep(0.5)
    assert seen == [envelope.id]


async def test_failure_naks_and_the_message_is_redelivered(bus: Bus) -> None:
    subject, envelope = intent()
    await bus.publish_envelope(subject, envelope)
    attempts: list[int] = []

    async def flaky(env: Envelope, delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        if len(attempts) < 2:
            raise ConnectionError("management cluster timed out")

    async with running(bus, spec(), flaky):
        await eventually(lambda: len(attempts) == 2)
        await asyncio.sleep(0.3)
    assert attempts == [1, 2]
    assert await dlq_messages(bus) == []
    # Acked on the work queue: nothing left.
    info = await bus.nc.jetstream().stream_info(INTENTS_STREAM)
    assert info.state.messages == 0


async def test_max_deliver_moves_the_message_to_the_dlq_with_the_error(bus: Bus) -> None:
    subject, envelope = intent()
    await bus.publish_envelope(subject, envelope)
    attempts: list[int] = []

    async def always_fails(env: Envelope, delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        raise RuntimeError("etcd unreachable")

    async with running(bus, spec(max_deliver=3), always_fails):
        await eventually(lambda: len(attempts) == 3)
        await asyncio.sleep(0.5)
    assert attempts == [1, 2, 3]
    dead = await dlq_messages(bus)
    assert len(dead) == 1
    assert dead[0].headers[HEADER_ERROR] == "RuntimeError: etcd unreachable"
    assert dead[0].headers[HEADER_DELIVERIES] == "3"
    assert Envelope.from_bytes(dead[0].data).id == envelope.id
    info = await bus.nc.jetstream().stream_info(INTENTS_STREAM)
    assert info.state.messages == 0


async def test_malformed_message_goes_to_the_dlq_and_the_consumer_keeps_going(bus: Bus) -> None:
    await bus.publish_raw("nest.intent.provisioner.reconcile", b"{not json", "garbage-1")
    subject, good = intent()
    await bus.publish_envelope(subject, good)
    handled: list[str] = []

    async def handler(env: Envelope, delivery: Delivery) -> None:
        handled.append(env.id)

    async with running(bus, spec(), handler):
        await eventually(lambda: handled == [good.id])
    dead = await dlq_messages(bus)
    assert len(dead) == 1
    assert dead[0].data == b"{not json"
    assert "malformed envelope" in dead[0].headers[HEADER_ERROR]


async def test_reject_dead_letters_at_once(bus: Bus) -> None:
    subject, envelope = intent()
    await bus.publish_envelope(subject, envelope)
    attempts: list[int] = []

    async def rejects(env: Envelope, delivery: Delivery) -> None:
        attempts.append(1)
        raise Reject("spec can never be reconciled")

    async with running(bus, spec(), rejects):
        await eventually(lambda: len(attempts) == 1)
        await asyncio.sleep(0.3)
    assert attempts == [1]
    assert len(await dlq_messages(bus)) == 1


async def test_consumer_resumes_after_nats_is_killed_and_restarted(
    bus: Bus, nats_server: EmbeddedNats
) -> None:
    handled: list[int] = []

    async def handler(env: Envelope, delivery: Delivery) -> None:
        handled.append(env.data["generation"])

    async with running(bus, spec(), handler):
        subject, first = intent(generation=1)
        await bus.publish_envelope(subject, first)
        await eventually(lambda: handled == [1])
        nats_server.kill()
        await asyncio.sleep(0.5)
        nats_server.start()
        await eventually(lambda: bus.connected, timeout=15)
        subject, second = intent(generation=2)
        for _ in range(50):  # JetStream needs a moment after a restart to accept publishes
            try:
                await bus.publish_envelope(subject, second, timeout=1)
                break
            except Exception:
                await asyncio.sleep(0.2)
        await eventually(lambda: handled == [1, 2], timeout=20)


async def test_request_reply(bus: Bus) -> None:
    async def double(body: dict) -> dict:
        if body.get("n") is None:
            raise RpcError("invalid", "n is required")
        return {"n": body["n"] * 2}

    sub = await bus.serve("nest.rpc.test.double", double, queue="test")
    try:
        assert await bus.request("nest.rpc.test.double", {"n": 21}) == {"n": 42}
        with pytest.raises(RpcError) as err:
            await bus.request("nest.rpc.test.double", {})
        assert err.value.kind == "invalid"
        with pytest.raises(RpcError) as err:
            await bus.request("nest.rpc.nobody.home", {}, timeout=1)
        assert err.value.kind in {"unavailable", "timeout"}
    finally:
        await sub.unsubscribe()


async def test_a_message_fetched_while_stopping_is_given_back_at_once(bus: Bus) -> None:
    # A long ack_wait: a message kept unacked by a stopping consumer would wait that long.
    slow_spec = spec(ack_wait_seconds=60)
    first_seen: list[str] = []
    second_seen: list[str] = []

    async def first(envelope: Envelope, delivery: Delivery) -> None:
        first_seen.append(envelope.id)

    async def second(envelope: Envelope, delivery: Delivery) -> None:
        second_seen.append(envelope.id)

    consumer = bus.consumer(slow_spec, first)
    task = asyncio.create_task(consumer.run())
    await asyncio.sleep(0.3)  # its fetch is waiting on the server
    consumer.stop()
    subject, envelope = intent("handed-back")
    await bus.publish_envelope(subject, envelope)
    await asyncio.wait_for(task, 5)
    assert first_seen == []
    async with running(bus, slow_spec, second):
        await eventually(lambda: second_seen == [envelope.id], timeout=5)
