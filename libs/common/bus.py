"""The message bus: NATS JetStream streams, publishing, durable consumers, request/reply.

Delivery rules (DESIGN.md): durable pull consumers with explicit ack; a handler's message is
acked only after the handler returns; a failure is treated as its handler declared
(`handlers.AckPolicy`): a transient one naks with backoff, and after `max_deliver` deliveries,
or at once for a message that can never succeed (malformed, `Reject`, a permanent failure), the
original bytes go to `nest.dlq.<service>` with the error in headers, and the consumer keeps
going. Request/reply (`call`, `answer`) carries typed models (`contract.RpcMethod`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

# isort: off
from libs.common import nats_lean  # noqa: F401 - before nats: imports it without aiohttp
# isort: on

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from pydantic import ValidationError

from libs.common.contract import (
    DLQ_STREAM,
    EVENTS_STREAM,
    INTENTS_STREAM,
    Envelope,
    RpcMethod,
    dlq_subject,
    envelope_for,
)
from libs.common.contract.base import WireModel
from libs.common.handlers import (
    BatchHandler,
    Decision,
    Delivery,
    Dispatch,
    LegacyHandler,
    Outcome,
    Reject,
    Router,
    legacy_dispatch,
)
from libs.common.logging import correlation_id
from libs.common.tasks import TaskSet

log = logging.getLogger(__name__)

HEADER_ERROR = "Nest-Error"
HEADER_SUBJECT = "Nest-Original-Subject"
HEADER_DELIVERIES = "Nest-Deliveries"
HEADER_CONSUMER = "Nest-Consumer"


class BusUnavailable(Exception):
    """NATS did not answer in time (not connected, or JetStream not responding)."""


class RpcError(Exception):
    """A request/reply call failed: no responder, a timeout, or the responder's own error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class StreamSettings:
    """How the three streams are declared."""

    events_max_age_seconds: float = 30 * 86400
    """NEST_EVENTS keeps events this long (the replay horizon)."""

    duplicate_window_seconds: float = 600
    """Messages with the same Nats-Msg-Id within this window are stored once."""

    dlq_max_age_seconds: float = 30 * 86400
    """Dead letters are kept this long."""

    replicas: int = 1
    """Stream replicas (1 for a single server; 3 in a production NATS cluster)."""


