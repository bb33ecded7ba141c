"""Typed handlers against a real nats-server: each payload type its handler, each handler its
declared ack outcome; typed request/reply."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from pydantic import Field

from libs.common.bus import HEADER_DELIVERIES, HEADER_ERROR, Bus, ConsumerSpec, RpcError
from libs.common.contract import INTENTS_STREAM, RpcMethod, envelope_for
from libs.common.contract.base import WireModel
from libs.common.contract.cluster import ClusterSpec, DeleteCluster, ReconcileCluster
from libs.common.handlers import (
    AckPolicy,
    BatchHandler,
    Delivery,
    Received,
    Reject,
    Router,
    Unknown,
)
from tests.integration.bus.test_bus import dlq_messages, eventually, spec


def reconcile(name: str = "demo", generation: int = 1) -> ReconcileCluster:
    return ReconcileCluster(
        cluster_id=f"id-{name}", name=name, generation=generation, spec=ClusterSpec()
    )


def delete(name: str = "demo") -> DeleteCluster:
    return DeleteCluster(cluster_id=f"id-{name}", name=name, generation=2)


async def publish(bus: Bus, payload: WireModel) -> str:
    subject, envelope = envelope_for(payload, source="test", subject="x")
    await bus.publish_envelope(subject, envelope)
    return envelope.id


@contextlib.asynccontextmanager
async def consuming(
    bus: Bus, router: Router | BatchHandler, consumer_spec: ConsumerSpec
) -> AsyncIterator[None]:
    consumer = bus.consumer(consumer_spec, router)
    task = asyncio.create_task(consumer.run())
    try:
        yield
    finally:
        await consumer.drain(2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def queue_is_empty(bus: Bus) -> bool:
    return (await bus.nc.jetstream().stream_info(INTENTS_STREAM)).state.messages == 0


async def test_each_type_reaches_its_typed_handler_with_or_without_the_delivery(bus: Bus) -> None:
    reconciled: list[ReconcileCluster] = []
    deleted: list[tuple[str, int]] = []

    async def on_reconcile(intent: ReconcileCluster) -> None:
        reconciled.append(intent)

    async def on_delete(intent: DeleteCluster, delivery: Delivery) -> None:
        assert delivery.envelope is not None
        deleted.append((intent.cluster_id, delivery.num_delivered))

    router = Router("provisioner")
    router.register(ReconcileCluster, on_reconcile, ack=AckPolicy.NACK_ON_ERROR)
    router.register(DeleteCluster, on_delete, ack=AckPolicy.NACK_ON_ERROR)
    await publish(bus, reconcile("a", generation=3))
    await publish(bus, delete("b"))
    async with consuming(bus, router, spec()):
        await eventually(lambda: len(reconciled) == 1 and len(deleted) == 1)
    assert reconciled[0] == reconcile("a", generation=3)
    assert deleted == [("id-b", 1)]
    assert await queue_is_empty(bus)
    assert router.handles() == {
        "io.nest.cluster.reconcile.v1": AckPolicy.NACK_ON_ERROR,
        "io.nest.cluster.delete.v1": AckPolicy.NACK_ON_ERROR,
    }


async def test_nack_on_error_retries_then_dead_letters(bus: Bus) -> None:
    attempts: list[int] = []

    async def flaky(intent: ReconcileCluster, delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        raise ConnectionError("management cluster timed out")

    router = Router("provisioner")
    router.register(ReconcileCluster, flaky, ack=AckPolicy.NACK_ON_ERROR)
    await publish(bus, reconcile())
    async with consuming(bus, router, spec(max_deliver=3)):
        await eventually(lambda: len(attempts) == 3)
        dead = []
        for _ in range(50):
            dead = await dlq_messages(bus)
            if dead:
                break
            await asyncio.sleep(0.1)
    assert attempts == [1, 2, 3]
    assert dead[0].headers[HEADER_ERROR] == "ConnectionError: management cluster timed out"
    assert dead[0].headers[HEADER_DELIVERIES] == "3"


async def test_reject_on_error_dead_letters_at_the_first_failure(bus: Bus) -> None:
    attempts: list[int] = []

    async def permanent(intent: ReconcileCluster) -> None:
        attempts.append(1)
        raise ValueError("this spec can never be applied")

    router = Router("provisioner")
    router.register(ReconcileCluster, permanent, ack=AckPolicy.REJECT_ON_ERROR)
    await publish(bus, reconcile())
    async with consuming(bus, router, spec(max_deliver=5)):
        await eventually(lambda: len(attempts) == 1)
        await asyncio.sleep(0.5)
    assert attempts == [1]
    dead = await dlq_messages(bus)
    assert [m.headers[HEADER_ERROR] for m in dead] == ["ValueError: this spec can never be applied"]


async def test_ack_on_error_acks_a_failure_the_handler_reported(bus: Bus) -> None:
    attempts: list[int] = []

    async def reported(intent: ReconcileCluster) -> None:
        attempts.append(1)
        raise RuntimeError("reported as BackupFailed already")

    router = Router("provisioner")
    router.register(ReconcileCluster, reported, ack=AckPolicy.ACK_ON_ERROR)
    await publish(bus, reconcile())
    async with consuming(bus, router, spec()):
        await eventually(lambda: len(attempts) == 1)
        await asyncio.sleep(0.5)
    assert attempts == [1]
    assert await dlq_messages(bus) == []
    assert await queue_is_empty(bus)


async def test_reject_raised_by_a_retrying_handler_dead_letters_at_once(bus: Bus) -> None:
    attempts: list[int] = []

    async def refuses(intent: ReconcileCluster) -> None:
        attempts.append(1)
        raise Reject("not ours")

    router = Router("provisioner")
    router.register(ReconcileCluster, refuses, ack=AckPolicy.NACK_ON_ERROR)
    await publish(bus, reconcile())
    async with consuming(bus, router, spec()):
        await eventually(lambda: len(attempts) == 1)
        await asyncio.sleep(0.3)
    assert attempts == [1]
    assert len(await dlq_messages(bus)) == 1


async def test_unknown_and_invalid_messages_by_the_routers_rule(bus: Bus) -> None:
    handled: list[str] = []

    async def on_reconcile(intent: ReconcileCluster) -> None:
        handled.append(intent.name)

    strict = Router("provisioner")
    strict.register(ReconcileCluster, on_reconcile, ack=AckPolicy.NACK_ON_ERROR)
    await publish(bus, delete("no-handler"))  # in the contract, but not this router's
    subject, bad = envelope_for(reconcile("bad"), source="test")
    bad.data = {**bad.data, "generation": "not a number"}
    await bus.publish_envelope(subject, bad)
    await publish(bus, reconcile("good"))
    async with consuming(bus, strict, spec()):
        await eventually(lambda: handled == ["good"])
        await asyncio.sleep(0.3)
    errors = sorted(m.headers[HEADER_ERROR] for m in await dlq_messages(bus))
    assert len(errors) == 2
    assert errors[0].startswith("ValidationError")
    assert "no handler for type 'io.nest.cluster.delete.v1'" in errors[1]

    lenient = Router("backup-clusters", unknown=Unknown.IGNORE)
    lenient.register(ReconcileCluster, on_reconcile, ack=AckPolicy.NACK_ON_ERROR)
    await publish(bus, delete("ignored"))
    await bus.publish_envelope(subject, bad.model_copy(update={"id": "bad-2"}))
    await publish(bus, reconcile("also-good"))
    async with consuming(bus, lenient, spec()):
        await eventually(lambda: handled == ["good", "also-good"])
        await asyncio.sleep(0.3)
    assert len(await dlq_messages(bus)) == 2  # nothing more
    assert await queue_is_empty(bus)


async def test_a_slow_handler_is_kept_alive_and_not_redelivered(bus: Bus) -> None:
    deliveries: list[int] = []

    async def slow(intent: ReconcileCluster, delivery: Delivery) -> None:
        deliveries.append(delivery.num_delivered)
        await asyncio.sleep(3.0)  # three times the ack wait

    router = Router("provisioner")
    router.register(ReconcileCluster, slow, ack=AckPolicy.NACK_ON_ERROR)
    await publish(bus, reconcile())
    slow_spec = spec(ack_wait_seconds=1.0)
    # Two replicas: without the keepalive the server would hand the message to the idle one.
    async with consuming(bus, router, slow_spec), consuming(bus, router, slow_spec):
        await eventually(lambda: len(deliveries) == 1)
        await asyncio.sleep(3.5)
    assert deliveries == [1]
    assert await queue_is_empty(bus)


def test_registering_twice_or_outside_the_contract_is_refused() -> None:
    async def handler(intent: ReconcileCluster) -> None:
        return None

    router = Router("provisioner")
    router.register(ReconcileCluster, handler, ack=AckPolicy.NACK_ON_ERROR)
    with pytest.raises(ValueError, match="already has a handler"):
        router.register(ReconcileCluster, handler, ack=AckPolicy.REJECT_ON_ERROR)

    class NotInTheContract(WireModel):
        x: int = 0

    with pytest.raises(ValueError, match="not part of the event contract"):
        router.register(NotInTheContract, handler, ack=AckPolicy.NACK_ON_ERROR)  # type: ignore[arg-type]


class Double(WireModel):
    n: int = Field(ge=0)
    secret: str = ""


class Doubled(WireModel):
    n: int


DOUBLE = RpcMethod("nest.rpc.test.double", Double, Doubled, "Double a number.")
BROKEN = RpcMethod("nest.rpc.test.broken", Double, Doubled, "Answers the wrong shape.")


async def test_typed_request_reply(bus: Bus) -> None:
    async def double(request: Double) -> Doubled:
        if request.n == 13:
            raise RpcError("not-found", "no 13 here")
        return Doubled(n=request.n * 2)

    async def broken(request: Double) -> Doubled:
        return Doubled.model_construct(n="lots")  # type: ignore[arg-type]

    subscriptions = [
        await bus.answer(DOUBLE, double, queue="test"),
        await bus.answer(BROKEN, broken, queue="test"),
    ]
    try:
        assert await bus.call(DOUBLE, Double(n=21)) == Doubled(n=42)
        with pytest.raises(RpcError) as err:
            await bus.call(DOUBLE, Double(n=13))
        assert (err.value.kind, err.value.message) == ("not-found", "no 13 here")
        with pytest.raises(RpcError) as err:
            await bus.call(DOUBLE, Double.model_construct(n=-1, secret="hunter2"))
        assert err.value.kind == "invalid"
        assert "n:" in err.value.message and "hunter2" not in err.value.message
        with pytest.raises(RpcError) as err:
            await bus.call(BROKEN, Double(n=1))
        assert err.value.kind == "invalid-answer"
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()


async def test_a_batch_handler_gets_each_fetch_in_stream_order(bus: Bus) -> None:
    batches: list[list[tuple[str, int]]] = []

    async def apply(batch: list[Received]) -> None:
        batches.append([(type(r.payload).__name__, r.delivery.stream_sequence) for r in batch])

    handler = BatchHandler(
        "projector", apply, ack=AckPolicy.NACK_ON_ERROR, types=[ReconcileCluster]
    )
    for index in range(5):
        await publish(bus, reconcile(f"c{index}"))
    await publish(bus, delete("not-in-the-batch"))
    async with consuming(bus, handler, spec(concurrency=16)):
        await eventually(lambda: sum(len(b) for b in batches) == 5)
        await asyncio.sleep(0.3)
    taken = [item for batch in batches for item in batch]
    assert [name for name, _ in taken] == ["ReconcileCluster"] * 5
    sequences = [sequence for _, sequence in taken]
    assert sequences == sorted(sequences)
    assert len(batches) < 5  # fetched together, not one by one
    assert await dlq_messages(bus) == []  # the delete was not the batch's: acked unseen
    assert await queue_is_empty(bus)


async def test_a_failing_batch_is_retried_whole_then_dead_lettered(bus: Bus) -> None:
    sizes: list[int] = []

    async def fails(batch: list[Received]) -> None:
        sizes.append(len(batch))
        raise ConnectionError("database is down")

    handler = BatchHandler("projector", fails, ack=AckPolicy.NACK_ON_ERROR)
    for index in range(3):
        await publish(bus, reconcile(f"c{index}"))
    await asyncio.sleep(0.2)
    async with consuming(bus, handler, spec(concurrency=16, max_deliver=2)):
        await eventually(lambda: sum(sizes) >= 6)
        dead: list = []
        for _ in range(50):
            dead = await dlq_messages(bus)
            if len(dead) == 3:
                break
            await asyncio.sleep(0.1)
    assert len(dead) == 3
    assert {m.headers[HEADER_ERROR] for m in dead} == {"ConnectionError: database is down"}