def stream_configs(settings: StreamSettings) -> list[StreamConfig]:
    """The streams Nest needs, as JetStream configurations (declared in code, idempotently)."""
    common: dict[str, Any] = {
        "storage": StorageType.FILE,
        "num_replicas": settings.replicas,
        "duplicate_window": settings.duplicate_window_seconds,
    }
    return [
        StreamConfig(
            name=INTENTS_STREAM,
            description="Commands; each consumed by exactly one service",
            subjects=["nest.intent.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            **common,
        ),
        StreamConfig(
            name=EVENTS_STREAM,
            description="Facts; replayable by the API projector and integrations",
            subjects=["nest.event.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=settings.events_max_age_seconds,
            discard=DiscardPolicy.OLD,
            **common,
        ),
        StreamConfig(
            name=DLQ_STREAM,
            description="Messages a consumer gave up on, with the error in headers",
            subjects=["nest.dlq.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=settings.dlq_max_age_seconds,
            **common,
        ),
    ]


Handler = LegacyHandler
"""The older handler shape (an envelope in); new consumers register typed handlers on a
`handlers.Router`."""

Req = TypeVar("Req", bound=WireModel)
Resp = TypeVar("Resp", bound=WireModel)


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer and how its failures are treated."""

    stream: str
    durable: str
    filter_subject: str
    service: str
    """The consuming service; its dead letters go to nest.dlq.<service>."""
    max_deliver: int = 5
    ack_wait_seconds: float = 30.0
    backoff_seconds: Sequence[float] = (0.5, 2.0, 5.0, 15.0, 30.0)
    concurrency: int = 1
    deliver_new_only: bool = False


class Bus:
    """One NATS connection with JetStream, shared by a service's publishers and consumers."""

    def __init__(self, servers: Sequence[str], *, name: str) -> None:
        self.servers = list(servers)
        self.name = name
        self._nc: NatsClient | None = None
        self._connected = asyncio.Event()
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise BusUnavailable("not connected to NATS")
        return self._nc

    async def connect(self) -> None:
        """Connect, retrying forever with backoff; returns once the first connection is up."""

        async def on_error(exc: Exception) -> None:
            if self._closing:
                return
            log.warning("nats connection problem: %s", exc or type(exc).__name__)

        async def on_disconnect() -> None:
            if not self._closing:
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            log.info("reconnected to NATS")

        self._nc = await nats.connect(
            servers=self.servers,
            name=self.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=2,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        self._connected.set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise BusUnavailable("NATS did not connect in time") from None

    async def close(self) -> None:
        """Flush what was published and close. Consumers are drained by their owners first."""
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            if self._nc.is_connected:
                with contextlib.suppress(Exception):
                    await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 5)

    async def ensure_streams(self, settings: StreamSettings | None = None) -> None:
        """Create or update the streams; safe to call from every service at every start."""
        js = self.nc.jetstream()
        for config in stream_configs(settings or StreamSettings()):
            try:
                await js.update_stream(config)
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(config)
                except nats.js.errors.BadRequestError:
                    # Another replica created it between our two calls.
                    await js.update_stream(config)

    async def publish_envelope(
        self, subject: str, envelope: Envelope, *, timeout: float = 5.0
    ) -> bool:
        """Publish to JetStream and wait for the PubAck; True when stored as a duplicate."""
        return await self.publish_raw(subject, envelope.to_bytes(), envelope.id, timeout=timeout)

    async def publish_raw(
        self,
        subject: str,
        data: bytes,
        msg_id: str,
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> bool:
        all_headers = {"Nats-Msg-Id": msg_id, **(headers or {})}
        try:
            ack = await self.nc.jetstream().publish(
                subject, data, timeout=timeout, headers=all_headers
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise BusUnavailable(f"publish to {subject} not acknowledged: {exc}") from exc
        except nats.errors.ConnectionClosedError as exc:
            raise BusUnavailable("NATS connection closed") from exc
        return bool(ack.duplicate)

    async def publish(
        self,
        payload: WireModel,
        *,
        source: str,
        subject: str | None = None,
        correlation: str | None = None,
    ) -> Envelope:
        """Wrap a contract payload in its envelope and publish it; returns the envelope."""
        nats_subject, envelope = envelope_for(
            payload,
            source=source,
            subject=subject,
            correlation_id=correlation or correlation_id.get(),
        )
        await self.publish_envelope(nats_subject, envelope)
        return envelope

    def consumer(self, spec: ConsumerSpec, handler: Router | BatchHandler | Handler) -> Consumer:
        """A durable consumer running `handler`: a `Router` of typed handlers, a `BatchHandler`
        taking each fetch (up to `spec.concurrency` messages) at once, or (the older path) one
        function taking every envelope."""
        if isinstance(handler, BatchHandler):
            return Consumer(self, spec, handler)
        dispatch = handler.dispatch if isinstance(handler, Router) else legacy_dispatch(handler)
        return Consumer(self, spec, dispatch)

    async def request(
        self, subject: str, body: dict[str, Any], *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Core NATS request/reply with JSON bodies; raises RpcError on any failure."""
        headers = {}
        cid = correlation_id.get()
        if cid:
            headers["Nest-Correlation-Id"] = cid
        try:
            reply = await self.nc.request(
                subject, json.dumps(body).encode(), timeout=timeout, headers=headers or None
            )
        except nats.errors.NoRespondersError:
            raise RpcError("unavailable", f"no service answers {subject}") from None
        except nats.errors.TimeoutError:
            raise RpcError("timeout", f"{subject} did not answer within {timeout:g}s") from None
        answer = json.loads(reply.data)
        if not answer.get("ok"):
            error = answer.get("error") or {}
            raise RpcError(str(error.get("kind", "error")), str(error.get("message", "failed")))
        result: dict[str, Any] = answer.get("result") or {}
        return result

    async def serve(
        self,
        subject: str,
        handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        *,
        queue: str,
    ) -> Any:
        """Answer requests on `subject` (one of `queue`'s members answers each)."""

        async def respond(msg: Msg) -> None:
            token = correlation_id.set((msg.headers or {}).get("Nest-Correlation-Id"))
            try:
                result = await handler(json.loads(msg.data))
                answer: dict[str, Any] = {"ok": True, "result": result}
            except RpcError as exc:
                answer = {"ok": False, "error": {"kind": exc.kind, "message": exc.message}}
            except Exception as exc:
                log.exception("rpc handler for %s failed", subject)
                answer = {"ok": False, "error": {"kind": "internal", "message": str(exc)}}
            finally:
                correlation_id.reset(token)
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps(answer).encode())

        subscription = await self.nc.subscribe(subject, queue=queue, cb=respond)
        # Make the interest known to the server before callers are told we serve.
        await self.nc.flush(timeout=5)
        return subscription

    async def call(
        self, method: RpcMethod[Req, Resp], request: Req, *, timeout: float = 10.0
    ) -> Resp:
        """Ask `method` with a typed request; the typed answer, or RpcError on any failure
        (kind `invalid-answer` when the answer does not fit the method's response model)."""
        result = await self.request(method.subject, request.wire(), timeout=timeout)
        try:
            return method.response.model_validate(result)
        except ValidationError as exc:
            raise RpcError("invalid-answer", f"{method.subject}: {_problems(exc)}") from None

    async def answer(
        self,
        method: RpcMethod[Req, Resp],
        handler: Callable[[Req], Awaitable[Resp]],
        *,
        queue: str,
    ) -> Any:
        """Answer `method` with `handler`, which takes the validated request and returns the
        response model; a request that does not validate is answered `invalid` (naming the
        fields, never echoing the input: it may hold secrets)."""

        async def respond(body: dict[str, Any]) -> dict[str, Any]:
            try:
                request = method.request.model_validate(body)
            except ValidationError as exc:
                raise RpcError("invalid", _problems(exc)) from None
            return (await handler(request)).wire()

        return await self.serve(method.subject, respond, queue=queue)


def _problems(exc: ValidationError) -> str:
    """A validation error as `field.path: message; ...`, without the input."""
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
        for error in exc.errors(include_input=False)
    )


class Consumer:
    """A durable pull consumer loop that enforces the delivery rules for one dispatcher.

    The messages of a fetched batch are handled concurrently, each a task in the consumer's
    `TaskSet`; a single `keepalive` loop tells the server every `ack_wait / 3` seconds that
    the ones still being handled are in progress, so a slow handler is not redelivered.
    """

    def __init__(self, bus: Bus, spec: ConsumerSpec, dispatch: Dispatch | BatchHandler) -> None:
        self.bus = bus
        self.spec = spec
        self.dispatch = dispatch
        """Per message (a `Router`'s or the older handler's), or per fetch (a batch)."""
        self._stopping = asyncio.Event()
        self._tasks = TaskSet()
        self._working: dict[str, Msg] = {}
        self.handled = 0
        self.dead_lettered = 0

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.spec.durable,
            filter_subject=self.spec.filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW if self.spec.deliver_new_only else DeliverPolicy.ALL,
            ack_wait=self.spec.ack_wait_seconds,
            # The server never gives up on its own: we count deliveries and dead-letter the
            # message ourselves, so the DLQ always gets the message together with its error.
            max_deliver=-1,
            max_ack_pending=max(self.spec.concurrency * 4, 16),
        )

    async def run(self) -> None:
        """Fetch and handle messages until stop() is called; survives NATS restarts."""
        await self.bus.wait_connected()
        self._tasks.spawn("keepalive", self._keep_alive())
        sub = None
        try:
            while not self._stopping.is_set():
                try:
                    if sub is None:
                        sub = await self.bus.nc.jetstream().pull_subscribe(
                            self.spec.filter_subject,
                            durable=self.spec.durable,
                            stream=self.spec.stream,
                            config=self.config(),
                        )
                    msgs = await sub.fetch(self.spec.concurrency, timeout=1.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning(
                        "consumer %s: fetch failed (%s); retrying",
                        self.spec.durable,
                        exc or type(exc),
                    )
                    if sub is not None:
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                    sub = None
                    await self._sleep(1.0)
                    continue
                if self._stopping.is_set():
                    # Fetched while stopping: give them back at once (nak, no delay) instead of
                    # starting work drain() no longer waits for, which would leave them unacked
                    # for a whole ack_wait before another replica or the next start gets them.
                    for msg in msgs:
                        with contextlib.suppress(Exception):
                            await msg.nak()
                    break
                if isinstance(self.dispatch, BatchHandler):
                    name = f"batch-{msgs[0].metadata.sequence.stream}"
                    await self._tasks.spawn(name, self._handle_batch(msgs, self.dispatch))
                    continue
                handling = []
                for msg in msgs:
                    name = f"message-{msg.metadata.sequence.stream}"
                    handling.append(self._tasks.spawn(name, self._handle(msg, name)))
                await asyncio.gather(*handling)
        finally:
            await self._tasks.cancel("keepalive")
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def stop(self) -> None:
        """Ask the loop to stop after the messages it is handling now."""
        self._stopping.set()

    async def _handle(self, msg: Msg, name: str) -> None:
        meta = msg.metadata
        delivery = Delivery(
            subject=msg.subject,
            stream_sequence=meta.sequence.stream,
            num_delivered=meta.num_delivered,
        )
        try:
            envelope = Envelope.from_bytes(msg.data)
        except (ValidationError, ValueError) as exc:
            await self._dead_letter(msg, delivery, f"malformed envelope: {exc}")
            return
        delivery = Delivery(
            subject=delivery.subject,
            stream_sequence=delivery.stream_sequence,
            num_delivered=delivery.num_delivered,
            envelope=envelope,
        )
        if delivery.num_delivered > self.spec.max_deliver:
            await self._dead_letter(
                msg, delivery, "delivered more than max_deliver times without an outcome"
            )
            return
        token = correlation_id.set(envelope.correlationid)
        self._working[name] = msg
        assert not isinstance(self.dispatch, BatchHandler)
        try:
            decision = await self.dispatch(envelope, delivery)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        finally:
            self._working.pop(name, None)
            correlation_id.reset(token)
        await self._carry_out(msg, delivery, decision)

    async def _handle_batch(self, msgs: list[Msg], batch: BatchHandler) -> None:
        """Every message of a fetch to the batch handler at once, in stream order."""
        taken: list[tuple[Msg, Envelope, Delivery]] = []
        for msg in msgs:
            meta = msg.metadata
            delivery = Delivery(msg.subject, meta.sequence.stream, meta.num_delivered)
            try:
                envelope = Envelope.from_bytes(msg.data)
            except (ValidationError, ValueError) as exc:
                await self._dead_letter(msg, delivery, f"malformed envelope: {exc}")
                continue
            if delivery.num_delivered > self.spec.max_deliver:
                await self._dead_letter(
                    msg, delivery, "delivered more than max_deliver times without an outcome"
                )
                continue
            delivery = Delivery(
                delivery.subject, delivery.stream_sequence, delivery.num_delivered, envelope
            )
            taken.append((msg, envelope, delivery))
        for msg, _, delivery in taken:
            self._working[f"batch-{delivery.stream_sequence}"] = msg
        try:
            decisions = await batch.dispatch_batch([(e, d) for _, e, d in taken])
        except asyncio.CancelledError:
            for msg, _, _ in taken:
                with contextlib.suppress(Exception):
                    await msg.nak()
            raise
        finally:
            for _, _, delivery in taken:
                self._working.pop(f"batch-{delivery.stream_sequence}", None)
        for (msg, _, delivery), decision in zip(taken, decisions, strict=True):
            await self._carry_out(msg, delivery, decision)

    async def _carry_out(self, msg: Msg, delivery: Delivery, decision: Decision) -> None:
        if decision.outcome is Outcome.ACK:
            await self._ack(msg)
            self.handled += 1
            return
        if decision.outcome is Outcome.RETRY and delivery.num_delivered < self.spec.max_deliver:
            delay = self._backoff(delivery.num_delivered)
            log.warning(
                "handler for %s failed (delivery %d/%d): %s; retrying in %.1fs",
                delivery.subject,
                delivery.num_delivered,
                self.spec.max_deliver,
                decision.error,
                delay,
                exc_info=decision.exception,
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=delay)
            return
        await self._dead_letter(msg, delivery, decision.error)

    def _backoff(self, attempt: int) -> float:
        steps = list(self.spec.backoff_seconds) or [1.0]
        return steps[min(attempt, len(steps)) - 1]

    async def _keep_alive(self) -> None:
        """Tell the server the messages still being handled are in progress, so it does not
        redeliver them to another replica while a slow handler works."""
        interval = max(self.spec.ack_wait_seconds / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            for msg in list(self._working.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def _ack(self, msg: Msg) -> None:
        try:
            await msg.ack_sync(timeout=5.0)
        except Exception as exc:
            # The handler's effects are done and idempotent; a redelivery is harmless.
            log.warning("ack failed (%s); the message may be redelivered", exc)

    async def _dead_letter(self, msg: Msg, delivery: Delivery, error: str) -> None:
        log.error(
            "moving message from %s to the DLQ after %d deliveries: %s",
            delivery.subject,
            delivery.num_delivered,
            error,
        )
        headers = {
            HEADER_ERROR: error[:4000].replace("\r", " ").replace("\n", " "),
            HEADER_SUBJECT: delivery.subject,
            HEADER_DELIVERIES: str(delivery.num_delivered),
            HEADER_CONSUMER: self.spec.durable,
        }
        try:
            await self.bus.publish_raw(
                dlq_subject(self.spec.service),
                msg.data,
                f"dlq-{self.spec.stream}-{delivery.stream_sequence}",
                headers=headers,
            )
        except BusUnavailable:
            # Not stored in the DLQ: leave it to be redelivered rather than lose it.
            with contextlib.suppress(Exception):
                await msg.nak(delay=self._backoff(self.spec.max_deliver))
            return
        # Ack (not term): on the work-queue stream an ack is what removes the message.
        await self._ack(msg)
        self.dead_lettered += 1

    async def drain(self, timeout: float) -> None:
        """Stop, wait up to `timeout` for in-flight handlers, then cancel (they get nak'd)."""
        self.stop()
        await self._tasks.cancel("keepalive", timeout=0.5)
        still = await self._tasks.wait(timeout)
        if still:
            log.warning("consumer %s: cancelling %s after the drain", self.spec.durable, still)
        with contextlib.suppress(Exception):
            await self._tasks.stop(1.0)


def servers_from_url(url: str) -> list[str]:
    """`nats://a:4222,nats://b:4222` to a list of server URLs."""
    return [part.strip() for part in url.split(",") if part.strip()]


__all__ = [
    "BatchHandler",
    "Bus",
    "BusUnavailable",
    "Consumer",
    "ConsumerSpec",
    "Delivery",
    "Handler",
    "Reject",
    "RpcError",
    "StreamSettings",
    "servers_from_url",
    "stream_configs",
]
